"""Benchmark: helpers.patching vs transformer_lens.patching on the embedded model (same sweeps).

Runs, in one process, on IOI-style prompts (no padding, so TransformerLens' functions, which take a
bare token tensor, see exactly the same input):

* the per-head output sweep (``hook_z``, all positions)  — ``[layer, head]``;
* the per-(layer, position) ``resid_pre`` sweep          — ``[layer, pos]``;

once with ``helpers.patching`` and once with ``transformer_lens.patching``, checks that the results
agree (max |difference| ≤ 1e-4), and prints the time per sweep and the speed-up. It also times
attribution patching (one forward + one backward) relative to one plain forward pass.

Usage::

    OMP_NUM_THREADS=2 MI_PROFILE=embedded python benchmarks/patching.py [--prompts 4] [--threads 2]

Record the output in benchmarks/README.md with the machine, the date and the load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching's progress bars (read at import)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAMES = [" Mary", " John", " Alice", " Bob", " Tom", " James", " Sarah", " David", " Anna", " Paul", " Lisa", " Mark"]
TEMPLATES = [  # all 16 tokens long with BOS, so that no prompt needs padding
    "When{A} and{B} went to the store,{B} gave a cold drink to",
    "When{A} and{B} went to the park,{B} gave a small ball to",
    "After{A} and{B} arrived at the house,{B} handed a red book to",
    "Then,{A} and{B} went to the office.{B} gave a letter to",
]


def ioi_batches(model, n_prompts: int, corruption: str = "abc"):
    """Clean IOI prompts, corrupted versions and (indirect object, subject) answer ids.

    ``corruption="abc"``: all three name slots get other names (the IOI paper's ABC distribution; the
    prompts differ from the second token on). ``"s2"``: only the second mention of the subject is
    replaced (the prompts share everything before it).
    """
    from helpers.prompts import single_token_id, tokenize

    clean, corrupted, answers = [], [], []
    for i in range(n_prompts):
        template = TEMPLATES[i % len(TEMPLATES)]
        a, b = NAMES[(2 * i) % len(NAMES)], NAMES[(2 * i + 1) % len(NAMES)]
        c, d, e = (NAMES[(2 * i + k) % len(NAMES)] for k in (4, 5, 6))
        clean.append(template.format(A=a, B=b))
        if corruption == "abc":
            corrupted.append(template.replace("{B} gave", "{C} gave").replace("{B} handed", "{C} handed")
                             .format(A=d, B=e, C=c))
        elif corruption == "s2":
            corrupted.append(template.replace("{B} gave", "{C} gave").replace("{B} handed", "{C} handed")
                             .format(A=a, B=b, C=c))
        else:
            raise ValueError(f"corruption must be 'abc' or 's2', got {corruption!r}")
        answers.append([single_token_id(model, a), single_token_id(model, b)])
    both = tokenize(model, clean + corrupted)
    if not bool(both.attention_mask.all()):
        raise RuntimeError("benchmark prompts must all have the same token length (no padding)")
    return both[:n_prompts], both[n_prompts:], torch.tensor(answers, device=both.tokens.device)


def timed(fn, repeats: int = 1):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--corruption", choices=["abc", "s2"], default="abc",
                        help="abc: all names replaced (prompts differ from token 2 on); s2: only the second subject")
    parser.add_argument("--skip-tl", action="store_true", help="time helpers only")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformer_lens import patching as tl_patching

    from helpers import attribution, metrics, patching
    from helpers.models import load_model, model_display_name

    model = load_model(args.model, device="cpu")
    clean, corrupted, answers = ioi_batches(model, args.prompts, args.corruption)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean.tokens)
        corrupted_logits = model(corrupted.tokens)
    clean_ld = metrics.logit_diff(clean_logits, answers).item()
    corrupted_ld = metrics.logit_diff(corrupted_logits, answers).item()
    metric = metrics.make_logit_diff_metric(answers, clean, clean_value=clean_ld, corrupted_value=corrupted_ld)

    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    first = int((clean.tokens != corrupted.tokens).any(0).nonzero()[0])
    print(f"model: {model_display_name(model)}; {args.prompts} prompts x {clean.tokens.shape[1]} tokens; "
          f"corruption {args.corruption!r} (first differing position {first})")
    print(f"clean logit diff {clean_ld:.3f}, corrupted {corrupted_ld:.3f}")

    with torch.no_grad():
        _, forward_s = timed(lambda: model(corrupted.tokens), repeats=3)
    print(f"one forward pass: {forward_s * 1000:.0f} ms")

    rows = []
    sweeps = {
        "heads (z, all positions) [layer, head]": (
            lambda: patching.patch_heads(model, clean, corrupted, metric, activation="z", progress=False).values,
            lambda: tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupted.tokens, clean_cache, metric),
        ),
        "resid_pre [layer, pos]": (
            lambda: patching.patch_residual(model, clean, corrupted, metric, site="resid_pre", progress=False).values,
            lambda: tl_patching.get_act_patch_resid_pre(model, corrupted.tokens, clean_cache, metric),
        ),
    }
    for name, (ours, theirs) in sweeps.items():
        with torch.no_grad():
            ours_values, ours_s = timed(ours)
            print(f"{name}: helpers {ours_s:.1f} s", flush=True)
            if args.skip_tl:
                continue
            tl_values, tl_s = timed(theirs)
        diff = (ours_values - tl_values.cpu()).abs().max().item()
        rows.append((name, ours_s, tl_s, diff))
        print(f"{name}: transformer_lens {tl_s:.1f} s, speed-up {tl_s / ours_s:.1f}x, max |diff| {diff:.2e}",
              flush=True)
        if diff > 1e-4:
            raise SystemExit(f"results disagree on {name}: max |diff| = {diff}")

    for component in ("heads", "resid"):
        _, attr_s = timed(lambda: attribution.attribution_patch(model, clean, corrupted, metric, component=component))
        print(f"attribution patching ({component}), incl. caching both runs: {attr_s * 1000:.0f} ms = "
              f"{attr_s / forward_s:.1f} forward passes")

    if rows:
        print("\n| sweep | helpers (s) | transformer_lens (s) | speed-up | max abs diff |")
        print("|---|---|---|---|---|")
        for name, ours_s, tl_s, diff in rows:
            print(f"| {name} | {ours_s:.1f} | {tl_s:.1f} | {tl_s / ours_s:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
