"""Where the shipped safety-tuning adapter refuses, on whole held-out sets, by kind of request.

The refusal notebook evaluates fixed-size samples; this script reads the whole sets once, so the data README
and the main README can quote them:

* harmless test split: *contrast* requests (a harm category's topic words) vs ordinary ones;
* style-shift set: each voice, both sides;
* HarmBench's 200 standard behaviours: each semantic category.

Greedy, 32 new tokens, the paper's substring judge (as the adapter's training report). Writes
``helpers/data/refusal/adapter_refusal_by_group.json`` (or ``--out``)::

    python scripts/adapter_refusal_by_group.py            # the shipped adapter
    python scripts/adapter_refusal_by_group.py --base     # the untuned embedded model, for the judge's base rate
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from helpers.studies.refusal.data import (DATA_DIR, load_harmbench_requests, load_split_requests,  # noqa: E402
                                          load_style_shift_requests, request_group)
from helpers.studies.refusal.direction import ConditionResult, refusal_by_group  # noqa: E402
from helpers.studies.refusal.judges import refusal_rate  # noqa: E402
from helpers.studies.refusal.safety_tuning import hf_generate_greedy, load_merged_hf  # noqa: E402


def rates_by_group(requests, completions) -> dict[str, dict[str, float | int]]:
    """``{"all": {...}, group: {"refusal": rate, "n": count}, ...}`` for one set (substring judge), from
    :func:`helpers.studies.refusal.direction.refusal_by_group` with each request's own group."""
    if len(requests) != len(completions):
        raise ValueError(f"rates_by_group: {len(requests)} requests but {len(completions)} completions.")
    condition = ConditionResult("whole set", [r.text for r in requests], list(completions), refusal_rate(completions),
                                float("nan"))
    table = refusal_by_group(condition, groups=[request_group(r) for r in requests]).sort_index()
    out = {"all": {"refusal": round(condition.refusal_rate, 3), "n": len(requests)}}
    out.update({group: {"refusal": round(float(row.substring), 3), "n": int(row.n)} for group, row in table.iterrows()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="store_true", help="the untuned embedded model instead of the adapter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.base:
        from helpers.models import _load_embedded_hf
        model, tokenizer = _load_embedded_hf(torch.float32)
        model.eval()
    else:
        model, tokenizer = load_merged_hf()
    style = load_style_shift_requests()
    sets = {"test harmless": load_split_requests()["test"]["harmless"],
            "style-shift harmless": [r for r in style if r.kind == "harmless"],
            "style-shift harmful": [r for r in style if r.kind == "harmful"],
            "HarmBench": load_harmbench_requests()}
    result = {"model": "base (untuned)" if args.base else "shipped adapter (helpers/data/refusal/adapter)",
              "date": dt.date.today().isoformat(), "max_new_tokens": 32, "judge": "substring", "torch_threads": args.threads}
    for name, requests in sets.items():
        completions = hf_generate_greedy(model, tokenizer, [r.text for r in requests], max_new_tokens=32, desc=name)
        result[name] = rates_by_group(requests, completions)
    result["seconds"] = round(time.time() - start, 1)
    out = args.out or DATA_DIR / ("base_refusal_by_group.json" if args.base else "adapter_refusal_by_group.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
