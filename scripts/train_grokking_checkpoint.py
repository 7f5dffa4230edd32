"""Regenerate the grokking checkpoint and training history used by the notebook's ``ci`` profile.

Trains the paper's model (``helpers.studies.grokking.training.GrokkingConfig()``, seed 0) for 40,000 epochs with
``helpers.studies.grokking.training.train``, finds the key frequencies of the final model, computes the progress
measures every 100 epochs with ``helpers.studies.grokking.fourier.progress_measures`` and writes

* ``helpers/data/grokking/checkpoint.pt`` – final weights (float32), config, key frequencies, metadata;
* ``helpers/data/grokking/history.npz``    – progress measures every 100 epochs + per-epoch train loss.

Usage (from the repository root)::

    python scripts/train_grokking_checkpoint.py                 # the committed files, ~40-60 min on 1 CPU core
    python scripts/train_grokking_checkpoint.py --threads 2     # faster on an idle machine
    python scripts/train_grokking_checkpoint.py --epochs 2000 --out /tmp/grok   # a quick look

Deterministic on CPU for a fixed thread count.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.studies.grokking.fourier import locate_phases, measure_run  # noqa: E402
from helpers.studies.grokking.training import (  # noqa: E402
    DATA_DIR,
    GrokkingConfig,
    GrokkingTransformer,
    TrainingRun,
    make_dataset,
    save_checkpoint,
    save_history,
    train,
)


def run_from_snapshots(path: Path, config: GrokkingConfig, seed: int) -> TrainingRun:
    """Rebuild a finished run from a ``--snapshots`` file (to recompute the measures without retraining)."""
    stored = torch.load(path, map_location="cpu", weights_only=False)
    snapshots = stored["snapshots"]
    final = GrokkingTransformer(config, (seed,), params={k: v[-1] for k, v in snapshots.items()})
    final.requires_grad_(False)
    return TrainingRun(config, final, [make_dataset(config.p, config.frac_train, seed)], stored["train_loss"],
                       stored["epochs"], snapshots, stored.get("seconds"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=GrokkingConfig().n_epochs, help="training epochs (default 40000)")
    parser.add_argument("--p", type=int, default=GrokkingConfig().p, help="modulus (default 113, the paper's)")
    parser.add_argument("--frac-train", type=float, default=GrokkingConfig().frac_train,
                        help="fraction of pairs used for training (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data-split seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    parser.add_argument("--snapshots", type=Path, default=None,
                        help="also save all parameter snapshots here (large: ~0.9 MB per 100 epochs)")
    parser.add_argument("--from-snapshots", type=Path, default=None,
                        help="skip training: recompute measures and files from a --snapshots file")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="with --from-snapshots: the training time to record (if the snapshot file lacks it)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = GrokkingConfig(p=args.p, frac_train=args.frac_train, n_epochs=args.epochs)
    started = time.perf_counter()
    if args.from_snapshots is not None:
        run = run_from_snapshots(args.from_snapshots, config, args.seed)
        if run.seconds is None:
            run.seconds = args.train_seconds
    else:
        run = train(config, seeds=(args.seed,), device=args.device, progress=True)
        print(f"trained {args.epochs} epochs in {run.seconds:.0f} s ({run.seconds / max(args.epochs, 1) * 1e3:.1f} ms/epoch)")
        if args.snapshots is not None:
            args.snapshots.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"snapshots": {k: v.cpu() for k, v in run.snapshots.items()}, "epochs": run.checkpoint_epochs,
                        "train_loss": run.train_loss, "seconds": run.seconds}, args.snapshots)

    result = measure_run(run, progress=True)
    history = result.history
    keys = result.key_frequencies[0]
    print(f"key frequencies: {keys}; neurons per frequency: {result.clusters[0].counts(keys)}")
    metadata = {
        "key_frequencies": keys,
        "epochs": int(run.train_loss.shape[0]),
        "seed": args.seed,
        "train_seconds": None if run.seconds is None else round(run.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "threads": args.threads,
        "device": str(args.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "final_train_loss": float(history["train_loss"][-1]),
        "final_test_loss": float(history["test_loss"][-1]),
        "final_test_accuracy": float(history["test_accuracy"][-1]),
    }
    try:
        phases = locate_phases(history["epoch"], history["train_loss"], history["test_loss"], history["test_accuracy"])
        metadata["phases"] = phases.as_dict()
        print(f"phases: {phases}")
    except ValueError as err:
        print(f"no phases: {err}")
    save_checkpoint(args.out / "checkpoint.pt", run.model, metadata)
    save_history(args.out / "history.npz", history)
    print(f"final train loss {metadata['final_train_loss']:.3g}, test loss {metadata['final_test_loss']:.3g}, "
          f"test accuracy {metadata['final_test_accuracy']:.4f}")
    for name in ("checkpoint.pt", "history.npz"):
        path = args.out / name
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
