"""Ablations: knock out heads, neurons or residual-stream directions, and steer along a direction.

Everything here returns **forward hooks** — lists of ``(hook_name, fn)`` for
``model.run_with_hooks(tokens, attention_mask=..., fwd_hooks=hooks)`` or ``with model.hooks(hooks):``
— except :func:`orthogonalize_weights`, which edits the weights (and undoes the edit on exit).

Components and where they are ablated
-------------------------------------
* :class:`Head` ``(layer, head)`` — the head's slice of ``blocks.{layer}.attn.hook_z``
  ``[batch, pos, head, d_head]`` (its output before ``W_O``), at every position. A plain
  ``(layer, head)`` tuple means a head too.
* :class:`Neuron` ``(layer, neuron)`` — one column of ``blocks.{layer}.mlp.hook_post``
  ``[batch, pos, d_mlp]`` (the activation that multiplies ``W_out``), at every position.
* :class:`ResidDirection` ``(layer, direction, site)`` — the component of the residual stream at
  ``blocks.{layer}.hook_{site}`` along the unit vector ``direction``; the orthogonal complement is
  left exactly as it was. ``"resid_mid"`` (the stream after the block's attention) is edited for
  real: the bridge's ``hook_resid_mid`` is only the MLP norm's *input* — the skip connection carries
  its own copy of the stream — so the same change is also added to the block's output
  (``hook_resid_post``); see :func:`resid_mid_hooks`.

Methods (:func:`ablation_hooks`)
--------------------------------
* ``"zero"`` — replace by 0.
* ``"mean"`` — replace by the mean over every real (non-padding) token of a ``reference`` batch.
* ``"resample"`` — replace by the activation of a *different* prompt at the same position: the
  ``reference`` batch must have the ablated batch's exact shape (use :func:`resample_reference` to
  pair every prompt with another one of the same batch).

Refusal-direction tools (Arditi et al. 2024)
--------------------------------------------
* :func:`direction_ablation_hooks` projects a unit direction ``r`` out of the residual stream at
  every layer: out of ``hook_resid_pre`` of every block and out of every attention and MLP output
  (``hook_attn_out``, ``hook_mlp_out``), so no layer can write along ``r``.
* :func:`orthogonalize_weights` makes the same intervention a weight edit: every matrix that
  writes to the residual stream (token and position embeddings, every attention ``W_O`` and bias,
  every MLP ``W_out`` and bias) is replaced by ``(I - r rᵀ) W``. Tied embeddings are untied first so
  the unembedding stays unchanged. Same outputs as the hooks up to float error (tested).
  Not possible for models that normalise each sublayer's output before adding it to the stream
  (Gemma-2/3's post-attention and post-feedforward norms: ``(1 + γ) ⊙ y / rms(y)`` is not linear in
  the projection's output ``y``, and no weight edit removes ``r`` from it): there it raises
  ``NotImplementedError`` pointing to the hooks, which are exact for every architecture.
* :func:`activation_addition_hooks` adds ``coeff * direction`` to ``hook_resid_pre`` of one layer.

Affine concept editing (ACE; Marshall, Scherlis & Belrose 2024)
---------------------------------------------------------------
Directional ablation sets the coordinate ``x·r`` to **zero**; ACE sets it to a **reference value**
``c`` — e.g. the mean coordinate of harmless prompts — so that ablation moves harmful prompts to
where harmless ones sit, not to the origin: ``x ← x − (x·r − c) r``.

* :func:`affine_ablation_hooks` applies that at ``hook_resid_pre`` of every layer (with a value per
  layer) and, as directional ablation does, projects ``r`` out of every attention and MLP output,
  so the coordinate stays at ``c_l`` through block ``l``. With ``c = 0`` it *is*
  :func:`direction_ablation_hooks`.
* :func:`affine_steering_hooks` sets the coordinate at one layer (e.g. to the harmful mean's) —
  ACE's counterpart of activation addition.
* :func:`affine_edit_weights` is the weight-edit twin of :func:`affine_ablation_hooks` for one
  value ``c`` at every layer: orthogonalise every residual writer (:func:`orthogonalize_weights`)
  and add ``c r`` to every token embedding, so every token starts at ``c`` and nothing moves it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Float

from helpers import batching
from helpers.prompts import TokenBatch

Hook = tuple[str, Callable[..., torch.Tensor]]
AblationMethod = Literal["zero", "mean", "resample"]
ResidSite = Literal["resid_pre", "resid_mid", "resid_post"]

METHODS: tuple[str, ...] = ("zero", "mean", "resample")
RESID_SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """Attention head ``head`` of block ``layer``; ablated in ``blocks.{layer}.attn.hook_z``."""

    layer: int
    head: int

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z"

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class Neuron:
    """MLP neuron ``neuron`` of block ``layer``; ablated in ``blocks.{layer}.mlp.hook_post``."""

    layer: int
    neuron: int

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.mlp.hook_post"

    def __str__(self) -> str:
        return f"L{self.layer}N{self.neuron}"


@dataclass(frozen=True, eq=False)
class ResidDirection:
    """The component along ``direction`` of the residual stream at ``blocks.{layer}.hook_{site}``.

    ``direction`` is normalised to unit length when the hooks are built. ``site="resid_mid"`` edits the
    stream after the attention both where the MLP reads it and on the skip connection
    (:func:`resid_mid_hooks`); :attr:`hook_name` is where its value is read.
    """

    layer: int
    direction: Float[torch.Tensor, "d_model"] = field(repr=False)
    site: ResidSite = "resid_pre"

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.site}"

    def __str__(self) -> str:
        return f"L{self.layer}.{self.site}.dir"


Component = Head | Neuron | ResidDirection


def heads(model: Any, layers: Iterable[int] | None = None) -> list[Head]:
    """Every head of ``model`` (or of ``layers``), in (layer, head) order."""
    layer_list = range(model.cfg.n_layers) if layers is None else layers
    return [Head(layer, head) for layer in layer_list for head in range(model.cfg.n_heads)]


def as_component(model: Any, component: Any) -> Component:
    """Validate one component (a :class:`Head`/:class:`Neuron`/:class:`ResidDirection` or a
    ``(layer, head)`` tuple) against ``model``'s sizes, with an actionable error."""
    if isinstance(component, tuple) and len(component) == 2 and all(isinstance(i, int) for i in component):
        component = Head(*component)
    if not isinstance(component, (Head, Neuron, ResidDirection)):
        raise TypeError(
            f"Cannot ablate {component!r}: expected Head(layer, head), Neuron(layer, neuron), "
            "ResidDirection(layer, direction, site) or a (layer, head) tuple of ints."
        )
    n_layers = model.cfg.n_layers
    if not 0 <= component.layer < n_layers:
        raise ValueError(f"{component}: layer {component.layer} is out of range; the model has {n_layers} layers (0..{n_layers - 1}).")
    if isinstance(component, Head) and not 0 <= component.head < model.cfg.n_heads:
        raise ValueError(f"{component}: head {component.head} is out of range; the model has {model.cfg.n_heads} heads per layer.")
    if isinstance(component, Neuron) and not 0 <= component.neuron < model.cfg.d_mlp:
        raise ValueError(f"{component}: neuron {component.neuron} is out of range; d_mlp is {model.cfg.d_mlp}.")
    if isinstance(component, ResidDirection):
        if component.site not in RESID_SITES:
            raise ValueError(f"ResidDirection site must be one of {RESID_SITES}, got {component.site!r}.")
        unit_direction(component.direction, model.cfg.d_model, name=f"{component}.direction")
    return component


