"""How long does `make safety-adapter`'s training take, and does the thread count change what it trains? (issue 15)

Trains the shipped recipe (``SafetyTuningConfig()``: LoRA on the embedded model, the shipped training mix — main
examples, voice-training examples and general requests, mixed by ``training_mix``) for the first ``--steps`` steps,
once per thread count, each time from a freshly loaded base model, and prints per thread count:

* seconds per step, and the full run's training time extrapolated from it (the full run has
  ``ceil(examples / batch) × epochs`` steps; batches are padded to their longest example, so the first steps stand for
  the rest only roughly: the shipped report's measured time is the number to quote);
* a SHA-256 of every trained LoRA weight after those steps, and the loss of each step.

It fails (exit 1) when two thread counts train different weights: ``make safety-adapter`` promises the shipped adapter
byte for byte at its own thread count, and this is the check that another count would give the same file.

Usage::

    python benchmarks/safety_tuning.py                       # 1 and 2 threads, 16 steps each
    python benchmarks/safety_tuning.py --threads 2 --steps 40

The schedule is the full recipe's over the trained prefix (warm-up and cosine decay over ``--steps`` steps), so the
weights are comparable between thread counts, not with the shipped adapter's.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.studies.refusal import safety_tuning as S  # noqa: E402


def shipped_training_mix(config: S.SafetyTuningConfig) -> list[S.TrainingExample]:
    """The examples ``make safety-adapter`` trains on, read from the shipped files, in training order."""
    data = S.TRAINING_DATA_PATH.parent
    voice = S.read_training_examples(data / S.VOICE_DATA_NAME) if config.voice_train else []
    general = S.read_general_requests(data / S.GENERAL_DATA_NAME) if config.general_requests else []
    examples, _ = S.training_mix(S.read_training_examples(S.TRAINING_DATA_PATH), voice, general, seed=config.seed)
    return examples


def time_training(config: S.SafetyTuningConfig, examples: list[S.TrainingExample], threads: int) -> dict:
    from helpers.models import _load_embedded_hf

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    hf_model, tokenizer = _load_embedded_hf(torch.float32)
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    model, _ = S.make_trainable_model(hf_model, config)
    start = time.perf_counter()
    losses = S.train_lora(model, tokenizer, examples, config)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().contiguous().numpy().tobytes())
    return {"threads": threads, "steps": len(losses), "seconds": seconds, "losses": losses, "sha256": digest.hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to compare")
    parser.add_argument("--steps", type=int, default=16, help="training steps per thread count (one epoch's worth)")
    args = parser.parse_args()
    if args.steps < 1 or any(t < 1 for t in args.threads):
        parser.error("--steps and every --threads value must be at least 1")
    config = S.SafetyTuningConfig()
    examples = shipped_training_mix(config)
    full_steps = math.ceil(len(examples) / config.batch_size) * config.epochs
    prefix = examples[:math.ceil(args.steps / config.epochs) * config.batch_size]  # epochs × batches ≈ --steps
    print(f"shipped recipe: {len(examples)} examples, {full_steps} steps of {config.batch_size}; timing the first "
          f"{len(prefix)} examples ({args.steps} steps); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    results = [time_training(config, prefix, threads) for threads in args.threads]
    print("| threads | s / step | full training, extrapolated | weights SHA-256 | last loss |")
    print("|---|---|---|---|---|")
    for r in results:
        per_step = r["seconds"] / r["steps"]
        print(f"| {r['threads']} | {per_step:.2f} | {per_step * full_steps / 60:.1f} min | {r['sha256'][:16]} | "
              f"{r['losses'][-1]:.4f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if len({r["sha256"] for r in results}) > 1:
        differ = [i for i, losses in enumerate(zip(*(r["losses"] for r in results))) if len(set(losses)) > 1]
        where = f"first differing loss at step {differ[0]}" if differ else "every step's loss equal"
        print(f"FAIL: the thread counts trained different weights ({where})")
        sys.exit(1)
    print("The thread counts trained the same weights, bit for bit.")


if __name__ == "__main__":
    main()
