"""Train the SAE that the SAE notebook's ``ci`` profile reads its single latents from (``make sae-checkpoint``).

The embedded model (SmolLM2-135M-Instruct), the output of MLP layer 15 of 30 (``blocks.15.hook_mlp_out``), the
same ~500k training tokens of the offline corpus as the notebook's ``embedded`` profile
(:func:`helpers.studies.sparse_autoencoders.corpus_windows`: 1,960 windows of 256 tokens after the 32 held-out
ones, seed 0, BOS left out),
a TopK SAE with k = 32 and 2,304 latents (4 × d_model), seed 0, one pass. Written to
``helpers/data/sae/smollm2-mlp15-topk32/`` (float16, sparsify's layout, 5.3 MB) with what it was trained on in
``cfg.json``'s ``metadata``. Deterministic on CPU for a fixed thread count.

    python scripts/train_sae_checkpoint.py              # the shipped file (1 thread)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.models import load_model  # noqa: E402
from helpers.sae import collect_activations, fraction_of_variance_unexplained, l0, save_sae, train_sae  # noqa: E402
from helpers.studies.sparse_autoencoders import SHIPPED_SAE_DIR, corpus_windows, sae_grid  # noqa: E402

LAYER, SEQ_LEN, N_TRAIN, N_EVAL = 15, 256, 1960, 32
TRAINING = dict(batch_size=256, epochs=1)  # the notebook's embedded settings (lr: sparsify's default for the size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=SHIPPED_SAE_DIR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model("embedded", device="cpu")
    hook = f"blocks.{LAYER}.hook_mlp_out"
    train_windows, eval_windows = corpus_windows(model, N_TRAIN, N_EVAL, SEQ_LEN, seed=0)
    acts = collect_activations(model, train_windows, hook)
    t_collect = time.time() - t0
    entry = next(e for e in sae_grid(model.cfg.d_model, n_latents=4 * model.cfg.d_model, ks=(32,), relu_l1=(0.003,),
                                     seed_k=32, seed_l1=0.003, seeds=(0, 1), sizes=(), **TRAINING)
                 if e.config.activation == "topk")
    result = train_sae(acts, entry.config)
    held_out = collect_activations(model, eval_windows, hook)
    with torch.no_grad():
        out = result.sae(held_out)
    metadata = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)", "hook": hook, "corpus": "offline Wikipedia (gensim)",
        "windows": f"corpus_windows(model, {N_TRAIN}, {N_EVAL}, {SEQ_LEN}, seed=0): the {N_TRAIN} training windows "
                   f"(the first {N_EVAL} of the shuffled corpus are held out)",
        "training_tokens": int(acts.shape[0]), "held_out_fvu": round(float(fraction_of_variance_unexplained(held_out, out.reconstruction)), 4),
        "held_out_l0": round(float(l0(out.latents)), 2), "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(),
        "seconds_collect": round(t_collect, 1), "seconds_total": round(time.time() - t0, 1),
        "made": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    save_sae(result.sae, entry.config, args.out, dtype=torch.float16, metadata=metadata)
    print(metadata)


if __name__ == "__main__":
    main()
