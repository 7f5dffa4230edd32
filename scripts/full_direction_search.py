"""The paper's full refusal-direction search on the shipped safety-tuned SmolLM2, as a record.

The refusal notebook's ``embedded`` profile scores every post-instruction position at layers 11, 14,
17 and 20 (``CANDIDATE_LAYERS``), to stay near 20 min on a CPU. Arditi et al. score every position at
every layer. This script runs that full search with the notebook's own ``embedded`` inputs — the
difference of means on its 300 train prompts per side, massive-activation dimensions zeroed, the
paper's filters (KL ≤ 0.1, steering score ≥ 0, last 20% of layers pruned) on its 32 val prompts per
side — and writes what the notebook's reading of the misses quotes: how many candidates pass the KL
filter, whether any of them steers, and the KL range of those that steer.

Output: ``--out`` (a JSON summary with the whole selection table) and, beside it, the same table as
CSV. About 33 min with 2 threads on the 2-core CPU.

    python scripts/full_direction_search.py --out build/full_direction_search.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# The refusal notebook's embedded-profile sizes and filters (notebooks/03_refusal_direction.ipynb, cell 4).
N_TRAIN, N_VAL = 300, 32
KL_THRESHOLD, STEERING_THRESHOLD, PRUNE_LAYER_FRACTION = 0.1, 0.0, 0.2


def summarize(table, *, kl_threshold: float, steering_threshold: float) -> dict:
    """What the search found, from a :class:`~helpers.studies.refusal.direction.DirectionSelection` table.

    Counts only scored candidates (the pruned last layers have NaN scores). ``passing_kl``: KL ≤
    ``kl_threshold``; ``steering``: steering score ≥ ``steering_threshold``; ``passing_both``: the
    candidates the paper's filters keep.
    """
    scored = table[table["kl"].notna()]
    passes_kl = scored["kl"] <= kl_threshold
    steers = scored["steering_score"] >= steering_threshold
    steering = scored[steers]
    summary = {
        "n_scored": int(len(scored)),
        "n_passing_kl": int(passes_kl.sum()),
        "n_steering": int(steers.sum()),
        "n_passing_both": int((passes_kl & steers).sum()),
        "steering_score_range_of_kl_passing": _range(scored.loc[passes_kl, "steering_score"]),
        "kl_range_of_steering": _range(steering["kl"]),
        "steering_candidates": [(int(p), int(l)) for p, l in zip(steering["position"], steering["layer"])],
    }
    return summary


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 of the adapter's weights file: which adapter a recorded search was run on."""
    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()


def _range(values) -> list[float] | None:
    return [round(float(values.min()), 4), round(float(values.max()), 4)] if len(values) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON summary; the table goes beside it as .csv")
    parser.add_argument("--adapter", type=Path, default=None, help="adapter directory (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from helpers.studies.refusal import direction as refusal
    from helpers.studies.refusal.safety_tuning import ADAPTER_DIR, load_safety_tuned_model

    t0 = time.time()
    adapter = args.adapter or ADAPTER_DIR
    model = load_safety_tuned_model(device="cpu", adapter_dir=adapter)
    splits = refusal.load_instructions()
    train = {k: refusal.spread_evenly(v, N_TRAIN, f"train split, {k}") for k, v in splits["train"].items()}
    val = {k: refusal.spread_evenly(v, N_VAL, f"val split, {k}") for k, v in splits["val"].items()}
    candidates = refusal.candidate_directions(model, train["harmful"], train["harmless"])
    massive = refusal.massive_activation_dims(model, train["harmless"][:16])
    if massive:
        candidates = candidates.without_dims([m.dim for m in massive])
    selection = refusal.select_direction(
        model, candidates, val["harmful"], val["harmless"], layers=None, positions=None,
        kl_threshold=KL_THRESHOLD, steering_threshold=STEERING_THRESHOLD,
        prune_layer_fraction=PRUNE_LAYER_FRACTION, if_none_pass="lowest_kl")
    table = selection.table
    result = {
        "adapter": "shipped (helpers/data/refusal/adapter)" if args.adapter is None else str(args.adapter),
        "adapter_sha256": adapter_sha256(adapter),
        "n_train": N_TRAIN, "n_val": N_VAL, "kl_filter": KL_THRESHOLD,
        "steering_filter": STEERING_THRESHOLD, "prune_layer_fraction": PRUNE_LAYER_FRACTION,
        "massive_dims": [m.dim for m in massive],
        "post_instruction_tokens": list(candidates.position_tokens),
        **summarize(table, kl_threshold=KL_THRESHOLD, steering_threshold=STEERING_THRESHOLD),
        "chosen": {"position": selection.position, "layer": selection.layer, "fallback": selection.fallback},
        "threads": args.threads,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    # the template token of each position is in the summary (post_instruction_tokens); in the CSV, tokens such as
    # "\n" would make multi-line fields
    table.drop(columns="token").round(4).to_csv(args.out.with_suffix(".csv"), index=False)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
