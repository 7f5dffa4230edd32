"""Study helpers for notebook 07: SAEs on one site of the model, their sparsity/fidelity frontier, and how
many latents two seeds share (Paulo & Belrose 2025, *Sparse Autoencoders Trained on the Same Data Learn
Different Features*).

The generic parts (the SAE, training, metrics, matching, files, reading single latents) live in
:mod:`helpers.sae`; this module only arranges them the way the study does:

* :func:`sae_grid` — the SAEs one run trains: a **frontier** (TopK at several ``k`` plus ReLU + L1 SAEs,
  one size), **seeds** (the same TopK and ReLU configurations at other seeds) and **sizes** (TopK at other
  dictionary sizes, two seeds each). The profile picks the numbers; every profile trains the same kinds.
* :func:`train_grid` / :func:`evaluate_saes` — train them on one activation tensor; measure each on held-out
  tokens: L0, FVU, dead and dense latents, and the next-token loss with the reconstruction spliced in.
* :func:`seed_consistency` — for every pair of seeds of one configuration, the Hungarian matching and the
  fraction of shared latents (:func:`helpers.sae.shared_fraction`, the paper's rule).
* figures: :func:`frontier_figure`, :func:`similarity_histogram`, :func:`shared_fraction_figure`.
* :func:`load_shipped_sae` — the TopK SAE that ``make sae-checkpoint`` trains on the embedded model and the
  package ships (``helpers/data/sae/``); the ``ci`` profile reads its single latents from it, since an SAE
  trained on ``ci``'s few tokens is too coarse for that.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from helpers.packaged_files import HELPERS_DATA_DIR
from helpers.sae import (
    LatentMatch,
    SAEConfig,
    SparseAutoencoder,
    TrainResult,
    dead_and_dense,
    fraction_of_variance_unexplained,
    l0,
    latent_density,
    load_sae,
    match_latents,
    shared_fraction,
    spliced_loss,
    train_sae,
)

DATA_DIR = HELPERS_DATA_DIR / "sae"
SHIPPED_SAE_DIR = DATA_DIR / "smollm2-mlp15-topk32"
"""The SAE ``make sae-checkpoint`` writes (``scripts/train_sae_checkpoint.py``)."""

PAPER: dict[str, Any] = {
    # Paulo & Belrose 2025, abstract (arXiv 2501.16615): "in an SAE with 131K latents trained on a feedforward
    # network in Llama 3 8B, only 30% of the features were shared across different seeds".
    "shared_fraction_llama3_8b_131k": 0.30,
    # EleutherAI blog, "SAEs trained on the same data don't learn the same features" (2024-12-12), the paper's
    # precursor: TopK SAEs on the layer-6 MLP of Pythia-160m, 8B Pile tokens, same data order; "only 53% of latents
    # are shared across our two independently trained SAEs" (the 32k-latent pair of its Fig. 1).
    "shared_fraction_pythia160m_blog": 0.53,
    # the rule (blog): matched latents whose encoder AND decoder cosines both exceed 0.7
    "shared_threshold": 0.7,
}


@dataclass(frozen=True)
class GridEntry:
    """One SAE of the grid: its name, its config and the part of the study it belongs to."""

    name: str
    config: SAEConfig
    part: str  # "frontier", "seeds" or "sizes"
    family: str  # SAEs that differ only in their seed share a family


def _family(config: SAEConfig) -> str:
    if config.activation == "topk":
        return f"topk k={config.k} n={config.n_latents}"
    return f"relu l1={config.l1_coefficient:g} n={config.n_latents}"


def default_lr(n_latents: int) -> float:
    """EleutherAI sparsify's default Adam learning rate for a dictionary size: ``2e-4 / sqrt(n_latents / 2**14)``."""
    return 2e-4 / (n_latents / 2**14) ** 0.5


