"""How fast is the grokking training loop? (issue 4, "Speed")

Measures, in one process and with the same thread count:

1. the machine's own float32 matmul throughput, on the shapes a training step multiplies
   (``[3830, 128] @ [128, 512]`` and ``[3830, 512] @ [512, 128]``), best of several repeats;
2. steps per second of our loop (``helpers.studies.grokking.training.train``: last-position-only model, full batch,
   AdamW, float64 loss);
3. steps per second of the loop a new user would write: a ``TransformerBridge.boot_native`` model of
   the same config, ``bridge(train_tokens)[:, -1]``, the same loss and optimizer;

and prints our time per step over the *floor*: the step's matmul FLOPs
(``helpers.studies.grokking.training.step_flops``, forward + backward) divided by the measured throughput.
Targets: ≥ 2× faster than the plain bridge loop, within 2× of the floor on CPU, and on a GPU the
full 40,000-epoch run with progress measures in under a minute (``--full-gpu-run``; without a GPU
the script says so instead of printing a number).

Usage::

    python benchmarks/grokking.py                    # 1 thread, 40 timed steps each
    python benchmarks/grokking.py --threads 2 --steps 100
    python benchmarks/grokking.py --full-gpu-run     # on a machine with CUDA

On a shared machine the numbers are noisy: the script prints the load average next to them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.studies.grokking.training import (  # noqa: E402
    GrokkingConfig,
    cross_entropy_float64,
    make_dataset,
    step_flops,
    to_bridge,
    GrokkingTransformer,
    train,
)


def matmul_throughput(device: str, repeats: int = 30) -> float:
    """Best measured float32 GFLOP/s over the step's two big matmul shapes."""
    best = 0.0
    for m, k, n in ((3830, 128, 512), (3830, 512, 128)):
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        for _ in range(5):
            a @ b
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            _sync(device)
            seconds = (time.perf_counter() - start) / repeats
            best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_our_loop(config: GrokkingConfig, steps: int, device: str) -> float:
    """Seconds per full-batch step of helpers.studies.grokking.training.train (after 5 warm-up steps)."""
    train(config, seeds=(0,), n_epochs=5, device=device, keep_snapshots=False, progress=False)
    run = train(config, seeds=(0,), n_epochs=steps, device=device, keep_snapshots=False, progress=False)
    return run.seconds / steps


def time_bridge_loop(config: GrokkingConfig, steps: int, device: str) -> float:
    """Seconds per full-batch step of a plain loop over a TransformerBridge.boot_native model."""
    bridge = to_bridge(GrokkingTransformer(config, seeds=(0,)), device=device).train()
    for parameter in bridge.parameters():
        parameter.requires_grad_(True)
    data = make_dataset(config.p, config.frac_train, 0).to(device)
    tokens, labels = data.tokens[data.train_indices], data.labels[data.train_indices]
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)

    def step() -> None:
        loss = cross_entropy_float64(bridge(tokens)[:, -1], labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def full_gpu_run(config: GrokkingConfig) -> None:
    """The whole 40k-epoch run plus progress measures on CUDA, timed end to end."""
    from helpers.studies.grokking.fourier import key_frequencies_of, progress_measures

    start = time.perf_counter()
    run = train(config, seeds=(0,), device="cuda", progress=False)
    keys, _ = key_frequencies_of(run.model, run.data[0])
    history = progress_measures(run, [keys], chunk_models=32, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"GPU full run: {config.n_epochs} epochs + progress measures in {seconds:.1f} s "
          f"(training {run.seconds:.1f} s); key frequencies {keys}; final test accuracy "
          f"{history['test_accuracy'][-1, 0]:.4f}; target < 60 s: {'met' if seconds < 60 else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop (default 40)")
    parser.add_argument("--device", default="cpu", help="device for the loop comparison (default cpu)")
    parser.add_argument("--full-gpu-run", action="store_true", help="also time the full 40k-epoch run on CUDA")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = GrokkingConfig()
    n_train = int(config.frac_train * config.p ** 2)
    print(f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (on a shared machine timings are noisy)")

    throughput = matmul_throughput(args.device)
    ours = time_our_loop(config, args.steps, args.device)
    bridge = time_bridge_loop(config, args.steps, args.device)
    flops = step_flops(config, n_train)
    flops_full = step_flops(config, n_train, last_position_only=False)
    floor = flops / (throughput * 1e9)

    print(f"float32 matmul throughput (step shapes): {throughput:.1f} GFLOP/s")
    print(f"step FLOPs: ours {flops / 1e9:.2f} GFLOP (last position only); "
          f"all-positions model {flops_full / 1e9:.2f} GFLOP")
    print(f"our loop:          {ours * 1e3:7.1f} ms/step ({1 / ours:6.1f} steps/s)  "
          f"-> 40k epochs ≈ {ours * config.n_epochs / 60:.0f} min")
    print(f"plain bridge loop: {bridge * 1e3:7.1f} ms/step ({1 / bridge:6.1f} steps/s)  "
          f"-> 40k epochs ≈ {bridge * config.n_epochs / 60:.0f} min")
    print(f"speed-up over the bridge loop: {bridge / ours:.2f}x  (target >= 2x: {'met' if bridge / ours >= 2 else 'NOT met'})")
    print(f"floor (our FLOPs / throughput): {floor * 1e3:.1f} ms/step; ours / floor = {ours / floor:.2f}x  "
          f"(target <= 2x on CPU: {'met' if ours / floor <= 2 else 'NOT met'})")

    if args.full_gpu_run:
        if torch.cuda.is_available():
            full_gpu_run(config)
        else:
            print("GPU full run: no GPU (torch.cuda.is_available() is False), target not measured.")
    elif not torch.cuda.is_available():
        print("GPU target (40k epochs + progress measures < 1 min): no GPU here, not measured.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
