"""Direct vs. total effects of components, and where the difference (self-repair) comes from.

The logit of a target token ``t`` at one position is an affine function of the final residual
stream ``x`` (the sum of everything written into it: embeddings, every head, every attention bias,
every MLP layer), divided by the final norm's scale ``s``::

    logit_t = (x · ũ_t) / s + c_t,      ũ_t = γ ⊙ W_U[:, t]   (centred, ũ_t − mean(ũ_t), for LayerNorm)
                                         c_t = β · W_U[:, t] + b_U[t]
                                         s   = sqrt(mean((x − mean x)²) + ε)  (no centring for RMSNorm)

(γ, β: the final norm's weight and bias; with ``compatibility_mode=True`` γ is folded into ``W_U``.)
Subtracting the mean of ``x`` is the same as centring ``ũ``, so every component's share is the dot
product of its own output with ``ũ_t``, divided by the **clean** run's scale ``s``:

* **Direct effect** of a component ``c`` ablated from output ``o_c`` to ``o'_c`` (zero, mean or
  resample ablation): ``DE = (o_c − o'_c) · ũ_t / s``. For zero ablation this is the usual direct
  logit attribution. It is what the logit would lose if nothing downstream reacted.
* **Total effect**: ``TE = logit_clean − logit_ablated`` from a real forward pass with ``c``
  ablated (everything downstream recomputed, including the final norm scale ``s'``).
* **Self-repair** ``= DE − TE`` (Rushing & Nanda 2024): how much of the direct effect the rest of
  the network gives back. It splits *exactly* into

  - ``later_heads``: ``Σ_{l > L} (attn_out'_l − attn_out_l) · ũ / s`` (attention layers after ``c``'s),
  - ``later_mlps``:  ``Σ_{l ≥ L} (mlp_out'_l − mlp_out_l) · ũ / s`` (MLP layers after ``c``; for a
    neuron, ``l > L``),
  - ``final_norm``:  ``(x' · ũ) (1/s' − 1/s)`` (the ablated logit with the new scale minus with the
    clean scale).

  The last term equals "freeze the final norm scale at its clean value" exactly (the final norm
  comes last, so freezing it changes nothing else). :func:`ablation_effects` can also do the
  *freeze-one-at-a-time* runs for the other two: hold every later attention layer (or every later
  MLP layer) at its clean output and see how much larger the total effect becomes. Those do not add
  up exactly (the frozen parts interact), which is why both views are offered.

Models that normalise each sublayer's output (Gemma-2/3: ``attn_out = (1 + γ) ⊙ y / rms(y)`` with
``y`` the attention's output projection, likewise for the MLP). The post-sublayer norm belongs to
the component's own path into the residual stream, so a component's output ``o_c`` above is *its
layer's* output, recomputed with the component replaced (the norm's scale recomputed too — a norm
inside the layer, unlike the final norm, is not frozen):
``DE = (attn_out_L − postnorm(y_L − (z_h − z'_h) W_O[h])) · ũ / s`` for a head, and the same with
``W_out`` for a neuron. Then the ablated component's own layer still changes by exactly ``−DE`` and
the three-way split of self-repair stays exact. The heads of such a layer do not add up to its
output (the norm is not additive); :func:`direct_effect_decomposition` puts the rest in
``attn_bias``. (:func:`helpers.attribution.direct_logit_attribution` instead freezes every norm's
scale, which makes the heads add up: a different, linearised question.)

Sign conventions: ``DE`` and ``TE`` are positive when the component *helps* the target logit;
``self_repair > 0`` means the network makes up for part of the loss; ``self_repair > DE`` (TE < 0)
is over-correction. The paper's "logit change when ablated" is ``−TE``.

Batching: :func:`ablation_effects` ablates each component in its own copy of the prompts and runs
``chunk_size`` copies per forward pass (:func:`helpers.ablation.stacked_ablation_hooks`), reading
only the quantities above through hooks — the full ``[batch, pos, d_vocab]`` logits of the ablated
runs are never built. Components are grouped by layer and each pass starts at that layer from the
clean residual stream (``start_at_layer``; the earlier blocks are not computed, since an ablation
cannot change them), which makes late-layer heads cheap.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from helpers.ablation import (
    AblationMethod,
    Component,
    Head,
    Hook,
    Neuron,
    ablation_values,
    as_component,
    resample_reference,
    stacked_ablation_hooks,
)
from helpers.models import final_norm, norm_eps, norm_gain, post_sublayer_norm, post_sublayer_norm_hook
from helpers.patching.engine import skip_blocks_below
from helpers.prompts import TokenBatch

FreezeTarget = Literal["final_norm", "later_heads", "later_mlps"]
FREEZE_TARGETS: tuple[str, ...] = ("final_norm", "later_heads", "later_mlps")

_NORM_EDIT_WARNING = r"A forward hook edited hook_scale"


# --------------------------------------------------------------------------------------------------
# The final norm scale
# --------------------------------------------------------------------------------------------------


def final_norm_scale(cache: Any) -> Float[torch.Tensor, "batch pos 1"]:
    """The final norm's scale ``s`` (``ln_final.hook_scale``) from a cache of a clean run.

    Run with ``names_filter`` including ``"ln_final.hook_scale"``. Same convention for LayerNorm and
    RMSNorm: ``normalized = (x − mean x) / s`` (LayerNorm) or ``x / s`` (RMSNorm).
    """
    try:
        return cache["ln_final.hook_scale"].detach()
    except KeyError:
        raise KeyError("The cache has no 'ln_final.hook_scale': run run_with_cache with "
                       "names_filter=lambda name: name == 'ln_final.hook_scale' (or a filter that includes it).") from None


def freeze_final_norm_scale_hooks(scale: Float[torch.Tensor, "batch pos 1"]) -> list[Hook]:
    """Hooks that replace the final norm's scale by ``scale`` (usually the clean run's).

    With the scale frozen, the logits are an affine function of the final residual stream: every
    effect then reaches the logits only through what it writes into the stream, not by growing or
    shrinking its norm. ``scale`` must have the run's ``[batch, pos]``; a run whose batch is ``k``
    stacked copies of the prompts (see :func:`helpers.ablation.stacked_ablation_hooks`) gets the
    scale tiled ``k`` times. (The bridge warns once that the norm output is rebuilt from the hooked
    scale on its native path; :func:`quiet_frozen_norm_warning` silences that.)
    """
    frozen = scale.detach()
    if frozen.ndim == 2:
        frozen = frozen[..., None]
    if frozen.ndim != 3 or frozen.shape[-1] != 1:
        raise ValueError(f"scale must be [batch, pos, 1] (ln_final.hook_scale), got {tuple(scale.shape)}.")

    def freeze(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        rows, n = activation.shape[0], frozen.shape[0]
        if activation.shape[1] != frozen.shape[1] or rows % n:
            raise ValueError(
                f"Frozen final-norm scale is [batch={n}, pos={frozen.shape[1]}] but the run has "
                f"[batch={rows}, pos={activation.shape[1]}]: take the scale from a clean run of the same prompts."
            )
        return frozen.to(activation).repeat(rows // n, 1, 1)

    return [("ln_final.hook_scale", freeze)]


@contextmanager
def quiet_frozen_norm_warning() -> Iterator[None]:
    """Silence the bridge's (harmless) warning that a hooked norm scale was used."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NORM_EDIT_WARNING)
        yield