def sae_grid(d_in: int, *, n_latents: int, ks: Sequence[int], relu_l1: Sequence[float], seed_k: int,
             seed_l1: float, seeds: Sequence[int], sizes: Sequence[int], size_seeds: Sequence[int] = (0, 1),
             **training: Any) -> list[GridEntry]:
    """The SAEs of one run (names are unique and say what each is).

    * ``frontier``: TopK at every ``k`` of ``ks`` and ReLU + L1 at every coefficient of ``relu_l1``, all with
      ``n_latents`` latents and seed ``seeds[0]``;
    * ``seeds``: TopK ``k=seed_k`` and ReLU ``l1=seed_l1`` at every other seed of ``seeds``;
    * ``sizes``: TopK ``k=seed_k`` at every size of ``sizes`` (other than ``n_latents``), seeds ``size_seeds``.

    ``training`` goes to every :class:`SAEConfig` (``batch_size``, ``epochs``, …); without ``lr`` each SAE
    gets sparsify's default for its size (:func:`default_lr`).
    """
    if seed_k not in ks or seed_l1 not in relu_l1:
        raise ValueError(f"sae_grid: seed_k={seed_k} must be one of ks={list(ks)} and seed_l1={seed_l1} one of "
                         f"relu_l1={list(relu_l1)} (the seed study repeats a frontier SAE at other seeds).")
    if len(seeds) < 2:
        raise ValueError(f"sae_grid: seeds={list(seeds)}; the seed study needs at least two seeds.")
    base = dict(d_in=d_in, n_latents=n_latents, **training)
    scale_lr = "lr" not in training
    entries: list[GridEntry] = []

    def add(config: SAEConfig, part: str) -> None:
        if scale_lr:  # sparsify's default: 2e-4 / sqrt(n_latents / 2**14)
            config = replace(config, lr=default_lr(config.n_latents))
        entries.append(GridEntry(f"{_family(config)} seed={config.seed}", config, part, _family(config)))

    for k in ks:
        add(SAEConfig(activation="topk", k=k, seed=seeds[0], **base), "frontier")
    for l1 in relu_l1:
        add(SAEConfig(activation="relu", l1_coefficient=l1, seed=seeds[0], **base), "frontier")
    for seed in seeds[1:]:
        add(SAEConfig(activation="topk", k=seed_k, seed=seed, **base), "seeds")
        add(SAEConfig(activation="relu", l1_coefficient=seed_l1, seed=seed, **base), "seeds")
    for size in sizes:
        if size == n_latents:
            continue
        for seed in size_seeds:
            add(SAEConfig(activation="topk", k=min(seed_k, size), seed=seed, **{**base, "n_latents": size}), "sizes")
    return entries


def train_grid(activations: Float[Tensor, "n d"], grid: Sequence[GridEntry], *,
               device: torch.device | str | None = None) -> dict[str, TrainResult]:
    """Train every SAE of ``grid`` on ``activations`` (one progress bar over SAEs, one per SAE's steps)."""
    results: dict[str, TrainResult] = {}
    for entry in tqdm(grid, desc="training SAEs"):
        results[entry.name] = train_sae(activations, entry.config, device=device)
    return results


@torch.no_grad()
def evaluate_saes(model: Any, saes: Mapping[str, SparseAutoencoder], activations: Float[Tensor, "n d"],
                  batch: Any, hook_name: str, *, grid: Sequence[GridEntry] = (),
                  dense_above: float = 0.1) -> pd.DataFrame:
    """One row per SAE, measured on held-out ``activations`` (collected from ``batch`` at ``hook_name``).

    Columns: ``name``, ``part``, ``family``, ``activation``, ``n_latents``, ``k``, ``l1``, ``seed``, ``l0``,
    ``fvu``, ``dead`` (fraction of latents that never fire on the held-out tokens), ``dense`` (fraction
    firing on more than ``dense_above`` of them), and from :func:`helpers.sae.spliced_loss` ``loss_clean``,
    ``loss_spliced``, ``loss_increase``, ``loss_zero`` and ``fraction_recovered``.
    """
    parts = {e.name: e for e in grid}
    rows = []
    baselines = None
    for name, sae in tqdm(saes.items(), desc="evaluating SAEs", leave=False):
        out = sae(activations)
        dead, dense = dead_and_dense(latent_density(out.latents), dense_above=dense_above)
        loss = spliced_loss(model, batch, hook_name, lambda x, sae=sae: sae(x).reconstruction, baselines=baselines)
        baselines = baselines or loss  # clean and zeroed losses do not depend on the SAE
        config = sae.config
        entry = parts.get(name)
        rows.append({
            "name": name, "part": entry.part if entry else "", "family": entry.family if entry else _family(config),
            "activation": config.activation, "n_latents": config.n_latents,
            "k": config.k if config.activation == "topk" else None,
            "l1": config.l1_coefficient if config.activation == "relu" else None, "seed": config.seed,
            "l0": float(l0(out.latents)), "fvu": float(fraction_of_variance_unexplained(activations, out.reconstruction)),
            "dead": float(dead.float().mean()), "dense": float(dense.float().mean()),
            "loss_clean": loss["clean"], "loss_spliced": loss["spliced"], "loss_increase": loss["increase"],
            "loss_zero": loss["zero"], "fraction_recovered": loss["fraction_recovered"],
        })
    return pd.DataFrame(rows)


