"""Find the L1 coefficient at which a ReLU SAE is as sparse as the SAE notebook's TopK SAE (L0 = k = 32).

The paper compares TopK and ReLU SAEs at matched sparsity. A ReLU SAE's L0 is whatever its L1 penalty leaves
after training, so the notebook's ReLU SAE repeated over seeds (``SEED_L1``) was picked with this script: it
trains ReLU SAEs at each coefficient given, with the notebook's exact settings for a profile (same corpus
windows, layer, dictionary size, batch size, epochs, learning rate, seed 0), and prints each one's L0 and FVU
on the held-out windows, as the notebook measures them.

    python scripts/match_relu_l0.py --profile embedded 0.004 0.005 0.006
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.models import load_model  # noqa: E402
from helpers.sae import collect_activations, fraction_of_variance_unexplained, l0, train_sae  # noqa: E402
from helpers.studies.sparse_autoencoders import corpus_windows, sae_grid  # noqa: E402

# the notebook's sizes per profile (notebooks/07_sparse_autoencoders.ipynb, "Parameters")
SIZES = {
    "embedded": dict(n_train=1961, n_eval=32, expansion=4, batch_size=256, epochs=1),
    "ci": dict(n_train=48, n_eval=8, expansion=2, batch_size=128, epochs=4),
}
SEQ_LEN, SEED_K = 256, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("l1", type=float, nargs="+", help="L1 coefficients to train")
    parser.add_argument("--profile", choices=sorted(SIZES), default="embedded")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = SIZES[args.profile]
    model = load_model("embedded", device="cpu")
    hook = f"blocks.{model.cfg.n_layers // 2}.hook_mlp_out"
    train_windows, eval_windows = corpus_windows(model, sizes["n_train"], sizes["n_eval"], SEQ_LEN, seed=0)
    t0 = time.time()
    activations = collect_activations(model, train_windows, hook)
    held_out = collect_activations(model, eval_windows, hook)
    print(f"{hook}: {activations.shape[0]:,} training tokens ({time.time() - t0:.0f} s)", flush=True)
    grid = sae_grid(model.cfg.d_model, n_latents=sizes["expansion"] * model.cfg.d_model, ks=(SEED_K,),
                    relu_l1=tuple(args.l1), seed_k=SEED_K, seed_l1=args.l1[0], seeds=(0, 1), sizes=(),
                    batch_size=sizes["batch_size"], epochs=sizes["epochs"])
    print(f"| profile | L1 coefficient | held-out L0 | held-out FVU | seconds |\n|---|---|---|---|---|")
    for entry in grid:
        if entry.part != "frontier" or entry.config.activation != "relu":
            continue
        t0 = time.time()
        sae = train_sae(activations, entry.config).sae
        with torch.no_grad():
            out = sae(held_out)
        print(f"| {args.profile} | {entry.config.l1_coefficient:g} | {float(l0(out.latents)):.1f} | "
              f"{float(fraction_of_variance_unexplained(held_out, out.reconstruction)):.3f} | {time.time() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
