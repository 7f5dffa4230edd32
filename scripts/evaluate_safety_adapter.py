"""Evaluate a safety-tuning adapter the way the refusal notebook does, at a fixed, smaller size.

Used to compare tuning recipes (``scripts/safety_recipes.py``) on the numbers the study needs,
not only on refusal rates: is the learned refusal carried by one difference-of-means direction
that passes the paper's filters, and what does ablating it cost?

Protocol (every recipe the same): difference of means on the whole train split; selection as the
paper (ablation refusal score, steering score ≥ 0, KL ≤ ``--kl``, last 20% of layers pruned; when no
candidate passes, the steering candidate with the lowest KL, flagged as such) over
every post-instruction position and the layers ``--layers`` (8, 11, …, 20), on 16 val prompts per
side, with the massive-activation dimensions zeroed (the notebook's default); then, on 64 test
prompts and 35 style-shift prompts per side, refusal rates (substring judge, greedy) without intervention, under directional
ablation, under activation addition, and under ACE (ablation to the harmless mean's coordinate,
steering to the harmful mean's), plus harmless KL and Wikipedia loss under each ablation; and on
64 HarmBench standard behaviours (harmful requests written by another team; harmful only), refusal
without intervention, under ablation and under ACE.

    python scripts/evaluate_safety_adapter.py --adapter build/recipes/A/adapter --out build/recipes/A/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kl", type=float, default=0.1, help="the selection's KL filter (paper: 0.1)")
    parser.add_argument("--layers", default="8:23:3", help="start:stop:step of the candidate layers")
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=64, help="test prompts per side")
    parser.add_argument("--n-style", type=int, default=35, help="style-shift prompts per side")
    parser.add_argument("--n-harmbench", type=int, default=64, help="HarmBench standard behaviours (harmful only)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from helpers.studies.refusal import direction as refusal
    from helpers.ablation import (activation_addition_hooks, affine_ablation_hooks, affine_steering_hooks,
                                  direction_ablation_hooks)
    from helpers.corpus import load_corpus_tokens
    from helpers.studies.refusal.data import load_harmbench
    from helpers.studies.refusal.safety_tuning import load_safety_tuned_model

    t0 = time.time()
    model = load_safety_tuned_model(device="cpu", adapter_dir=args.adapter)
    splits = refusal.load_instructions()
    val = {k: refusal.spread_evenly(v, args.n_val, "val") for k, v in splits["val"].items()}
    sets = {"test": {k: refusal.spread_evenly(v, args.n_test, "test") for k, v in splits["test"].items()},
            "style-shift": refusal.load_study_style_shift(args.n_style),
            "harmbench": {"harmful": refusal.spread_evenly(load_harmbench(), args.n_harmbench, "HarmBench")}}
    candidates = refusal.candidate_directions(model, splits["train"]["harmful"], splits["train"]["harmless"])
    massive = refusal.massive_activation_dims(model, splits["train"]["harmless"][:16])
    if massive:
        candidates = candidates.without_dims([m.dim for m in massive])
    start, stop, step = (int(x) for x in args.layers.split(":"))
    try:
        selection = refusal.select_direction(model, candidates, val["harmful"], val["harmless"],
                                             layers=range(start, stop, step), kl_threshold=args.kl,
                                             if_none_pass="lowest_kl")
    except RuntimeError as err:  # not one candidate steers: there is no direction to evaluate further
        scored = err.args[1] if len(err.args) > 1 else None
        result = {"adapter": str(args.adapter), "kl_filter": args.kl, "selection_failed": str(err.args[0]),
                  "massive_dims": [m.dim for m in massive], "seconds": round(time.time() - t0, 1)}
        if scored is not None:
            result["largest_steering_score"] = float(scored["steering_score"].max())
            result["n_candidates_scored"] = int(scored["kl"].notna().sum())
            result["selection_table"] = scored.drop(columns=["discarded"]).round(4).to_dict(orient="records")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "selection_table"}, indent=1))
        return
    table = selection.table
    r, layer, position = selection.direction, selection.layer, selection.position
    chosen = table.set_index(["position", "layer"]).loc[(position, layer)]
    coords = refusal.mean_coordinates(candidates, position, r)
    interventions = {
        "ablation": direction_ablation_hooks(model, r),
        "addition": activation_addition_hooks(model, r, layer),
        "ace_ablation": affine_ablation_hooks(model, r, coords["harmless"]),
        "ace_steering": affine_steering_hooks(model, r, float(coords["harmful"][layer]), layer),
    }
    result: dict = {"adapter": str(args.adapter), "kl_filter": args.kl, "position": position, "layer": layer,
                    "fallback": selection.fallback,
                    "val_kl": float(chosen["kl"]), "val_ablation_score": float(chosen["ablation_refusal_score"]),
                    "massive_dims": [m.dim for m in massive],
                    "n_pass_kl_0.1": int(((table["kl"] <= 0.1) & (table["steering_score"] >= 0)).sum()),
                    "harmless_mean_coordinate": float(coords["harmless"][layer]),
                    "harmful_mean_coordinate": float(coords["harmful"][layer])}
    for set_name, sides in sets.items():
        for kind, hooks_name in (("harmful", None), ("harmless", None), ("harmful", "ablation"),
                                 ("harmful", "ace_ablation"), ("harmless", "addition"), ("harmless", "ace_steering")):
            if kind not in sides:  # HarmBench has harmful requests only
                continue
            hooks = interventions[hooks_name] if hooks_name else []
            completions = refusal.generate_completions(model, sides[kind], max_new_tokens=args.new_tokens,
                                                       fwd_hooks=hooks, desc=f"{set_name} {kind} {hooks_name}")
            result[f"{set_name} {kind} {hooks_name or 'none'}"] = refusal.refusal_rate(completions)
    corpus = load_corpus_tokens(model, 16, 128, seed=0, source="wikipedia")
    for name in ("ablation", "ace_ablation"):
        cost = refusal.intervention_cost(model, interventions[name], sets["test"]["harmless"], corpus)
        result[f"{name} harmless test KL"] = cost.kl
        result[f"{name} wikipedia loss increase"] = cost.loss_increase
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