def seed_consistency(saes: Mapping[str, SparseAutoencoder], grid: Sequence[GridEntry], *,
                     threshold: float = PAPER["shared_threshold"]) -> tuple[pd.DataFrame, dict[str, LatentMatch]]:
    """Every pair of SAEs in ``grid`` that differ only in their seed: matched and counted.

    Returns a table (``family``, ``activation``, ``n_latents``, ``seed_a``, ``seed_b``, ``shared`` — the
    paper's rule: encoder and decoder cosine both > ``threshold`` —, ``shared_decoder_only``, and the
    median decoder cosine of the matched pairs) and the matches by ``"<family> seeds a-b"``.
    """
    families: dict[str, list[GridEntry]] = {}
    for entry in grid:
        families.setdefault(entry.family, []).append(entry)
    rows, matches = [], {}
    for family, members in families.items():
        for a, b in itertools.combinations(sorted(members, key=lambda e: e.config.seed), 2):
            match = match_latents(saes[a.name], saes[b.name], use="both")
            key = f"{family} seeds {a.config.seed}-{b.config.seed}"
            matches[key] = match
            rows.append({
                "family": family, "activation": a.config.activation, "n_latents": a.config.n_latents,
                "seed_a": a.config.seed, "seed_b": b.config.seed,
                "shared": shared_fraction(match, threshold),
                "shared_decoder_only": shared_fraction(match.decoder_similarity, threshold),
                "median_decoder_cosine": float(match.decoder_similarity.median()),
            })
    return pd.DataFrame(rows), matches


def corpus_windows(model: Any, n_train: int, n_eval: int, seq_len: int, *, seed: int = 0,
                   source: str = "wikipedia") -> tuple[Any, Any]:
    """Disjoint training and held-out windows of the offline corpus (:func:`helpers.corpus.load_corpus_tokens`).

    One call cuts ``n_train + n_eval`` consecutive windows of ``seq_len`` tokens (BOS first) from the shuffled
    corpus (``source``: ``"wikipedia"`` offline, ``"pile"`` / ``"c4"`` from the hub); the **first** ``n_eval``
    evaluate the SAEs, the next ``n_train`` train them — no token is in both. Held-out windows come first so
    that a smaller run's held-out windows (``ci``: 8) are held out from a larger run's training windows too
    (the shipped SAE, trained on the ``embedded`` split, never saw them).
    Returns ``(train, held_out)``.
    """
    from helpers.corpus import load_corpus_tokens

    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"corpus_windows: {name} must be a positive int, got {value!r}.")
    windows = load_corpus_tokens(model, n_train + n_eval, seq_len, seed=seed, source=source)
    return windows[n_eval:], windows[:n_eval]


def chance_similarity(sae: SparseAutoencoder, *, seed: int = 12345) -> float:
    """Median matched decoder cosine between ``sae`` and an untrained SAE of the same config (random unit
    decoder rows): what the Hungarian matching finds when two dictionaries have nothing in common."""
    untrained = SparseAutoencoder(replace(sae.config, seed=seed), generator=torch.Generator().manual_seed(seed))
    return float(match_latents(sae, untrained, use="decoder").decoder_similarity.median())


def load_shipped_sae(directory: Path | str = SHIPPED_SAE_DIR, *, device: torch.device | str | None = None
                     ) -> tuple[SparseAutoencoder, SAEConfig, dict]:
    """The shipped SAE, its config and its training metadata (site, model, tokens).

    Raises:
        FileNotFoundError: it is not there; ``make sae-checkpoint`` writes it.
    """
    import json

    directory = Path(directory)
    if not (directory / "cfg.json").is_file():
        raise FileNotFoundError(f"no shipped SAE at {directory}; run `make sae-checkpoint` to train it "
                                "(about 15 minutes on 2 CPU cores).")
    sae, config = load_sae(directory, device=device)
    metadata = json.loads((directory / "cfg.json").read_text()).get("metadata", {})
    return sae, config, metadata


def pick_feature_latents(latents: Float[Tensor, "n n_latents"], n: int, *, min_density: float = 2e-3,
                         max_density: float = 5e-2) -> list[int]:
    """``n`` latents to read by hand: among those firing on ``min_density``–``max_density`` of the tokens
    (neither rare noise nor near-dense), the ones with the largest maximum activation."""
    density = latent_density(latents)
    eligible = (density >= min_density) & (density <= max_density)
    if int(eligible.sum()) == 0:
        raise ValueError(f"no latent fires on {min_density:g}–{max_density:g} of the tokens; widen the range.")
    peak = torch.where(eligible, latents.max(dim=0).values, torch.full_like(density, -torch.inf))
    return peak.topk(min(n, int(eligible.sum()))).indices.tolist()


