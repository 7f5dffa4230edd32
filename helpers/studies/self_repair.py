"""Self-repair (Rushing & Nanda 2024, "Explorations of Self-Repair in Language Models").

The measurements (direct effect, total effect, the exact split of self-repair into later heads,
later MLPs and the final norm scale, and the freeze-one-at-a-time runs) live in
:mod:`helpers.effects`; this module turns them into the paper's statistics:

* :func:`top_token_mask` — for every head, its top ``fraction`` (2 %) of tokens by direct effect:
  the tokens where the head matters, on which all per-head statistics are taken.
* :func:`head_summary` — one row per head: mean direct effect, total effect, self-repair and its
  split on those tokens, the final-norm share of the direct effect, how often ablation
  over-corrects.
* :func:`token_effects` — the per-token numbers of one head (self-repair is noisy).
* :func:`neuron_repair` — anti-erasure: the change of every later MLP neuron's direct effect when a
  head is ablated, on that head's top tokens (:func:`neuron_repair_parts` also returns the part a
  post-feedforward norm carries, Gemma-2/3), and :func:`cumulative_share` (how few neurons explain
  it); :func:`neuron_repair_tokens` per token and :func:`top_neuron_share`, the official code's
  sparsity statistic (share of a token's MLP self-repair carried by its top 5 neurons).
* :func:`clean_direct_effects` — each head's clean direct effect, the official code's "DE"; with it,
  :func:`ln_share_per_token` and :func:`ln_share_of_means`, the code's two final-norm shares.
* :func:`load_self_repair_tokens` — the text: the offline corpus, or the Pile in the paper profile.

Sign conventions are those of :mod:`helpers.effects`: direct effect DE and total effect TE are
positive when the head helps the correct next token; ``self_repair = DE − TE``; the paper's
"logit change when ablated" is ``−TE``.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float

from helpers.ablation import AblationMethod, Head, ablation_values, resample_reference, stacked_ablation_hooks
from helpers.effects import AblationEffects, _run_to_final, StopForward, logit_readout, next_token_targets
from helpers.models import norm_gain, post_sublayer_norm
from helpers.prompts import TokenBatch

PAPER = {
    # From the official code's released GPT-2 small arrays (starship006/backup_research,
    # FINAL_figure_files/pickle_storage/breakdown_self_repair; see shared/notes/references.md §5), not
    # numbers printed in the paper. "DE" there is the head's clean direct effect (its zero-ablation
    # direct logit attribution through the clean final-norm scale), averaged over the head's top 2 % of
    # tokens by that same clean DE; "logit change" is ablated − clean logit (= −TE); self-repair is the
    # code's own ``logit change − (ablated DE − DE)`` (= our DE − TE; for 9.11 the resampled head keeps a
    # DE of 0.17 on those tokens, so this is 1.54, not 2.738 − 1.027 = 1.71).
    "largest_de_head": "L9H11",
    "largest_de_head_direct_effect": 2.738,
    "largest_de_head_logit_change": -1.027,
    "largest_de_head_self_repair": 1.540,
    "largest_de_head_de_plus_logit_change": 1.711,
    # The final-norm ("LN") share of the direct effect, two definitions in the official code, each a
    # mean over all 144 heads (GPT-2 small, Pythia-160M): see ln_share_per_token / ln_share_of_means.
    "ln_share_per_token_gpt2": 0.318,       # mean of condensed_percent_LN_of_DE
    "ln_share_per_token_pythia160m": 0.341,
    "ln_share_of_means_gpt2": 0.225,        # mean of clip(condensed_self_repair_from_LN / condensed_direct_effects, 0, 1)
    "ln_share_of_means_pythia160m": 0.154,
    # The same arrays, the top 10 % of GPT-2 small's 144 heads by condensed clean DE (15 heads): mean
    # self-repair 0.691 = later heads 0.263 + later MLPs 0.009 + final LayerNorm 0.419.
    "high_de_self_repair_gpt2": 0.691,
    "high_de_later_heads_gpt2": 0.263,
    "high_de_later_mlps_gpt2": 0.009,
    "high_de_final_norm_gpt2": 0.419,
    "top_fraction": 0.02,
    "seq_len": 128,
    # Anti-erasure sparsity (official GOOD_MLP_erasure_breakdown_POSTPROCESS.py): per token, the share
    # of the MLP self-repair carried by the top 5 neurons, capped at 300 %; no number in the paper text.
    "anti_erasure_top_k": 5,
    "anti_erasure_cap": 3.0,
}


def load_self_repair_tokens(model: Any, n_prompts: int, seq_len: int, *, source: str = "wikipedia", seed: int = 0) -> TokenBatch:
    """``n_prompts`` windows of ``seq_len`` tokens of natural text (BOS first, no padding).

    ``source="pile"`` streams ``NeelNanda/pile-10k`` (the paper's data; needs the network, and fails
    at once with :class:`helpers.corpus.CorpusNotAvailableError` offline); ``"wikipedia"`` is the
    offline corpus of the embedded/ci profiles. See :mod:`helpers.corpus`.
    """
    from helpers.corpus import load_corpus_tokens

    return load_corpus_tokens(model, n_prompts, seq_len, seed=seed, source=source)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Per-head statistics on the top tokens by direct effect
# --------------------------------------------------------------------------------------------------


def top_token_mask(
    direct: Float[torch.Tensor, "component batch pos"],
    valid: Bool[torch.Tensor, "batch pos"],
    fraction: float = 0.02,
) -> Bool[torch.Tensor, "component batch pos"]:
    """For every component, True on its top ``fraction`` of valid tokens by direct effect
    (at least one token each). The paper uses the top 2 %."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if direct.shape[1:] != valid.shape:
        raise ValueError(f"direct is {tuple(direct.shape)} but valid is {tuple(valid.shape)}: expected [component, batch, pos] and [batch, pos].")
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("No valid token positions (every position is padding or last).")
    k = max(1, round(fraction * n_valid))
    flat = direct.masked_fill(~valid, float("-inf")).flatten(1)
    top = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return mask.reshape(direct.shape)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype)
    return (values * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp(min=1)


def head_summary(effects: AblationEffects, fraction: float = 0.02, mask: torch.Tensor | None = None,
                 clean_direct: torch.Tensor | None = None) -> pd.DataFrame:
    """One row per ablated component, statistics over its top ``fraction`` tokens by direct effect.

    Columns: ``component``, ``layer``, ``head``, ``n_tokens``, ``direct``, ``total``,
    ``logit_change`` (= −total, the paper's "ablated change"), ``self_repair``, ``later_heads``,
    ``later_mlps``, ``final_norm`` (the exact split of self-repair), ``self_repair_frac``
    (self_repair / direct), ``ln_share`` (final_norm / direct) and ``ln_share_clipped`` (clipped to
    [0, 1]), ``overcorrect_frac`` (share of the top tokens where the logit *rose* on ablation,
    TE < 0), ``self_repair_std`` (spread over the top tokens) and, when the freeze runs were done,
    ``freeze_later_heads`` / ``freeze_later_mlps`` / ``freeze_final_norm`` (TE(frozen) − TE).

    With ``clean_direct`` (:func:`clean_direct_effects`, ``[component, batch, pos]``) the top tokens
    are chosen by the clean direct effect, as the official code does (unless ``mask`` is given), and
    three columns follow the official code's definitions: ``clean_direct`` (its "DE"),
    ``ln_share_tokens`` (:func:`ln_share_per_token`) and ``ln_share_means`` (:func:`ln_share_of_means`),
    both against the clean direct effect.
    """
    if clean_direct is not None and clean_direct.shape != effects.direct.shape:
        raise ValueError(f"clean_direct must be [component, batch, pos] = {tuple(effects.direct.shape)}, got {tuple(clean_direct.shape)}.")
    if mask is None:
        mask = top_token_mask(effects.direct if clean_direct is None else clean_direct, effects.valid, fraction)
    mean = lambda t: _masked_mean(t, mask)  # noqa: E731
    direct, total = mean(effects.direct), mean(effects.total)
    self_repair = direct - total
    sr_tokens = effects.self_repair
    count = mask.flatten(1).sum(1).clamp(min=1).float()
    sr_mean = self_repair[:, None, None]
    sr_std = (((sr_tokens - sr_mean) ** 2 * mask).flatten(1).sum(1) / count).sqrt()
    final_norm = mean(effects.final_norm)
    frame = pd.DataFrame({
        "component": [str(c) for c in effects.components],
        "layer": [c.layer for c in effects.components],
        "head": [getattr(c, "head", -1) for c in effects.components],
        "n_tokens": mask.flatten(1).sum(1).tolist(),
        "direct": direct.tolist(),
        "total": total.tolist(),
        "logit_change": (-total).tolist(),
        "self_repair": self_repair.tolist(),
        "later_heads": mean(effects.later_heads).tolist(),
        "later_mlps": mean(effects.later_mlps).tolist(),
        "final_norm": final_norm.tolist(),
        "self_repair_frac": (self_repair / direct).tolist(),
        "ln_share": (final_norm / direct).tolist(),
        "ln_share_clipped": (final_norm / direct).clamp(0, 1).tolist(),
        "overcorrect_frac": mean((effects.total < 0).float()).tolist(),
        "self_repair_std": sr_std.tolist(),
    })
    if clean_direct is not None:
        frame["clean_direct"] = mean(clean_direct).tolist()
        frame["ln_share_tokens"] = ln_share_per_token(effects.final_norm, clean_direct, mask).tolist()
        frame["ln_share_means"] = ln_share_of_means(effects.final_norm, clean_direct, mask).tolist()
    for target in effects.frozen_total:
        frame[f"freeze_{target}"] = mean(effects.freeze_repair(target)).tolist()  # type: ignore[arg-type]
    return frame


def clean_direct_effects(model: Any, batch: TokenBatch, components: Sequence[Head]) -> Float[torch.Tensor, "component batch pos"]:
    """Each head's *clean* direct effect on the correct next token: its zero-ablation direct logit
    attribution through the clean final-norm scale (:func:`helpers.effects.direct_effect_decomposition`).

    This is what the official code calls a head's "direct effect" (``direct_effects`` in
    ``GOOD_breakdown_self_repair.py``): it picks each head's top tokens by it, reports its mean and
    divides the final-norm repair by it. ``AblationEffects.direct`` is instead the *change* of the
    head's direct effect under the ablation (clean minus resampled), which is smaller for resample
    ablation; self-repair (DE − TE) is the same in both conventions.
    """
    from helpers.effects import direct_effect_decomposition

    components = [Head(*c) if isinstance(c, tuple) else c for c in components]
    bad = [c for c in components if not isinstance(c, Head)]
    if bad:
        raise TypeError(f"components must be heads (helpers.ablation.Head), got {bad[:3]}.")
    heads_de = direct_effect_decomposition(model, batch)["heads"]  # [layer, head, batch, pos]
    return torch.stack([heads_de[c.layer, c.head] for c in components]).cpu()


def _check_share_inputs(final_norm: torch.Tensor, direct: torch.Tensor, mask: torch.Tensor) -> None:
    if not final_norm.shape == direct.shape == mask.shape:
        raise ValueError(f"final_norm, direct and mask must have the same [component, batch, pos] shape, got "
                         f"{tuple(final_norm.shape)}, {tuple(direct.shape)}, {tuple(mask.shape)}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (e.g. from top_token_mask), got {mask.dtype}.")


def ln_share_per_token(
    final_norm: Float[torch.Tensor, "component batch pos"],
    direct: Float[torch.Tensor, "component batch pos"],
    mask: Bool[torch.Tensor, "component batch pos"],
) -> Float[torch.Tensor, "component"]:
    """Final-norm share of the direct effect, the official code's ``condensed_percent_LN_of_DE``:
    per token ``clip(final_norm / direct, 0, 1)``, then per component the mean (NaN-skipping, as the
    code's ``nanmean``) over its tokens in ``mask``. The paper's "~30 %" is the mean of this over all
    heads (0.318 on GPT-2 small). Clipping each token first makes it larger than
    :func:`ln_share_of_means` when the per-token ratios are spread out."""
    _check_share_inputs(final_norm, direct, mask)
    ratio = (final_norm / direct).clamp(0, 1)  # 0/0 -> NaN, skipped; x/0 -> ±inf -> clipped to 0 or 1
    ratio = ratio.masked_fill(~mask, float("nan"))
    return torch.nanmean(ratio.flatten(1), dim=1)


def ln_share_of_means(
    final_norm: Float[torch.Tensor, "component batch pos"],
    direct: Float[torch.Tensor, "component batch pos"],
    mask: Bool[torch.Tensor, "component batch pos"],
) -> Float[torch.Tensor, "component"]:
    """Final-norm share of the direct effect as the official summary script
    (``GOOD_between_model_breakdown_summarize.py``) computes it: per component
    ``clip(mean final_norm / mean direct, 0, 1)``, both means over its tokens in ``mask``
    (0.225 on GPT-2 small averaged over all heads)."""
    _check_share_inputs(final_norm, direct, mask)
    return (_masked_mean(final_norm, mask) / _masked_mean(direct, mask)).clamp(0, 1)


def token_effects(effects: AblationEffects, component: Any, mask: torch.Tensor | None = None, fraction: float = 0.02) -> pd.DataFrame:
    """Per-token direct effect, total effect, self-repair and its split for one component, on its
    top tokens (or on ``mask[i]``): the noise behind the per-head means."""
    i = effects.index(component)
    if mask is None:
        mask = top_token_mask(effects.direct, effects.valid, fraction)
    where = mask[i]
    batch_idx, pos_idx = where.nonzero(as_tuple=True)
    return pd.DataFrame({
        "prompt": batch_idx.tolist(),
        "pos": pos_idx.tolist(),
        "direct": effects.direct[i][where].tolist(),
        "total": effects.total[i][where].tolist(),
        "self_repair": effects.self_repair[i][where].tolist(),
        "later_heads": effects.later_heads[i][where].tolist(),
        "later_mlps": effects.later_mlps[i][where].tolist(),
        "final_norm": effects.final_norm[i][where].tolist(),
    })


# --------------------------------------------------------------------------------------------------
# Anti-erasure: which later neurons change
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def neuron_repair(
    model: Any,
    batch: TokenBatch,
    head: Head | tuple[int, int],
    token_mask: Bool[torch.Tensor, "batch pos"],
    *,
    method: AblationMethod = "resample",
    reference: TokenBatch | None = None,
    seed: int = 0,
) -> Float[torch.Tensor, "layer d_mlp"]:
    """Anti-erasure: how much each later MLP neuron's direct effect on the correct token changes
    when ``head`` is ablated, averaged over the tokens in ``token_mask`` (the head's top tokens).

    Entry ``[l, n]`` is the mean over those tokens of
    ``(post'_{l,n} − post_{l,n}) · (W_out[l, n] · ũ) / s_clean`` (ablated minus clean, through the
    clean final-norm scale) for layers ``l ≥ head.layer``, 0 for earlier layers. Summed over
    neurons of layer ``l`` it is that layer's share of ``later_mlps`` in
    :class:`helpers.effects.AblationEffects` (MLP output biases do not change). Positive =
    the neuron now pushes the correct token more than it did (it stops erasing it).

    Models with a post-feedforward norm (Gemma-2/3) write ``g ⊙ m / r`` (``m`` the MLP's raw output,
    ``r = rms(m)``, ``g = 1 + γ``): a neuron's entry is then ``Δpost · (g ⊙ W_out[l, n] · ũ) / (r' s)``
    with ``r'`` the ablated run's scale, and the neurons add up to the layer's change *minus* the
    norm's rescaling of the clean output, ``(o · ũ)(r/r' − 1) / s`` — which
    :func:`neuron_repair_parts` returns as well.
    """
    return neuron_repair_parts(model, batch, head, token_mask, method=method, reference=reference, seed=seed)[0]


@torch.no_grad()
def neuron_repair_parts(
    model: Any,
    batch: TokenBatch,
    head: Head | tuple[int, int],
    token_mask: Bool[torch.Tensor, "batch pos"],
    *,
    method: AblationMethod = "resample",
    reference: TokenBatch | None = None,
    seed: int = 0,
) -> tuple[Float[torch.Tensor, "layer d_mlp"], Float[torch.Tensor, "layer"]]:
    """:func:`neuron_repair` and, per layer, the part of the MLP layer's change that no neuron carries:
    the post-feedforward norm rescaling the clean output (zeros for models without such a norm).
    ``per_neuron.sum(-1) + rescale`` is each MLP layer's share of ``later_mlps``."""
    per_token, rescale = neuron_repair_tokens(model, batch, head, token_mask, method=method, reference=reference, seed=seed)
    return per_token.mean(0), rescale.mean(0)


@torch.no_grad()
def neuron_repair_tokens(
    model: Any,
    batch: TokenBatch,
    head: Head | tuple[int, int],
    token_mask: Bool[torch.Tensor, "batch pos"],
    *,
    method: AblationMethod = "resample",
    reference: TokenBatch | None = None,
    seed: int = 0,
) -> tuple[Float[torch.Tensor, "token layer d_mlp"], Float[torch.Tensor, "token layer"]]:
    """:func:`neuron_repair_parts` before the mean over tokens: one row per True entry of
    ``token_mask`` (row-major order, as ``token_mask.nonzero()``). ``per_neuron[t].sum() + rescale[t].sum()``
    is token ``t``'s ``later_mlps``. The paper's sparsity statistic is per token
    (:func:`top_neuron_share`), since different tokens use different neurons."""
    head = Head(*head) if isinstance(head, tuple) else head
    if token_mask.shape != batch.tokens.shape:
        raise ValueError(f"token_mask must be [batch, pos] = {tuple(batch.tokens.shape)}, got {tuple(token_mask.shape)}.")
    if reference is None and method == "resample":
        reference = resample_reference(batch, seed=seed)
    targets, _ = next_token_targets(batch)
    readout = logit_readout(model, targets)
    layers = list(range(head.layer, model.cfg.n_layers))
    post_norms = {l: post_sublayer_norm(model, l, "mlp") for l in layers}
    where = token_mask.to(batch.tokens.device)
    start_name = f"blocks.{head.layer}.hook_resid_pre"
    clean: dict[str, torch.Tensor] = {}
    ablated: dict[str, torch.Tensor] = {}

    def grab(store: dict, name: str):
        def hook(activation: torch.Tensor, hook: Any) -> None:
            store[name] = activation if name == start_name else activation[where].float()  # [tokens, ...]

        return (name, hook)

    def stop(store: dict):
        def hook(activation: torch.Tensor, hook: Any) -> None:
            store["scale"] = readout.scale(activation.float())[where]
            raise StopForward

        return ("ln_final.hook_in", hook)

    post_names = [f"blocks.{l}.mlp.hook_post" for l in layers]
    norm_names = [f"blocks.{l}.ln2_post.hook_scale" for l in layers if post_norms[l] is not None]
    out_names = [f"blocks.{l}.hook_mlp_out" for l in layers if post_norms[l] is not None]
    # Clean pass (stopped before the unembedding), then the ablated pass from the head's layer on.
    _run_to_final(model, batch.tokens, batch.attention_mask,
                  [grab(clean, n) for n in post_names + norm_names + out_names + [start_name]] + [stop(clean)])
    values = ablation_values(model, [head], method, reference)
    ablate = stacked_ablation_hooks(model, [head], values, len(batch))
    inputs = clean[start_name] if head.layer else batch.tokens
    _run_to_final(model, inputs, batch.attention_mask,
                  ablate + [grab(ablated, n) for n in post_names + norm_names] + [stop(ablated)], head.layer)
    scale = clean["scale"]  # the clean run's final-norm scale on the selected tokens
    directions = readout.directions[where]  # [tokens, d_model]
    n_tokens = int(where.sum())
    result = torch.zeros(n_tokens, model.cfg.n_layers, model.cfg.d_mlp)
    rescale = torch.zeros(n_tokens, model.cfg.n_layers)
    W_out = model.W_out.detach().float()
    for layer, name in zip(layers, post_names):
        norm = post_norms[layer]
        if norm is None:
            w = directions @ W_out[layer].T  # [tokens, d_mlp]
            delta = (ablated[name] - clean[name]) * w / scale[:, None]
        else:
            r = clean[f"blocks.{layer}.ln2_post.hook_scale"][:, 0]
            r_new = ablated[f"blocks.{layer}.ln2_post.hook_scale"][:, 0]
            w = directions @ (W_out[layer] * norm_gain(norm).float()).T  # [tokens, d_mlp]
            delta = (ablated[name] - clean[name]) * w / (r_new * scale)[:, None]
            out_dot = (clean[f"blocks.{layer}.hook_mlp_out"] * directions).sum(-1)
            rescale[:, layer] = (out_dot * (r / r_new - 1.0) / scale).cpu()
        result[:, layer] = delta.cpu()
    return result, rescale


def cumulative_share(contributions: Float[torch.Tensor, "n"], k_values: Sequence[int]) -> dict[int, float]:
    """Share of the positive total of ``contributions`` carried by the ``k`` largest entries, for
    each ``k`` (how sparse the anti-erasure is)."""
    values = contributions.flatten().sort(descending=True).values
    positive_total = float(values.clamp(min=0).sum())
    if positive_total <= 0:
        return {k: float("nan") for k in k_values}
    return {k: float(values[:k].clamp(min=0).sum()) / positive_total for k in k_values}


def top_neuron_share(
    changes: Float[torch.Tensor, "token neuron"],
    mlp_repair: Float[torch.Tensor, "token"],
    k: int = 5,
    cap: float | None = 3.0,
) -> Float[torch.Tensor, "token"]:
    """Anti-erasure sparsity as the official code measures it (``GOOD_MLP_erasure_breakdown_POSTPROCESS.py``,
    "Percentage of Self-Repair Explained by Top 5 Neurons"): per token, the ``k`` largest neuron
    changes of the direct effect (that token's own top ``k``), summed, over the token's total MLP
    self-repair ``mlp_repair``, capped at ``cap`` (the code's 300 %; ``None`` for no cap).

    Tokens with ``mlp_repair <= 0`` (nothing to explain; the paper picks each head's top tokens by MLP
    self-repair, which are positive) get NaN. Returns one share per token; average with ``nanmean``.
    """
    if changes.ndim != 2 or mlp_repair.shape != changes.shape[:1]:
        raise ValueError(f"changes must be [token, neuron] and mlp_repair [token], got {tuple(changes.shape)} and {tuple(mlp_repair.shape)}.")
    if not 1 <= k <= changes.shape[1]:
        raise ValueError(f"k must be between 1 and the number of neurons ({changes.shape[1]}), got {k}.")
    top = changes.topk(k, dim=1).values.sum(1)
    share = top / mlp_repair
    if cap is not None:
        share = share.clamp(max=cap)
    return share.masked_fill(mlp_repair <= 0, float("nan"))


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def decomposition_figure(summary: pd.DataFrame, *, title: str) -> Any:
    """Stacked bars per head: self-repair split into later heads, later MLPs and the final norm,
    with the direct effect and the total effect as markers (one row of ``summary`` per head)."""
    import plotly.graph_objects as go

    names = summary["component"].tolist()
    fig = go.Figure()
    for column, label, colour in (("later_heads", "later attention heads", "#636efa"),
                                  ("later_mlps", "later MLP layers", "#00cc96"),
                                  ("final_norm", "final norm scale", "#ef553b")):
        fig.add_trace(go.Bar(x=names, y=summary[column], name=label, marker_color=colour))
    fig.add_trace(go.Scatter(x=names, y=summary["direct"], mode="markers", name="direct effect",
                             marker=dict(symbol="diamond", size=10, color="black")))
    fig.add_trace(go.Scatter(x=names, y=summary["total"], mode="markers", name="total effect",
                             marker=dict(symbol="x", size=10, color="grey")))
    fig.update_layout(barmode="relative", title=title, xaxis_title="head", yaxis_title="logit (mean over top tokens)",
                      template="plotly_white")
    return fig


def token_noise_figure(effects: AblationEffects, components: Sequence[Any], *, fraction: float = 0.02, title: str,
                       mask: torch.Tensor | None = None) -> Any:
    """Per-token direct vs. total effect of a few heads on their top tokens, with y = x (no
    self-repair) and y = 0 (perfect self-repair): how noisy self-repair is per prompt."""
    import plotly.graph_objects as go

    if mask is None:
        mask = top_token_mask(effects.direct, effects.valid, fraction)
    fig = go.Figure()
    lo, hi = 0.0, 0.0
    for component in components:
        frame = token_effects(effects, component, mask)
        fig.add_trace(go.Scatter(x=frame["direct"], y=frame["total"], mode="markers", name=str(effects.components[effects.index(component)]),
                                 marker=dict(size=6, opacity=0.7)))
        lo = min(lo, float(frame[["direct", "total"]].min().min()))
        hi = max(hi, float(frame[["direct", "total"]].max().max()))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="grey"), name="y = x (no self-repair)"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, xaxis_title="direct effect (clean final-norm scale)",
                      yaxis_title="total effect (clean − ablated logit)", template="plotly_white")
    return fig