def unit_direction(direction: Any, d_model: int, *, name: str = "direction") -> Float[torch.Tensor, "d_model"]:
    """``direction`` as a float tensor of unit norm; a clear error for a wrong shape, zero or NaN."""
    if not isinstance(direction, torch.Tensor):
        direction = torch.as_tensor(direction)
    if direction.ndim != 1 or direction.shape[0] != d_model:
        raise ValueError(f"{name} must be a 1-D tensor of length d_model={d_model}, got shape {tuple(direction.shape)}.")
    direction = direction.detach().to(torch.float32)
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"{name} has norm {norm.item()}: it must be finite and non-zero to define a direction.")
    return direction / norm


def resid_mid_hooks(model: Any, layer: int, edit: Callable[..., torch.Tensor]) -> list[Hook]:
    """Hooks that apply ``edit(activation, hook) -> new activation`` to the residual stream after block
    ``layer``'s attention (the stream its MLP branch reads and adds to).

    On the bridge ``blocks.{layer}.hook_resid_mid`` is the MLP norm's input (``ln2.hook_in``), not the
    residual stream itself: the block adds the MLP output to its own copy of the stream, so editing
    that hook alone changes only what the MLP reads. These hooks edit it there and add the same
    change to the block's output (``blocks.{layer}.hook_resid_post``), so the MLP reads the edited
    stream *and* the skip connection carries it: the block's output is
    ``edited_mid + MLP(edited_mid)``. The change is complete only after ``hook_resid_post``; a hook on
    it registered before these sees the stream without it.

    Raises ``NotImplementedError`` for an architecture whose ``hook_resid_mid`` is not the MLP norm's
    input (e.g. parallel attention and MLP), where there is no such stream to edit.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers.")
    alias = (getattr(blocks[layer], "hook_aliases", None) or {}).get("hook_resid_mid")
    if alias != "ln2.hook_in":
        raise NotImplementedError(
            f"resid_mid: blocks.{layer}.hook_resid_mid is {alias!r} on this architecture, not the MLP norm's input "
            "('ln2.hook_in'), so there is no residual stream between attention and MLP to edit this way; "
            "use site='resid_pre' or 'resid_post'.")
    state: dict[str, torch.Tensor] = {}

    def at_mlp_input(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        edited = edit(activation, hook)
        state["delta"] = edited - activation
        return edited

    def on_skip_connection(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        delta = state.pop("delta", None)
        if delta is None:
            raise RuntimeError(f"blocks.{layer}.hook_resid_post ran without blocks.{layer}.hook_resid_mid before it "
                               "in this forward pass; cannot carry the resid_mid edit to the block's output.")
        if delta.shape != activation.shape:
            raise RuntimeError(f"resid_mid edit of shape {tuple(delta.shape)} does not fit blocks.{layer}.hook_resid_post "
                               f"{tuple(activation.shape)}.")
        return activation + delta.to(activation)

    return [(f"blocks.{layer}.hook_resid_mid", at_mlp_input), (f"blocks.{layer}.hook_resid_post", on_skip_connection)]


def _site_hooks(model: Any, name: str, fn: Callable[..., torch.Tensor]) -> list[Hook]:
    """``[(name, fn)]``, or for a ``hook_resid_mid`` the pair from :func:`resid_mid_hooks`."""
    if name.endswith(".hook_resid_mid"):
        return resid_mid_hooks(model, int(name.split(".")[1]), fn)
    return [(name, fn)]


# --------------------------------------------------------------------------------------------------
# Zero / mean / resample ablation
# --------------------------------------------------------------------------------------------------


def resample_reference(batch: TokenBatch, *, seed: int = 0) -> TokenBatch:
    """``batch`` with its prompts shuffled so that no prompt stays in place (a derangement).

    Use it as ``reference=`` of a resample ablation: each prompt's ablated activations then come from
    another prompt of the same batch at the same position. Prompts should have equal lengths (as
    corpus chunks do); with left padding a shorter partner supplies padding activations.
    """
    n = len(batch)
    if n < 2:
        raise ValueError("resample_reference needs at least 2 prompts to pair each prompt with another one.")
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == torch.arange(n)).any()):
            break
    return batch[perm.to(batch.tokens.device)]


def _check_batch(batch: Any, argument: str) -> TokenBatch:
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"{argument} must be a TokenBatch from helpers.prompts.tokenize (tokens + attention_mask), got {type(batch).__name__}.")
    return batch


def _select(component: Component, activation: torch.Tensor, directions: dict[int, torch.Tensor]) -> torch.Tensor:
    """The ablated quantity of ``component`` in ``activation`` (its hook's full tensor)."""
    if isinstance(component, Head):
        return activation[:, :, component.head, :]  # [batch, pos, d_head]
    if isinstance(component, Neuron):
        return activation[:, :, component.neuron]  # [batch, pos]
    direction = directions[id(component)].to(activation)
    return activation @ direction  # [batch, pos]


@torch.no_grad()
def ablation_values(
    model: Any,
    components: Sequence[Component],
    method: AblationMethod,
    reference: TokenBatch | None = None,
    *,
    batch_size: int | None = None,
) -> list[torch.Tensor | None]:
    """The value each component is set to, one entry per component.

    * ``"zero"``: ``None`` (nothing to compute).
    * ``"mean"``: the mean over every real token of ``reference`` — ``[d_head]`` for a head, a
      scalar for a neuron or a direction (the mean projection).
    * ``"resample"``: the reference's own activations ``[batch, pos, d_head]`` / ``[batch, pos]``.

    ``reference`` is run in chunks of ``batch_size`` prompts (default: as many as the memory budget of
    :func:`helpers.batching.rows_per_forward` allows), caching only the hooks needed.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    components = [as_component(model, c) for c in components]
    if method == "zero":
        return [None] * len(components)
    if reference is None:
        raise ValueError(f"method={method!r} needs reference=TokenBatch: the prompts whose activations "
                         "are averaged ('mean') or swapped in ('resample'). For resampling within a batch "
                         "use reference=resample_reference(batch).")
    reference = _check_batch(reference, "reference")
    if batch_size is None:
        batch_size = batching.rows_per_forward(model, reference.tokens.shape[1])
    elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int (prompts per forward pass) or None for the memory "
                         f"budget's default, got {batch_size!r}.")
    directions = {id(c): unit_direction(c.direction, model.cfg.d_model) for c in components if isinstance(c, ResidDirection)}
    names = sorted({c.hook_name for c in components})
    sums: list[torch.Tensor | None] = [None] * len(components)
    chunks: list[list[torch.Tensor]] = [[] for _ in components]
    count = 0.0
    for start in range(0, len(reference), batch_size):
        chunk = reference[start : start + batch_size]
        _, cache = model.run_with_cache(chunk.tokens, attention_mask=chunk.attention_mask, names_filter=lambda n: n in names)
        mask = chunk.attention_mask.to(torch.float32)
        count += float(mask.sum())
        for i, c in enumerate(components):
            value = _select(c, cache[c.hook_name], directions).detach()
            if method == "resample":
                chunks[i].append(value)
            else:
                weighted = (value * (mask[..., None] if value.ndim == 3 else mask)).sum(dim=(0, 1))
                sums[i] = weighted if sums[i] is None else sums[i] + weighted
        del cache
    if method == "resample":
        return [torch.cat(parts, dim=0) for parts in chunks]
    return [s / count for s in sums]  # type: ignore[operator]


def _replace(component: Component, activation: torch.Tensor, value: torch.Tensor | None,
             directions: dict[int, torch.Tensor], rows: slice) -> None:
    """In place: set ``component`` of ``activation[rows]`` to ``value`` (0 when ``None``)."""
    if isinstance(component, Head):
        target = activation[rows, :, component.head, :]
        activation[rows, :, component.head, :] = 0.0 if value is None else value.to(target).expand_as(target)
    elif isinstance(component, Neuron):
        target = activation[rows, :, component.neuron]
        activation[rows, :, component.neuron] = 0.0 if value is None else value.to(target).expand_as(target)
    else:
        direction = directions[id(component)].to(activation)
        part = activation[rows]
        current = part @ direction  # [batch, pos]
        new = torch.zeros_like(current) if value is None else value.to(current).expand_as(current)
        activation[rows] = part + (new - current)[..., None] * direction


def _check_resample_shape(component: Component, activation: torch.Tensor, value: torch.Tensor, rows: int) -> None:
    if value.ndim >= 2 and tuple(value.shape[:2]) != (rows, activation.shape[1]):
        raise ValueError(
            f"Resample ablation of {component}: the reference activations are [batch={value.shape[0]}, "
            f"pos={value.shape[1]}] but the ablated run has [batch={rows}, pos={activation.shape[1]}]. "
            "The reference batch must have exactly the ablated batch's shape (e.g. "
            "reference=resample_reference(batch))."
        )


def ablation_hooks(
    model: Any,
    components: Component | Sequence[Component],
    method: AblationMethod = "zero",
    reference: TokenBatch | None = None,
    *,
    batch_size: int | None = None,
) -> list[Hook]:
    """Forward hooks that ablate all of ``components`` at once, at every position.

    Args:
        model: the bridge.
        components: :class:`Head` / :class:`Neuron` / :class:`ResidDirection` objects or
            ``(layer, head)`` tuples (one component alone is fine too).
        method: ``"zero"``, ``"mean"`` (mean over the real tokens of ``reference``) or
            ``"resample"`` (``reference``'s activation at the same batch row and position).
        reference: the reference prompts (required for ``"mean"`` and ``"resample"``). Its
            activations are computed once, here, by a clean forward pass.
        batch_size: chunk size of the reference forward passes (default: from the memory budget,
            :func:`helpers.batching.rows_per_forward`).

    Returns:
        One ``(hook_name, fn)`` per hook point; every other activation (other heads of the same
        layer, other neurons, the orthogonal complement of a direction) is left exactly as it is.
    """
    if isinstance(components, (Head, Neuron, ResidDirection)) or (
        isinstance(components, tuple) and len(components) == 2 and all(isinstance(i, int) for i in components)
    ):
        components = [components]  # type: ignore[list-item]
    components = [as_component(model, c) for c in components]
    if not components:
        raise ValueError("ablation_hooks got no components to ablate.")
    values = ablation_values(model, components, method, reference, batch_size=batch_size)
    directions = {id(c): unit_direction(c.direction, model.cfg.d_model) for c in components if isinstance(c, ResidDirection)}
    by_hook: dict[str, list[tuple[Component, torch.Tensor | None]]] = defaultdict(list)
    for component, value in zip(components, values):
        by_hook[component.hook_name].append((component, value))

    def make_hook(entries: list[tuple[Component, torch.Tensor | None]]) -> Callable[..., torch.Tensor]:
        def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            activation = activation.clone()
            for component, value in entries:
                if method == "resample":
                    _check_resample_shape(component, activation, value, activation.shape[0])  # type: ignore[arg-type]
                _replace(component, activation, value, directions, slice(None))
            return activation

        return hook

    return [hook for name, entries in by_hook.items() for hook in _site_hooks(model, name, make_hook(entries))]


def zero_ablation_hooks(model: Any, components: Component | Sequence[Component]) -> list[Hook]:
    """:func:`ablation_hooks` with ``method="zero"``."""
    return ablation_hooks(model, components, "zero")


def mean_ablation_hooks(model: Any, components: Component | Sequence[Component], reference: TokenBatch) -> list[Hook]:
    """:func:`ablation_hooks` with ``method="mean"`` over the real tokens of ``reference``."""
    return ablation_hooks(model, components, "mean", reference=reference)


def resample_ablation_hooks(model: Any, components: Component | Sequence[Component], reference: TokenBatch) -> list[Hook]:
    """:func:`ablation_hooks` with ``method="resample"`` (``reference`` has the ablated batch's shape)."""
    return ablation_hooks(model, components, "resample", reference=reference)


def stacked_ablation_hooks(
    model: Any,
    components: Sequence[Component],
    values: Sequence[torch.Tensor | None],
    n_prompts: int,
) -> list[Hook]:
    """Hooks for ONE forward pass that ablates each component in its own copy of the prompts.

    The run's batch must be ``len(components)`` copies of an ``n_prompts``-prompt batch stacked along
    the batch dimension (``batch.tokens.repeat(len(components), 1)``); copy ``i`` (rows
    ``i*n_prompts:(i+1)*n_prompts``) has component ``i`` ablated and nothing else. ``values`` come
    from :func:`ablation_values` (``None`` = zero; resample values must be ``[n_prompts, pos, ...]``).
    This is how per-head effects are batched instead of one forward pass per head.
    """
    components = [as_component(model, c) for c in components]
    if len(values) != len(components):
        raise ValueError(f"stacked_ablation_hooks: {len(components)} components but {len(values)} values.")
    directions = {id(c): unit_direction(c.direction, model.cfg.d_model) for c in components if isinstance(c, ResidDirection)}
    by_hook: dict[str, list[tuple[int, Component, torch.Tensor | None]]] = defaultdict(list)
    for copy, (component, value) in enumerate(zip(components, values)):
        by_hook[component.hook_name].append((copy, component, value))
    expected_rows = len(components) * n_prompts

    def make_hook(entries: list[tuple[int, Component, torch.Tensor | None]]) -> Callable[..., torch.Tensor]:
        def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            if activation.shape[0] != expected_rows:
                raise ValueError(
                    f"stacked_ablation_hooks expects a batch of {len(components)} copies × {n_prompts} prompts "
                    f"= {expected_rows} rows, got {activation.shape[0]}: stack the prompts with "
                    f"tokens.repeat({len(components)}, 1)."
                )
            activation = activation.clone()
            for copy, component, value in entries:
                if value is not None and value.ndim >= 2:
                    _check_resample_shape(component, activation, value, n_prompts)
                _replace(component, activation, value, directions, slice(copy * n_prompts, (copy + 1) * n_prompts))
            return activation

        return hook

    return [hook for name, entries in by_hook.items() for hook in _site_hooks(model, name, make_hook(entries))]


# --------------------------------------------------------------------------------------------------
# Direction ablation, weight orthogonalisation, activation addition (refusal direction)
# --------------------------------------------------------------------------------------------------


def direction_ablation_hooks(model: Any, direction: Float[torch.Tensor, "d_model"]) -> list[Hook]:
    """Hooks that remove the unit direction ``r`` from everything written to the residual stream.

    At every layer ``l`` the projection ``x ← x − (x·r) r`` is applied to ``blocks.{l}.hook_resid_pre``
    (the stream entering the block, which includes the embeddings at layer 0), to
    ``blocks.{l}.hook_attn_out`` and to ``blocks.{l}.hook_mlp_out``, at every position — Arditi et al.'s
    "directional ablation". ``direction`` is normalised to unit length first.
    """
    r = unit_direction(direction, model.cfg.d_model)

    def project_out(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        unit = r.to(activation)
        return activation - (activation @ unit)[..., None] * unit

    hooks: list[Hook] = []
    for layer in range(model.cfg.n_layers):
        for site in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"):
            hooks.append((f"blocks.{layer}.{site}", project_out))
    return hooks


def activation_addition_hooks(
    model: Any,
    direction: Float[torch.Tensor, "d_model"],
    layer: int,
    coeff: float = 1.0,
    *,
    site: ResidSite = "resid_pre",
) -> list[Hook]:
    """Hooks that add ``coeff * direction`` to the residual stream at ``blocks.{layer}.hook_{site}`` at
    every position (``"resid_mid"``: where the MLP reads it and on the skip connection, see
    :func:`resid_mid_hooks`).

    ``direction`` is used as given (not normalised): for the refusal direction it is the
    difference of means, whose norm is the natural scale of the intervention.
    """
    if not isinstance(direction, torch.Tensor) or direction.ndim != 1 or direction.shape[0] != model.cfg.d_model:
        shape = tuple(direction.shape) if isinstance(direction, torch.Tensor) else type(direction).__name__
        raise ValueError(f"direction must be a 1-D tensor of length d_model={model.cfg.d_model}, got {shape}.")
    if not bool(torch.isfinite(direction).all()):
        raise ValueError("direction has non-finite entries (NaN or inf): adding it would make every activation NaN.")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers.")
    if site not in RESID_SITES:
        raise ValueError(f"site must be one of {RESID_SITES}, got {site!r}.")
    vector = direction.detach() * float(coeff)

    def add(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return activation + vector.to(activation)

    return _site_hooks(model, f"blocks.{layer}.hook_{site}", add)


def _per_layer_values(value: Any, n_layers: int, name: str) -> list[float]:
    """A float per layer from a number or a length-``n_layers`` sequence / tensor."""
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist() if value.ndim else float(value)
    if isinstance(value, (int, float)):
        values = [float(value)] * n_layers
    else:
        values = [float(v) for v in value]
        if len(values) != n_layers:
            raise ValueError(f"{name} must be a number or one value per layer ({n_layers}), got {len(values)} values.")
    bad = [v for v in values if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise ValueError(f"{name} must be finite, got {bad[:3]}.")
    return values


def _set_coordinate(unit: torch.Tensor, value: float) -> Callable[..., torch.Tensor]:
    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        r = unit.to(activation)
        return activation - ((activation @ r) - value)[..., None] * r
    return hook


def affine_ablation_hooks(model: Any, direction: Float[torch.Tensor, "d_model"], reference: Any) -> list[Hook]:
    """ACE ablation: hold the residual stream's coordinate along the unit ``direction`` at ``reference``.

    At every layer ``l``: ``x ← x − (x·r − c_l) r`` at ``blocks.{l}.hook_resid_pre``, and ``r``
    projected out of ``hook_attn_out`` and ``hook_mlp_out`` (as :func:`direction_ablation_hooks`),
    at every position. ``reference`` is one number for every layer or one per layer (e.g. the
    harmless prompts' mean coordinate at each layer). ``reference = 0`` is directional ablation.
    """
    r = unit_direction(direction, model.cfg.d_model)
    values = _per_layer_values(reference, model.cfg.n_layers, "reference")

    def project_out(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        unit = r.to(activation)
        return activation - (activation @ unit)[..., None] * unit

    hooks: list[Hook] = []
    for layer, value in enumerate(values):
        hooks.append((f"blocks.{layer}.hook_resid_pre", _set_coordinate(r, value)))
        hooks.append((f"blocks.{layer}.hook_attn_out", project_out))
        hooks.append((f"blocks.{layer}.hook_mlp_out", project_out))
    return hooks


def affine_steering_hooks(model: Any, direction: Float[torch.Tensor, "d_model"], value: float, layer: int) -> list[Hook]:
    """ACE steering: set the coordinate of ``blocks.{layer}.hook_resid_pre`` along the unit
    ``direction`` to ``value`` at every position (``x ← x − (x·r − value) r``); later layers run freely."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers.")
    r = unit_direction(direction, model.cfg.d_model)
    return [(f"blocks.{layer}.hook_resid_pre", _set_coordinate(r, _per_layer_values(value, 1, "value")[0]))]


def normalises_sublayer_outputs(model: Any) -> bool:
    """True when attention and MLP outputs pass through a norm before the residual stream (Gemma-2/3).

    The bridge names those norms ``ln1_post`` / ``ln2_post``.
    """
    return any(hasattr(block, name) for block in model.blocks for name in ("ln1_post", "ln2_post"))


def _check_weight_edit_possible(model: Any, what: str) -> None:
    if normalises_sublayer_outputs(model):
        raise NotImplementedError(
            f"{what}: this model normalises every attention and MLP output after its output projection "
            "(post-attention / post-feedforward RMSNorm with (1 + γ) weights, as Gemma-2/3 do), so what a layer "
            "writes into the residual stream is not linear in its weights' output and no weight edit removes a "
            "direction from it. Use direction_ablation_hooks(model, direction) (exact for every architecture; "
            "also in generate via `with model.hooks(...)`), or affine_ablation_hooks for ACE."
        )


def _residual_writers(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """Every module whose output is added to the residual stream: embeddings, attention out
    projections, MLP out projections (the HF modules the bridge runs)."""
    writers = [("embed", model.embed.original_component)]
    if hasattr(model, "pos_embed"):
        writers.append(("pos_embed", model.pos_embed.original_component))
    for layer, block in enumerate(model.blocks):
        writers.append((f"blocks.{layer}.attn.o", block.attn.o.original_component))
        writers.append((f"blocks.{layer}.mlp.out", block.mlp.out.original_component))
    return writers


def _output_axis(name: str, module: torch.nn.Module, d_model: int) -> int:
    """The axis of ``module.weight`` that indexes the residual stream (d_model)."""
    kind = type(module).__name__
    if isinstance(module, torch.nn.Linear):
        axis = 0  # weight [out, in]
    elif isinstance(module, torch.nn.Embedding) or kind == "Conv1D":
        axis = 1  # Embedding [vocab, d_model]; HF Conv1D weight [in, out]
    else:
        raise NotImplementedError(
            f"orthogonalize_weights does not know how {name} ({kind}) writes to the residual stream; "
            "use direction_ablation_hooks instead (it works for every architecture)."
        )
    if module.weight.shape[axis] != d_model:
        raise NotImplementedError(f"{name}: expected d_model={d_model} along axis {axis} of its weight {tuple(module.weight.shape)}.")
    return axis


class OrthogonalizedWeights(contextlib.AbstractContextManager):
    """The handle :func:`orthogonalize_weights` returns: the edit is live until :meth:`restore`
    (called automatically at the end of a ``with`` block)."""

    def __init__(self, model: Any, direction: torch.Tensor):
        self.model = model
        self.direction = direction
        self._saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self._untied: tuple[torch.nn.Module, torch.nn.Parameter] | None = None
        self.active = False

    def _apply(self) -> None:
        model, r = self.model, self.direction
        unembed = model.unembed.original_component
        embed = model.embed.original_component
        if unembed.weight.data_ptr() == embed.weight.data_ptr():
            # Tied embeddings: give the unembedding its own copy so only the embedding is edited.
            self._untied = (unembed, unembed.weight)
            unembed.weight = torch.nn.Parameter(unembed.weight.detach().clone(), requires_grad=False)
        with torch.no_grad():
            for name, module in _residual_writers(model):
                axis = _output_axis(name, module, model.cfg.d_model)
                for attr in ("weight", "bias"):
                    param = getattr(module, attr, None)
                    if param is None:
                        continue
                    self._saved.append((module, attr, param))
                    unit = r.to(param)
                    data = param.detach()
                    if attr == "bias":
                        new = data - (data @ unit) * unit
                    elif axis == 0:  # rows index d_model: W ← (I − r rᵀ) W
                        new = data - unit[:, None] * (unit @ data)[None, :]
                    else:  # columns index d_model: W ← W (I − r rᵀ)
                        new = data - (data @ unit)[:, None] * unit[None, :]
                    setattr(module, attr, torch.nn.Parameter(new, requires_grad=False))
        self.active = True

    def restore(self) -> None:
        """Put the original parameters (and the tied unembedding) back."""
        if not self.active:
            return
        for module, attr, param in reversed(self._saved):
            setattr(module, attr, param)
        if self._untied is not None:
            module, param = self._untied
            module.weight = param
        self._saved, self._untied, self.active = [], None, False

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def orthogonalize_weights(model: Any, direction: Float[torch.Tensor, "d_model"]) -> OrthogonalizedWeights:
    """Edit ``model`` in place so that nothing can write along the unit direction ``r``.

    Every matrix that writes to the residual stream — the token embedding (and learned position
    embedding), every attention output projection ``W_O`` and bias ``b_O``, every MLP output
    projection ``W_out`` and bias ``b_out`` — becomes ``(I − r rᵀ) W``. Because the residual stream
    is the sum of these writes, it then has no component along ``r``: the same model as
    :func:`direction_ablation_hooks`, without hooks (so it also works in ``generate``, exports, …).
    Norms (LayerNorm or RMSNorm) see the same inputs either way, so nothing else changes. Tied
    embeddings (the embedded model) are untied first: the unembedding is not edited.

    Returns an :class:`OrthogonalizedWeights` handle; the edit is live at once and undone by
    ``handle.restore()`` or at the end of ``with orthogonalize_weights(model, r): ...``.
    The original parameter objects are kept, so restoring is exact.

    Raises:
        NotImplementedError: the model normalises its sublayer outputs (Gemma-2/3; see
            :func:`normalises_sublayer_outputs`): no weight edit is equivalent to the hooks there.
    """
    r = unit_direction(direction, model.cfg.d_model)  # bad input first, then what the model allows
    _check_weight_edit_possible(model, "orthogonalize_weights")
    return _applied(OrthogonalizedWeights(model, r))


def _applied(handle: OrthogonalizedWeights) -> OrthogonalizedWeights:
    """Apply a weight edit; if it fails half-way, put every parameter back before re-raising."""
    try:
        handle._apply()
    except Exception:
        handle.active = True
        handle.restore()
        raise
    return handle


class AffineEditedWeights(OrthogonalizedWeights):
    """The handle :func:`affine_edit_weights` returns (restore on exit, like :class:`OrthogonalizedWeights`)."""

    def __init__(self, model: Any, direction: torch.Tensor, value: float):
        super().__init__(model, direction)
        self.value = value

    def _apply(self) -> None:
        super()._apply()  # nothing writes along r any more; the embedding is untied from the unembedding
        embed = self.model.embed.original_component
        if not isinstance(embed, torch.nn.Embedding):
            raise NotImplementedError(f"affine_edit_weights needs an nn.Embedding token embedding, got {type(embed).__name__}; "
                                      "use affine_ablation_hooks instead.")
        with torch.no_grad():
            shifted = embed.weight.detach() + self.value * self.direction.to(embed.weight)[None, :]
        embed.weight = torch.nn.Parameter(shifted, requires_grad=False)  # the orthogonalised one is in _saved


def affine_edit_weights(model: Any, direction: Float[torch.Tensor, "d_model"], value: float) -> AffineEditedWeights:
    """Weight-edit twin of :func:`affine_ablation_hooks` with one ``value`` at every layer.

    Every residual writer is orthogonalised to the unit ``direction`` (:func:`orthogonalize_weights`)
    and ``value · r`` is added to every row of the token embedding: each token's stream starts with
    coordinate ``value`` along ``r`` and no layer changes it. ``value = 0`` is
    :func:`orthogonalize_weights`. Undo with ``handle.restore()`` or a ``with`` block.
    """
    r = unit_direction(direction, model.cfg.d_model)
    _check_weight_edit_possible(model, "affine_edit_weights")
    if hasattr(model, "pos_embed"):
        raise NotImplementedError("affine_edit_weights: a learned position embedding also writes to the stream; "
                                  "put the shift in one of the two by hand, or use affine_ablation_hooks.")
    return _applied(AffineEditedWeights(model, r, float(value)))  # type: ignore[return-value]
