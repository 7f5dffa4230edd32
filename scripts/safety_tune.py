"""Regenerate the safety-tuning LoRA adapter of the embedded model (``make safety-adapter``).

Writes, into ``helpers/data/refusal/`` (or ``--out``):

* ``safety_tuning_data.jsonl`` — the training examples (harmful train instructions → refusals,
  harmless train instructions → the base model's own greedy answers);
* ``voice_training_data.jsonl`` — with ``voice_train`` (the default's setting decides): the training examples
  of ``voice_train.jsonl``'s requests in six further voices, made the same way;
* ``general_requests.jsonl`` — with ``general_requests`` (the default: 600): requests the base model samples itself
  (Magpie) and its greedy answers;
* ``adapter/`` — the LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
* ``safety_tuning_report.{json,md}`` — configuration, seed, loss curve, timings, and refusal rates
  of the base and the tuned model on the held-out test split.

Runs on CPU: about 14 min of training, 33 min in all, on 2 cores. Usage::

    python scripts/safety_tune.py                 # everything, seed 0, 2 torch threads: the shipped adapter, exactly
    python scripts/safety_tune.py --reuse-data    # keep the shipped training data, retrain only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.studies.refusal.data import DATA_DIR  # noqa: E402
from helpers.studies.refusal.safety_tuning import SafetyTuningConfig, run_safety_tuning  # noqa: E402


def main() -> None:
    defaults = SafetyTuningConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--decision-weight", type=float, default=defaults.decision_token_weight,
                        help="loss weight of the first response token")
    parser.add_argument("--harmless-weight", type=float, default=defaults.harmless_weight,
                        help="loss weight of harmless examples")
    parser.add_argument("--lora-depth", type=float, default=defaults.lora_depth,
                        help="fraction of the blocks, from the bottom, that get LoRA matrices (1.0: all)")
    parser.add_argument("--lora-first-block", type=int, default=defaults.lora_first_block,
                        help="the lowest block that gets LoRA matrices (0: from the bottom)")
    parser.add_argument("--general-requests", type=int, default=defaults.general_requests,
                        help="general requests the base model samples itself and answers, mixed in (0: none)")
    parser.add_argument("--no-voice-train", dest="voice_train", action="store_false",
                        help="leave out voice_train.jsonl's requests in six further voices")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: the shipped data folder)")
    parser.add_argument("--reuse-data", action="store_true",
                        help="train on the existing safety_tuning_data.jsonl instead of regenerating it")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    config = SafetyTuningConfig(seed=args.seed, threads=args.threads, epochs=args.epochs, rank=args.rank,
                                learning_rate=args.lr, decision_token_weight=args.decision_weight,
                                harmless_weight=args.harmless_weight, lora_depth=args.lora_depth,
                                lora_first_block=args.lora_first_block, general_requests=args.general_requests,
                                voice_train=args.voice_train)
    report = run_safety_tuning(config, out_dir=args.out, reuse_training_data=args.reuse_data)
    print(report.to_markdown())


if __name__ == "__main__":
    main()