@torch.no_grad()
def steering_effect(model: Any, batch: Any, hook_name: str, direction: Float[Tensor, "d"], scale: float,
                    token_ids: Sequence[int]) -> dict[str, float]:
    """Mean log-probability of ``token_ids`` (summed over the set) at every real position of ``batch``,
    without and with ``scale · direction`` added at ``hook_name`` (:func:`helpers.sae.steering_hook`)."""
    from helpers.sae import steering_hook

    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    out = {}
    for name, hooks in (("clean", []), ("steered", [(hook_name, steering_hook(direction, scale))])):
        logits = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)
        logprobs = logits.float().log_softmax(-1)[..., ids.to(logits.device)].logsumexp(-1)
        out[name] = float(logprobs[batch.attention_mask.bool().to(logprobs.device)].mean())
    out["gain"] = out["steered"] - out["clean"]
    return out


def density_histogram(latents: Float[Tensor, "n n_latents"], *, title: str) -> go.Figure:
    """Histogram of log10 latent density (fraction of tokens each latent fires on); dead latents counted apart."""
    density = latent_density(latents)
    alive = density[density > 0]
    fig = go.Figure(go.Histogram(x=alive.log10().numpy(), nbinsx=50))
    fig.update_layout(title=f"{title} ({int((density == 0).sum())} latents never fire on these tokens)",
                      xaxis_title="log10 fraction of tokens the latent fires on", yaxis_title="latents",
                      template="plotly_white", width=650, height=400)
    return fig


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def frontier_figure(table: pd.DataFrame, y: str = "fvu", *, title: str | None = None) -> go.Figure:
    """L0 (x, log) against ``y`` (``"fvu"`` or ``"loss_increase"``) for the frontier SAEs, TopK and ReLU."""
    labels = {"fvu": "fraction of variance unexplained", "loss_increase": "next-token loss increase, spliced (nats)"}
    fig = go.Figure()
    frontier = table[table["part"] == "frontier"]
    for activation, marker in (("topk", "circle"), ("relu", "diamond")):
        rows = frontier[frontier["activation"] == activation].sort_values("l0")
        text = [f"k={int(k)}" if activation == "topk" else f"λ={l1:g}" for k, l1 in zip(rows["k"].fillna(0), rows["l1"].fillna(0))]
        fig.add_trace(go.Scatter(x=rows["l0"], y=rows[y], mode="lines+markers+text", text=text, textposition="top center",
                                 marker=dict(symbol=marker, size=10), name="TopK" if activation == "topk" else "ReLU + L1"))
    fig.update_layout(title=title or f"Sparsity vs. fidelity: L0 against {labels.get(y, y)}", xaxis_title="L0 (latents per token)",
                      yaxis_title=labels.get(y, y), template="plotly_white", width=650, height=430)
    fig.update_xaxes(type="log")
    return fig


def similarity_histogram(matches: Mapping[str, LatentMatch], *, threshold: float = PAPER["shared_threshold"],
                         title: str = "Matched latents across seeds: decoder cosine similarity") -> go.Figure:
    """Histogram of the matched pairs' decoder cosines, one trace per seed pair; the threshold marked."""
    fig = go.Figure()
    for name, match in matches.items():
        fig.add_trace(go.Histogram(x=match.decoder_similarity.numpy(), name=name, opacity=0.6,
                                   xbins=dict(start=-0.2, end=1.0, size=0.02)))
    fig.add_vline(x=threshold, line_dash="dash", annotation_text=f"threshold {threshold}")
    fig.update_layout(barmode="overlay", title=title, xaxis_title="cosine similarity of matched decoder rows",
                      yaxis_title="latents", template="plotly_white", width=750, height=430)
    return fig


def shared_fraction_figure(pairs: pd.DataFrame, *, title: str = "Shared latents across seeds by dictionary size") -> go.Figure:
    """Shared fraction (paper's rule) against dictionary size, TopK and ReLU."""
    fig = go.Figure()
    for activation in ("topk", "relu"):
        rows = pairs[pairs["activation"] == activation]
        if rows.empty:
            continue
        means = rows.groupby("n_latents")["shared"].mean().reset_index()
        fig.add_trace(go.Scatter(x=rows["n_latents"], y=rows["shared"], mode="markers", name=f"{activation} (each pair)",
                                 marker=dict(size=8, symbol="circle" if activation == "topk" else "diamond")))
        fig.add_trace(go.Scatter(x=means["n_latents"], y=means["shared"], mode="lines", name=f"{activation} (mean)"))
    fig.update_layout(title=title, xaxis_title="latents (dictionary size)", yaxis_title="fraction shared",
                      yaxis_range=[0, 1], template="plotly_white", width=650, height=430)
    fig.update_xaxes(type="log")
    return fig