# --------------------------------------------------------------------------------------------------
# Reading one target logit off the residual stream
# --------------------------------------------------------------------------------------------------


def next_token_targets(batch: TokenBatch) -> tuple[Int[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos"]]:
    """The correct next token at every position, and which positions have one.

    ``targets[:, p] = tokens[:, p + 1]``; ``valid[:, p]`` is True where both ``p`` and ``p + 1`` are
    real tokens (so the last position and padding are excluded).
    """
    tokens, mask = batch.tokens, batch.attention_mask.bool()
    targets = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    valid = torch.cat([mask[:, :-1] & mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return targets, valid


def token_losses(logits: Float[torch.Tensor, "batch pos d_vocab"], batch: TokenBatch
                 ) -> tuple[Float[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos"]]:
    """Next-token cross-entropy (nats) at every position of ``batch``, and which positions count.

    ``losses[:, p] = −log softmax(logits[:, p])[tokens[:, p + 1]]``; ``valid`` is
    :func:`next_token_targets`'s (both tokens real), and the loss is meaningless where it is False.
    """
    targets, valid = next_token_targets(batch)
    logprobs = logits.float().log_softmax(-1)
    losses = -logprobs.gather(-1, targets[..., None].to(logits.device))[..., 0]
    return losses, valid.to(losses.device)


@torch.no_grad()
def mean_token_loss(model: Any, batch: TokenBatch, *, fwd_hooks: Sequence[tuple[str, Callable]] = (),
                    batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over the real tokens of ``batch`` (e.g. corpus text).

    One forward pass per ``batch_size`` rows, each with ``fwd_hooks`` (an intervention) attached;
    every position whose next token is real counts once (:func:`token_losses`).
    """
    total, count = 0.0, 0
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        logits = model.run_with_hooks(chunk.tokens, attention_mask=chunk.attention_mask, fwd_hooks=list(fwd_hooks))
        losses, valid = token_losses(logits, chunk)
        total += float(losses[valid].sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("mean_token_loss: the batch has no next-token targets (every text is a single token).")
    return total / count


def uses_centring(model: Any) -> bool:
    """True for LayerNorm (the final norm subtracts the mean), False for RMSNorm."""
    return final_norm(model).centre


@dataclass
class LogitReadout:
    """The affine map from the final residual stream to the target logit at every position.

    ``logit = (x · directions) / scale + bias`` with ``directions = ũ_t`` (see the module docstring).
    """

    directions: Float[torch.Tensor, "batch pos d_model"]
    bias: Float[torch.Tensor, "batch pos"]
    centre: bool
    eps: float

    def scale(self, resid: Float[torch.Tensor, "*rows pos d_model"]) -> Float[torch.Tensor, "*rows pos"]:
        """The final norm's scale of ``resid``, as the model computes it."""
        if self.centre:
            resid = resid - resid.mean(-1, keepdim=True)
        return (resid.pow(2).mean(-1) + self.eps).sqrt()

    def project(self, output: Float[torch.Tensor, "copies batch pos d_model"]) -> Float[torch.Tensor, "copies batch pos"]:
        """``output · ũ`` for stacked copies of the prompts (``[copies * batch, pos, d]`` also works)."""
        n = self.directions.shape[0]
        stacked = output.reshape(-1, n, *output.shape[-2:])
        return torch.einsum("cbpd,bpd->cbp", stacked, self.directions.to(output))


def logit_readout(model: Any, targets: Int[torch.Tensor, "batch pos"]) -> LogitReadout:
    """The :class:`LogitReadout` of ``model`` for target token ids ``targets``."""
    norm = final_norm(model)  # raises when the final norm cannot be read (no guessed defaults)
    W_U = model.W_U.detach()  # [d_model, d_vocab]
    b_U = model.b_U.detach() if getattr(model, "b_U", None) is not None else torch.zeros(W_U.shape[1], device=W_U.device)
    columns = W_U[:, targets].permute(1, 2, 0)  # [batch, pos, d_model]
    directions = columns * norm.gain.to(columns)
    centre, eps = norm.centre, norm.eps
    if centre:
        directions = directions - directions.mean(-1, keepdim=True)
    constant = b_U[targets]
    if norm.bias is not None:
        constant = constant + columns @ norm.bias.to(columns)
    return LogitReadout(directions.float(), constant.float(), centre, eps)


# --------------------------------------------------------------------------------------------------
# Direct effects from a clean cache
# --------------------------------------------------------------------------------------------------


class _PostNorm:
    """A layer's post-sublayer RMSNorm (Gemma-2/3), applied as the model does: ``y ↦ gain ⊙ y / rms(y)``."""

    def __init__(self, norm: Any):
        self.gain = norm_gain(norm).float()
        self.eps = norm_eps(norm)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        y = y.float()
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain.to(y.device)


def _post_norms(model: Any, sublayer: str) -> list[_PostNorm | None]:
    """Per layer, the post-sublayer norm of ``"attn"`` or ``"mlp"`` (``None`` where there is none)."""
    norms = [post_sublayer_norm(model, layer, sublayer) for layer in range(model.cfg.n_layers)]
    return [None if norm is None else _PostNorm(norm) for norm in norms]


def _raw_output_hook(layer: int, sublayer: str) -> str:
    """The sublayer's output before its post-sublayer norm (the output projection's result)."""
    return f"blocks.{layer}.{'attn' if sublayer == 'attn' else 'mlp'}.hook_out"


def _head_outputs_dot(W_O: torch.Tensor, z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``(z_h W_O[h]) · ũ`` for every head of one layer (``W_O`` [head, d_head, d_model]): [batch, pos, head]."""
    per_head = torch.einsum("hkd,bpd->bphk", W_O.to(z), directions.to(z))
    return (z * per_head).sum(-1)


def direct_effect_decomposition(
    model: Any, batch: TokenBatch, targets: Int[torch.Tensor, "batch pos"] | None = None
) -> dict[str, torch.Tensor]:
    """Every component's direct effect on the target logit of a clean run, through the clean scale.

    Returns a dict of ``[batch, pos]``-shaped contributions (``"heads"`` is ``[layer, head, batch,
    pos]``, ``"attn_bias"`` and ``"mlps"`` are ``[layer, batch, pos]``) plus ``"logit"``, the model's
    own target logit. ``embed + heads.sum + attn_bias.sum + mlps.sum + bias == logit`` up to float
    error: this is the check that the readout conventions are right (see the tests).

    A head's entry is its zero-ablation direct effect: for a plain block ``(z_h W_O[h]) · ũ / s``; with
    a post-attention norm (Gemma-2/3) the change of its layer's normalised output when the head is
    removed (see the module docstring). ``attn_bias`` is the rest of each attention output: the
    output bias, and with a post-attention norm the part of the output that no single head accounts for.
    """
    if targets is None:
        targets, _ = next_token_targets(batch)
    readout = logit_readout(model, targets)
    n_layers = model.cfg.n_layers
    post_norms = _post_norms(model, "attn")
    names = {"ln_final.hook_scale", "blocks.0.hook_resid_pre"}
    names |= {f"blocks.{l}.{s}" for l in range(n_layers) for s in ("attn.hook_z", "hook_attn_out", "hook_mlp_out")}
    names |= {_raw_output_hook(l, "attn") for l in range(n_layers) if post_norms[l] is not None}
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=lambda n: n in names)
    scale = final_norm_scale(cache)[..., 0].float()
    dirs = readout.directions
    heads, attn_bias, mlps = [], [], []
    W_O = model.W_O.detach()  # [layer, head, d_head, d_model]
    for layer in range(n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"].float()
        if post_norms[layer] is None:
            head_terms = _head_outputs_dot(W_O[layer], z, dirs) / scale[..., None]  # [b, p, h]
        else:  # the layer's normalised output without head h, for each h
            per_head = torch.einsum("bphk,hkd->bphd", z, W_O[layer].to(z))
            raw = cache[_raw_output_hook(layer, "attn")].float()[:, :, None]
            out = cache[f"blocks.{layer}.hook_attn_out"].float()[:, :, None]
            removed = out - post_norms[layer](raw - per_head)  # [b, p, h, d]
            head_terms = (removed * dirs[:, :, None].to(removed)).sum(-1) / scale[..., None]
        heads.append(head_terms.permute(2, 0, 1))
        attn_total = (cache[f"blocks.{layer}.hook_attn_out"].float() * dirs).sum(-1) / scale
        attn_bias.append(attn_total - head_terms.sum(-1))
        mlps.append((cache[f"blocks.{layer}.hook_mlp_out"].float() * dirs).sum(-1) / scale)
    embed = (cache["blocks.0.hook_resid_pre"].float() * dirs).sum(-1) / scale
    logit = logits.gather(-1, targets[..., None])[..., 0].float()
    return {
        "embed": embed,
        "heads": torch.stack(heads),
        "attn_bias": torch.stack(attn_bias),
        "mlps": torch.stack(mlps),
        "bias": readout.bias,
        "logit": logit,
        "scale": scale,
    }


# --------------------------------------------------------------------------------------------------
# Direct / total effects of ablating each component, batched
# --------------------------------------------------------------------------------------------------


@dataclass
class AblationEffects:
    """Per-component, per-token effects on the target logit of ablating each component alone.

    All tensors are ``[component, batch, pos]`` (on CPU); ``valid`` marks the positions that have a
    target (``[batch, pos]``). See the module docstring for definitions and signs.

    Attributes:
        components: what was ablated, in order.
        method: ``"zero"``, ``"mean"`` or ``"resample"``.
        direct: DE through the clean final-norm scale.
        total: TE = clean logit − ablated logit.
        later_heads, later_mlps, final_norm: exact split of ``self_repair``.
        per_layer_attn, per_layer_mlp: ``[component, layer, batch, pos]`` change of each attention /
            MLP layer's direct effect (ablated − clean, clean scale), when ``keep_per_layer=True``.
        frozen_total: TE with ``"later_heads"`` / ``"later_mlps"`` / ``"final_norm"`` frozen at their
            clean values, for the freeze-one-at-a-time view.
        clean_logit: ``[batch, pos]`` clean target logits.
    """

    components: list[Component]
    method: str
    direct: torch.Tensor
    total: torch.Tensor
    later_heads: torch.Tensor
    later_mlps: torch.Tensor
    final_norm: torch.Tensor
    valid: torch.Tensor
    clean_logit: torch.Tensor
    per_layer_attn: torch.Tensor | None = None
    per_layer_mlp: torch.Tensor | None = None
    frozen_total: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def self_repair(self) -> torch.Tensor:
        """DE − TE: the part of the direct effect that the rest of the network makes up for."""
        return self.direct - self.total

    @property
    def unexplained(self) -> torch.Tensor:
        """self_repair − (later_heads + later_mlps + final_norm): zero up to float error."""
        return self.self_repair - (self.later_heads + self.later_mlps + self.final_norm)

    def freeze_repair(self, target: FreezeTarget) -> torch.Tensor:
        """Self-repair attributed to ``target`` by freezing it alone: TE(frozen) − TE."""
        if target not in self.frozen_total:
            raise KeyError(f"No freeze run for {target!r}; pass freeze=({target!r},) to ablation_effects "
                           f"(available: {sorted(self.frozen_total)}).")
        return self.frozen_total[target] - self.total

    def index(self, component: Any) -> int:
        return self.components.index(component if not isinstance(component, tuple) else Head(*component))


def _component_layer_for_downstream(component: Component) -> tuple[int, int]:
    """(first later attention layer, first later MLP layer) for a component."""
    if isinstance(component, Head):
        return component.layer + 1, component.layer
    if isinstance(component, Neuron):
        return component.layer + 1, component.layer + 1
    raise TypeError(f"ablation_effects handles heads and neurons, got {component}.")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs is read (the rest of the model, the
    unembedding above all, is skipped); the caller catches it around ``run_with_hooks``."""


def _direct_effect_of_ablation(weights: dict[str, torch.Tensor], component: Component, clean_act: torch.Tensor, value: torch.Tensor | None,
                               readout: LogitReadout, scale: torch.Tensor, post_norm: "_PostNorm | None" = None,
                               clean_raw: torch.Tensor | None = None, clean_out: torch.Tensor | None = None) -> torch.Tensor:
    """``(o_clean − o_ablated) · ũ / s`` for one head or neuron: [batch, pos].

    With a post-sublayer norm, ``o`` is the layer's normalised output, recomputed from its clean
    pre-norm output ``clean_raw`` minus the component's change (``clean_out`` is the clean ``o``).
    """
    dirs = readout.directions
    if isinstance(component, Head):
        z = clean_act[:, :, component.head, :].float()  # [b, p, d_head]
        replaced = torch.zeros_like(z) if value is None else value.to(z).expand_as(z)
        W = weights["W_O"][component.layer, component.head].to(z)  # [d_head, d_model]
        if post_norm is not None:
            delta = (z - replaced) @ W  # [b, p, d_model]
            return ((clean_out.float() - post_norm(clean_raw.float() - delta)) * dirs).sum(-1) / scale
        w = torch.einsum("kd,bpd->bpk", W, dirs)
        return ((z - replaced) * w).sum(-1) / scale
    post = clean_act[:, :, component.neuron].float()  # [b, p]
    replaced = torch.zeros_like(post) if value is None else value.to(post).expand_as(post)
    row = weights["W_out"][component.layer, component.neuron].float()  # [d_model]
    if post_norm is not None:
        delta = (post - replaced)[..., None] * row  # [b, p, d_model]
        return ((clean_out.float() - post_norm(clean_raw.float() - delta)) * dirs).sum(-1) / scale
    w = dirs @ row  # [b, p]
    return (post - replaced) * w / scale


@torch.no_grad()
def ablation_effects(
    model: Any,
    batch: TokenBatch,
    components: Sequence[Component],
    *,
    method: AblationMethod = "resample",
    reference: TokenBatch | None = None,
    targets: Int[torch.Tensor, "batch pos"] | None = None,
    freeze: Sequence[FreezeTarget] = (),
    chunk_size: int | None = None,
    max_rows: int = 64,
    keep_per_layer: bool = False,
    skip_prefix: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> AblationEffects:
    """Direct effect, total effect and the split of self-repair for ablating each component alone.

    Args:
        model: the bridge.
        batch: the prompts (corpus windows: equal lengths, no padding, is the intended use).
        components: heads (:class:`~helpers.ablation.Head` or ``(layer, head)``) and/or final- or
            mid-layer :class:`~helpers.ablation.Neuron` s. Each is ablated alone.
        method: ``"resample"`` (default, as Rushing & Nanda: activations of another prompt at the
            same position), ``"mean"`` or ``"zero"``.
        reference: prompts for ``"mean"``/``"resample"``; default for resample:
            :func:`~helpers.ablation.resample_reference` ``(batch, seed=seed)``; default for mean:
            ``batch`` itself.
        targets: ``[batch, pos]`` target token ids; default: the correct next token
            (:func:`next_token_targets`).
        freeze: extra freeze-one-at-a-time runs: ``"later_heads"`` (every later attention layer
            held at its clean output), ``"later_mlps"`` (every later MLP layer held), and
            ``"final_norm"`` (free: computed from the main run). Each costs one more forward pass
            per chunk (except ``"final_norm"``).
        chunk_size: components per forward pass; default ``max_rows // len(batch)`` (at least 1).
        keep_per_layer: also keep the change of every layer's direct effect per component
            (``[component, layer, batch, pos]``).
        skip_prefix: group components by layer and start each forward pass at that layer from the
            clean residual stream (``start_at_layer``), without computing the earlier blocks, whose
            outputs the ablation cannot change. Same numbers, a fraction of the compute for late
            layers. ``False`` runs every block (and mixes layers within a chunk).
        progress: show a tqdm bar over chunks.

    Returns:
        :class:`AblationEffects` with ``[component, batch, pos]`` tensors.
    """
    components = [as_component(model, c) for c in components]
    if not components:
        raise ValueError("ablation_effects got no components.")
    for target in freeze:
        if target not in FREEZE_TARGETS:
            raise ValueError(f"freeze entries must be among {FREEZE_TARGETS}, got {target!r}.")
    for component in components:
        _component_layer_for_downstream(component)
    if not isinstance(batch, TokenBatch):
        raise TypeError("batch must be a TokenBatch from helpers.prompts.tokenize or helpers.corpus.load_corpus_tokens.")
    if reference is None:
        reference = resample_reference(batch, seed=seed) if method == "resample" else (batch if method == "mean" else None)
    if targets is None:
        targets, valid = next_token_targets(batch)
    else:
        valid = batch.attention_mask.bool()
    n, n_pos = batch.tokens.shape
    n_layers = model.cfg.n_layers
    readout = logit_readout(model, targets)

    # ---- clean run: per-layer attn/MLP outputs · ũ, final resid, and the ablated activations ----
    act_names = sorted({c.hook_name for c in components})
    need_full = {f"blocks.{l}.hook_attn_out" for l in range(n_layers)} if "later_heads" in freeze else set()
    need_full |= {f"blocks.{l}.hook_mlp_out" for l in range(n_layers)} if "later_mlps" in freeze else set()
    # a post-sublayer norm (Gemma-2/3): the component's layer output before and after that norm
    post_norms = {"attn": _post_norms(model, "attn"), "mlp": _post_norms(model, "mlp")}
    for c in components:
        sublayer = "attn" if isinstance(c, Head) else "mlp"
        if post_norms[sublayer][c.layer] is not None:
            need_full |= {_raw_output_hook(c.layer, sublayer), f"blocks.{c.layer}.hook_{sublayer}_out"}
    start_names = {f"blocks.{c.layer}.hook_resid_pre" for c in components} if skip_prefix else set()
    names = set(act_names) | need_full | start_names
    names |= {f"blocks.{l}.{s}" for l in range(n_layers) for s in ("hook_attn_out", "hook_mlp_out")}
    clean: dict[str, torch.Tensor] = {}

    def store(name: str) -> Hook:
        def hook_fn(activation: torch.Tensor, hook: Any) -> None:
            if name in act_names or name in need_full or name in start_names:
                clean[name] = activation.detach()
            if name.endswith(("hook_attn_out", "hook_mlp_out")):
                clean["dot:" + name] = readout.project(activation.float())[0]

        return (name, hook_fn)

    def read_final(activation: torch.Tensor, hook: Any) -> None:
        clean["resid_dot"] = readout.project(activation.float())[0]
        clean["scale"] = readout.scale(activation.float())
        raise StopForward

    hooks = [store(name) for name in sorted(names)] + [("ln_final.hook_in", read_final)]
    _run_to_final(model, batch.tokens, batch.attention_mask, hooks)
    scale = clean["scale"]
    clean_logit = clean["resid_dot"] / scale + readout.bias
    clean_attn = torch.stack([clean[f"dot:blocks.{l}.hook_attn_out"] for l in range(n_layers)])  # [L, b, p]
    clean_mlp = torch.stack([clean[f"dot:blocks.{l}.hook_mlp_out"] for l in range(n_layers)])

    values = ablation_values(model, components, method, reference)
    weights = {"W_O": model.W_O.detach(), "W_out": model.W_out.detach()}  # the bridge rebuilds these on each access
    def direct_effect(c: Component, v: torch.Tensor | None) -> torch.Tensor:
        sublayer = "attn" if isinstance(c, Head) else "mlp"
        norm = post_norms[sublayer][c.layer]
        if norm is None:
            return _direct_effect_of_ablation(weights, c, clean[c.hook_name], v, readout, scale)
        return _direct_effect_of_ablation(weights, c, clean[c.hook_name], v, readout, scale, norm,
                                          clean[_raw_output_hook(c.layer, sublayer)], clean[f"blocks.{c.layer}.hook_{sublayer}_out"])

    direct = torch.stack([direct_effect(c, v) for c, v in zip(components, values)])

    # ---- ablated runs, chunk_size components per forward pass ----
    if chunk_size is None:
        chunk_size = max(1, max_rows // n)
    total = torch.empty(len(components), n, n_pos)
    later_heads, later_mlps, final_norm = torch.empty_like(total), torch.empty_like(total), torch.empty_like(total)
    per_layer_attn = torch.empty(len(components), n_layers, n, n_pos) if keep_per_layer else None
    per_layer_mlp = torch.empty_like(per_layer_attn) if keep_per_layer else None
    frozen_total = {t: torch.empty_like(total) for t in freeze}
    for index, start_layer in tqdm(_chunks(components, chunk_size, skip_prefix), desc=f"{method}-ablating {len(components)} components",
                                   disable=not progress, leave=False):
        chunk = [components[i] for i in index]
        chunk_values = [values[i] for i in index]
        k = len(chunk)
        mask = batch.attention_mask.repeat(k, 1)
        if start_layer:  # blocks before the ablated layer are identical to the clean run: skip them
            tokens = clean[f"blocks.{start_layer}.hook_resid_pre"].repeat(k, 1, 1)
        else:
            tokens = batch.tokens.repeat(k, 1)
        ablate = stacked_ablation_hooks(model, chunk, chunk_values, n)
        first_attn = torch.tensor([_component_layer_for_downstream(c)[0] for c in chunk])
        first_mlp = torch.tensor([_component_layer_for_downstream(c)[1] for c in chunk])

        out: dict[str, torch.Tensor] = {}

        def record(name: str) -> Hook:
            def hook_fn(activation: torch.Tensor, hook: Any) -> None:
                out[name] = readout.project(activation.float())  # [k, b, p]

            return (name, hook_fn)

        def final(activation: torch.Tensor, hook: Any) -> None:
            x = activation.float()
            out["resid_dot"] = readout.project(x)
            out["scale"] = readout.scale(x).reshape(k, n, n_pos)
            raise StopForward

        record_hooks = [record(f"blocks.{l}.{s}") for l in range(n_layers) for s in ("hook_attn_out", "hook_mlp_out")]
        _run_to_final(model, tokens, mask, ablate + record_hooks + [("ln_final.hook_in", final)], start_layer)
        ablated_logit = out["resid_dot"] / out["scale"] + readout.bias
        sl = torch.tensor(index)
        total[sl] = clean_logit - ablated_logit
        # layers that were skipped are unchanged: their change is 0
        d_attn = torch.stack([out.get(f"blocks.{l}.hook_attn_out", clean_attn[l].expand(k, -1, -1)) for l in range(n_layers)], dim=1) - clean_attn
        d_mlp = torch.stack([out.get(f"blocks.{l}.hook_mlp_out", clean_mlp[l].expand(k, -1, -1)) for l in range(n_layers)], dim=1) - clean_mlp
        d_attn, d_mlp = d_attn / scale, d_mlp / scale
        layers = torch.arange(n_layers)
        attn_mask = (layers[None, :] >= first_attn[:, None]).float()[..., None, None]
        mlp_mask = (layers[None, :] >= first_mlp[:, None]).float()[..., None, None]
        later_heads[sl] = (d_attn * attn_mask).sum(1)
        later_mlps[sl] = (d_mlp * mlp_mask).sum(1)
        final_norm[sl] = out["resid_dot"] * (1.0 / out["scale"] - 1.0 / scale)
        if keep_per_layer:
            per_layer_attn[sl], per_layer_mlp[sl] = d_attn, d_mlp  # type: ignore[index]
        if "final_norm" in freeze:
            frozen_total["final_norm"][sl] = clean_logit - (out["resid_dot"] / scale + readout.bias)
        for target in ("later_heads", "later_mlps"):
            if target not in freeze:
                continue
            site, first = ("hook_attn_out", first_attn) if target == "later_heads" else ("hook_mlp_out", first_mlp)
            freeze_hooks = _freeze_later_hooks(clean, site, first, n, n_layers)
            _run_to_final(model, tokens, mask, ablate + freeze_hooks + [("ln_final.hook_in", final)], start_layer)
            frozen_total[target][sl] = clean_logit - (out["resid_dot"] / out["scale"] + readout.bias)

    return AblationEffects(
        components=components, method=method, direct=direct.cpu(), total=total, later_heads=later_heads,
        later_mlps=later_mlps, final_norm=final_norm, valid=valid.cpu(), clean_logit=clean_logit.cpu(),
        per_layer_attn=per_layer_attn, per_layer_mlp=per_layer_mlp, frozen_total=frozen_total,
    )


def _freeze_later_hooks(clean: dict[str, torch.Tensor], site: str, first_layer: torch.Tensor, n: int, n_layers: int) -> list[Hook]:
    """Hooks holding ``blocks.{l}.{site}`` at its clean value in copy ``i`` for every ``l ≥ first_layer[i]``."""
    hooks: list[Hook] = []
    for layer in range(n_layers):
        copies = [i for i, first in enumerate(first_layer.tolist()) if layer >= first]
        if not copies:
            continue
        name = f"blocks.{layer}.{site}"

        def hold(activation: torch.Tensor, hook: Any, copies=copies, name=name) -> torch.Tensor:
            activation = activation.clone()
            for i in copies:
                activation[i * n : (i + 1) * n] = clean[name].to(activation)
            return activation

        hooks.append((name, hold))
    return hooks


def _chunks(components: Sequence[Component], chunk_size: int, skip_prefix: bool) -> list[tuple[list[int], int]]:
    """Indices of the components run together, and the block each forward pass starts at.

    With ``skip_prefix`` components are grouped by layer (a chunk never mixes layers) and the pass
    starts at that layer; otherwise chunks follow the given order and start at block 0.
    """
    if not skip_prefix:
        return [(list(range(i, min(i + chunk_size, len(components)))), 0) for i in range(0, len(components), chunk_size)]
    by_layer: dict[int, list[int]] = {}
    for i, component in enumerate(components):
        by_layer.setdefault(component.layer, []).append(i)
    return [(idx[i : i + chunk_size], layer) for layer, idx in sorted(by_layer.items()) for i in range(0, len(idx), chunk_size)]


def _run_to_final(model: Any, inputs: torch.Tensor, mask: torch.Tensor, hooks: list[Hook], start_layer: int = 0) -> None:
    """Forward pass with ``hooks``; a hook on ``ln_final.hook_in`` ends it by raising StopForward.

    ``start_layer > 0``: ``inputs`` is the residual stream entering that block (``[rows, pos,
    d_model]``) and the earlier blocks are not computed.
    """
    try:
        with model.hooks(fwd_hooks=hooks):
            if start_layer:
                with skip_blocks_below(model, start_layer):
                    model(inputs, attention_mask=mask, start_at_layer=start_layer)
            else:
                model(inputs, attention_mask=mask)
    except StopForward:
        return
    raise RuntimeError("The forward pass never reached ln_final.hook_in; this model's final norm is not hooked as expected.")


# --------------------------------------------------------------------------------------------------
# Norm-mediated effects on any per-token metric (entropy, loss, …)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def norm_mediated_effects(
    model: Any,
    batch: TokenBatch,
    components: Sequence[Component],
    metric: Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Float[torch.Tensor, "batch pos"]],
    *,
    method: AblationMethod = "mean",
    reference: TokenBatch | None = None,
    values: Sequence[torch.Tensor | None] | None = None,
    chunk_size: int = 1,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Effect of ablating each component on a per-token ``metric`` of the logits, with and without
    the final norm scale free to change (the entropy-neuron analysis, Stolfo et al. 2024).

    For each component ``c`` (ablated alone, ``chunk_size`` per forward pass):

    * ``"total"``: ``metric(ablated) − metric(clean)``, everything recomputed.
    * ``"frozen_scale"``: the same with the final norm scale frozen at the clean value — every path
      except the one through the norm scale.
    * ``"norm_mediated"``: ``total − frozen_scale``: the part carried by the final norm scale.
    * ``"clean"``: ``metric(clean)`` ``[batch, pos]`` (not per component).

    Args:
        metric: maps logits ``[rows, pos, d_vocab]`` to ``[rows, pos]`` (e.g. entropy, or loss of
            the next token); it sees stacked copies, so it must work row-wise.
        values: ablation values (as from :func:`helpers.ablation.ablation_values`); default: computed
            from ``method`` and ``reference`` (``reference`` defaults to ``batch`` for ``"mean"``).

    Returns ``[component, batch, pos]`` tensors (and ``"clean"``), on CPU.
    """
    components = [as_component(model, c) for c in components]
    if values is None:
        if reference is None and method == "mean":
            reference = batch
        elif reference is None and method == "resample":
            reference = resample_reference(batch)
        values = ablation_values(model, components, method, reference)
    names = {"ln_final.hook_scale"}
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                                   names_filter=lambda name: name in names)
    scale = final_norm_scale(cache)
    clean_metric = metric(clean_logits).float().cpu()
    n = len(batch)
    total, frozen = [], []
    for start in tqdm(range(0, len(components), chunk_size), desc="ablating", disable=not progress, leave=False):
        chunk, chunk_values = components[start : start + chunk_size], values[start : start + chunk_size]
        k = len(chunk)
        tokens, mask = batch.tokens.repeat(k, 1), batch.attention_mask.repeat(k, 1)
        ablate = stacked_ablation_hooks(model, chunk, chunk_values, n)
        logits = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=ablate)
        total.append(metric(logits).float().cpu().reshape(k, n, -1))
        del logits
        with quiet_frozen_norm_warning():
            logits = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=ablate + freeze_final_norm_scale_hooks(scale))
        frozen.append(metric(logits).float().cpu().reshape(k, n, -1))
        del logits
    total_t = torch.cat(total) - clean_metric
    frozen_t = torch.cat(frozen) - clean_metric
    return {"total": total_t, "frozen_scale": frozen_t, "norm_mediated": total_t - frozen_t, "clean": clean_metric}


def masked_mean(values: Float[torch.Tensor, "... batch pos"], valid: Bool[torch.Tensor, "batch pos"]) -> torch.Tensor:
    """Mean of ``values`` over the valid (batch, pos) entries, keeping leading dims."""
    weights = valid.to(values.dtype)
    return (values * weights).sum(dim=(-2, -1)) / weights.sum().clamp(min=1)

