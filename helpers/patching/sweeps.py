"""The activation-patching sweeps: residual stream, attention and MLP outputs, whole layers, windows of
layers, single hooks, and attention heads (z/q/k/v/pattern), each one batched :class:`_Patcher` run
returning a :class:`~helpers.labelled_tensor.LabelledTensor`."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from jaxtyping import Int

from helpers.labelled_tensor import LabelledTensor
from helpers.metrics import Metric
from helpers.patching.engine import _layer_of, _PatchedRun, _Patcher, _result, _set_head, _set_positions
from helpers.patching.inputs import (
    Direction,
    LogitPositions,
    _check_hook_names,
    _check_layers,
    _check_positions,
    _n_kv_heads,
    _position_labels,
)
from helpers.prompts import TokenBatch

_RESID_SITES = ("resid_pre", "resid_mid", "resid_post")


def patch_residual(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    site: Literal["resid_pre", "resid_mid", "resid_post"] = "resid_pre",
    direction: Direction = "denoise",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
    max_batch_tokens: int | None = None,
    progress: bool = True,
) -> LabelledTensor:
    """Patch the residual stream at one (layer, position) at a time → ``[layer, pos]``.

    What is patched: the residual stream vector ``blocks.{layer}.hook_{site}`` at one position, for all
    prompts at once. ``"resid_pre"`` is the input of block ``layer``; ``"resid_mid"`` is the stream
    after the block's attention (input of its MLP branch); ``"resid_post"`` its output.
    Direction: ``"denoise"`` runs the corrupted prompts with the clean vector patched in;
    ``"noise"`` runs the clean prompts with the corrupted vector patched in.

    ``resid_mid`` is patched for real (the value the MLP reads *and* the residual it is added to), by
    setting the attention output to ``clean_mid - resid_pre``; the bridge's ``hook_resid_mid`` alias is
    the MLP norm's input only, so patching it would leave the skip connection unpatched.

    Args:
        layers, positions: restrict the sweep (default all). Negative positions count from the end.
        logit_positions: ``"auto"`` (unembed only the last real token when the metric provably reads
            nothing else), ``"last"`` or ``"all"``.
        max_batch_tokens: how many tokens (copies × batch × positions) one batched forward may hold;
            default :func:`helpers.batching.max_batch_tokens` (one memory budget scaled by the vocabulary).
    """
    if site not in _RESID_SITES:
        raise ValueError(f"site must be one of {_RESID_SITES}, got {site!r}.")
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    hooks = [f"blocks.{layer}.hook_{site}" for layer in layer_list]
    patcher = _Patcher(model, clean, corrupted, metric, direction, hooks, logit_positions=logit_positions,
                       max_batch_tokens=max_batch_tokens, progress=progress, desc=f"patching {site}")
    pos_list = _check_positions(positions, patcher.n_pos)
    runs = []
    for layer in layer_list:
        source = patcher.source_cache[f"blocks.{layer}.hook_{site}"]
        for pos in pos_list:
            runs.append(_resid_run(patcher, site, layer, source, patcher.relative([pos]))
                        if patcher.covers(pos) else None)
    values, _ = patcher.run(runs)
    return _result(values, (len(layer_list), len(pos_list)), ("layer", "pos"),
                   {"layer": layer_list, "pos": [_position_labels(model, patcher.clean)[p] for p in pos_list]},
                   patcher.meta, f"{site} ({direction})")


def _resid_run(patcher: _Patcher, site: str, layer: int, source: torch.Tensor, positions: list[int] | None
               ) -> _PatchedRun:
    if site == "resid_pre":
        return _PatchedRun([(f"blocks.{layer}.hook_resid_pre", _set_positions(source, positions))], layer)
    if site == "resid_post":
        if layer + 1 < patcher.n_layers:  # the next block's input is the same vector
            return _PatchedRun([(f"blocks.{layer + 1}.hook_resid_pre", _set_positions(source, positions))],
                               layer + 1)
        return _PatchedRun([(f"blocks.{layer}.hook_resid_post", _set_positions(source, positions))], layer)
    # resid_mid = resid_pre + attn_out: set attn_out := source_mid - resid_pre (this run's resid_pre,
    # which is the target's cached one since nothing upstream is patched).
    resid_pre = patcher.target_cache[f"blocks.{layer}.hook_resid_pre"]
    return _PatchedRun([(f"blocks.{layer}.hook_attn_out", _set_positions(source - resid_pre, positions))], layer)


def _component_sweep(model, clean, corrupted, metric, hook_site: str, direction, layers, positions,
                     logit_positions, max_batch_tokens, progress) -> LabelledTensor:
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    hooks = [f"blocks.{layer}.hook_{hook_site}" for layer in layer_list]
    patcher = _Patcher(model, clean, corrupted, metric, direction, hooks, logit_positions=logit_positions,
                       max_batch_tokens=max_batch_tokens, progress=progress, desc=f"patching {hook_site}")
    pos_list = _check_positions(positions, patcher.n_pos)
    runs = []
    for layer in layer_list:
        name = f"blocks.{layer}.hook_{hook_site}"
        for pos in pos_list:
            runs.append(_PatchedRun([(name, _set_positions(patcher.source_cache[name], patcher.relative([pos])))],
                                    layer) if patcher.covers(pos) else None)
    values, _ = patcher.run(runs)
    return _result(values, (len(layer_list), len(pos_list)), ("layer", "pos"),
                   {"layer": layer_list, "pos": [_position_labels(model, patcher.clean)[p] for p in pos_list]},
                   patcher.meta, f"{hook_site} ({direction})")


def patch_attn_out(
    model: Any, clean: Any, corrupted: Any, metric: Metric, direction: Direction = "denoise", *,
    layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto", max_batch_tokens: int | None = None, progress: bool = True,
) -> LabelledTensor:
    """Patch each layer's attention output (``blocks.{l}.hook_attn_out``, all heads summed, what the
    attention adds to the residual stream) at one position at a time → ``[layer, pos]``.

    Direction as in :func:`patch_residual` (denoise: clean output into the corrupted run).
    """
    return _component_sweep(model, clean, corrupted, metric, "attn_out", direction, layers, positions,
                            logit_positions, max_batch_tokens, progress)


def patch_mlp_out(
    model: Any, clean: Any, corrupted: Any, metric: Metric, direction: Direction = "denoise", *,
    layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto", max_batch_tokens: int | None = None, progress: bool = True,
) -> LabelledTensor:
    """Patch each layer's MLP output (``blocks.{l}.hook_mlp_out``) at one position at a time →
    ``[layer, pos]``. Direction as in :func:`patch_residual`."""
    return _component_sweep(model, clean, corrupted, metric, "mlp_out", direction, layers, positions,
                            logit_positions, max_batch_tokens, progress)


def patch_layer_outputs(
    model: Any, clean: Any, corrupted: Any, metric: Metric,
    component: Literal["attn", "mlp", "resid_pre", "resid_mid", "resid_post"] = "attn",
    direction: Direction = "denoise", *, layers: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto", max_batch_tokens: int | None = None, progress: bool = True,
) -> LabelledTensor:
    """Patch a whole layer's component at **all** positions at once → ``[layer]``.

    ``component``: ``"attn"``/``"mlp"`` patch ``hook_attn_out``/``hook_mlp_out`` (what the layer's
    attention/MLP writes into the residual stream); ``"resid_pre"``/``"resid_mid"``/``"resid_post"``
    patch the whole residual stream there (so the run continues exactly as the source run from that
    point: the metric equals the source run's). Direction as in :func:`patch_residual`.
    """
    if component in _RESID_SITES:
        n_layers = int(model.cfg.n_layers)
        layer_list = _check_layers(layers, n_layers)
        patcher = _Patcher(model, clean, corrupted, metric, direction,
                           [f"blocks.{layer}.hook_{component}" for layer in layer_list],
                           logit_positions=logit_positions, max_batch_tokens=max_batch_tokens, progress=progress,
                           desc=f"patching {component}")
        runs = [_resid_run(patcher, component, layer, patcher.source_cache[f"blocks.{layer}.hook_{component}"], None)
                for layer in layer_list]
        values, _ = patcher.run(runs)
        return _result(values, (len(layer_list),), ("layer",), {"layer": layer_list}, patcher.meta,
                       f"{component}, all positions ({direction})")
    if component not in ("attn", "mlp"):
        raise ValueError(f"component must be one of 'attn', 'mlp', {', '.join(map(repr, _RESID_SITES))}; "
                         f"got {component!r}.")
    return patch_layer_window(model, clean, corrupted, metric, component=component, window=1,
                              direction=direction, layers=layers, logit_positions=logit_positions,
                              max_batch_tokens=max_batch_tokens, progress=progress)


def patch_hook(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    hook_names: str | Sequence[str],
    direction: Direction = "denoise",
    *,
    positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
) -> float:
    """One patched run: the activations at ``hook_names`` (any hooks of the model, e.g.
    ``"blocks.3.hook_mlp_out"``) replaced by the source run's at ``positions`` (default all) → metric.

    Direction as in :func:`patch_residual`. Note that the bridge's ``hook_resid_mid`` is the MLP
    norm's input only (use :func:`patch_residual` with ``site="resid_mid"`` for the residual stream).
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("patch_hook needs at least one hook name.")
    _check_hook_names(model, names)
    layers = [_layer_of(name) for name in names]
    start = -1 if any(layer is None for layer in layers) else min(layers)  # -1: from the tokens
    patcher = _Patcher(model, clean, corrupted, metric, direction, names, logit_positions=logit_positions,
                       progress=False, allow_suffix=start >= 0)
    pos_list = None if positions is None else patcher.relative(_check_positions(positions, patcher.n_pos))
    edits = [(name, _set_positions(patcher.source_cache[name], pos_list)) for name in names]
    values, _ = patcher.run([_PatchedRun(edits, start)])
    return values[0]


def patch_layer_window(
    model: Any, clean: Any, corrupted: Any, metric: Metric, component: Literal["attn", "mlp"] = "attn",
    window: int = 3, direction: Direction = "denoise", *, layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None, logit_positions: LogitPositions = "auto",
    max_batch_tokens: int | None = None, progress: bool = True,
) -> LabelledTensor:
    """Patch the attention (or MLP) outputs of a window of ``window`` consecutive layers at once → ``[layer]``.

    Entry ``l`` patches layers ``l - window//2 .. l - window//2 + window - 1`` (clipped to the model),
    i.e. a window centred on ``l`` as in Meng et al.'s causal tracing; the labels give each window.
    What is patched: ``blocks.{i}.hook_attn_out`` (or ``hook_mlp_out``) for every ``i`` in the window, at
    ``positions`` (default all). Direction as in :func:`patch_residual`.
    """
    if component not in ("attn", "mlp"):
        raise ValueError(f"component must be 'attn' or 'mlp', got {component!r}.")
    if int(window) < 1:
        raise ValueError(f"window must be a positive number of layers, got {window}.")
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    site = "attn_out" if component == "attn" else "mlp_out"
    windows = []
    for layer in layer_list:
        first = max(0, layer - window // 2)
        last = min(n_layers - 1, layer - window // 2 + window - 1)
        windows.append(list(range(first, last + 1)))
    needed = sorted({i for w in windows for i in w})
    patcher = _Patcher(model, clean, corrupted, metric, direction, [f"blocks.{i}.hook_{site}" for i in needed],
                       logit_positions=logit_positions, max_batch_tokens=max_batch_tokens, progress=progress,
                       desc=f"patching {site} windows")
    pos_list = None if positions is None else patcher.relative(_check_positions(positions, patcher.n_pos))
    runs = []
    for w in windows:
        edits = [(f"blocks.{i}.hook_{site}", _set_positions(patcher.source_cache[f"blocks.{i}.hook_{site}"], pos_list))
                 for i in w]
        runs.append(_PatchedRun(edits, w[0]))
    values, _ = patcher.run(runs)
    labels = layer_list if window == 1 else [f"{w[0]}-{w[-1]}" for w in windows]
    meta = {**patcher.meta, "windows": windows}
    return _result(values, (len(layer_list),), ("layer",), {"layer": labels}, meta,
                   f"{site} window={window} ({direction})")


_HEAD_ACTIVATIONS = {"z": "hook_z", "q": "hook_q", "k": "hook_k", "v": "hook_v", "pattern": "hook_pattern"}


def patch_heads(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    activation: Literal["z", "q", "k", "v", "pattern"] = "z",
    per_position: bool = False,
    direction: Direction = "denoise",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
    max_batch_tokens: int | None = None,
    progress: bool = True,
) -> LabelledTensor:
    """Patch one attention head's activation at a time → ``[layer, head]`` or ``[layer, pos, head]``.

    What is patched (``blocks.{l}.attn.hook_{activation}``):

    * ``"z"``: the head's output before ``W_O`` (its mixed values), i.e. the head's whole contribution
      to the residual stream — the usual "head output" patch;
    * ``"q"``: its queries (before rotary, where the model uses it); ``"pattern"``: its attention
      pattern (per query position when ``per_position``);
    * ``"k"``/``"v"``: keys/values. With grouped-query attention these exist per **key/value head**
      (dimension ``"kv_head"``, ``model.cfg.n_key_value_heads`` of them), each shared by
      ``n_heads / n_kv_heads`` query heads, so the patch affects the whole group.

    ``per_position=False`` patches all positions at once; ``True`` one (position, head) at a time
    (``[layer, pos, head]``, the layout of ``transformer_lens.patching``'s ``*_by_pos`` sweeps).
    Direction as in :func:`patch_residual` (denoise: clean activation into the corrupted run).
    """
    if activation not in _HEAD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_HEAD_ACTIVATIONS)}, got {activation!r}.")
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    hook = _HEAD_ACTIVATIONS[activation]
    hooks = [f"blocks.{layer}.attn.{hook}" for layer in layer_list]
    patcher = _Patcher(model, clean, corrupted, metric, direction, hooks, logit_positions=logit_positions,
                       max_batch_tokens=max_batch_tokens, progress=progress, desc=f"patching heads ({activation})")
    head_dim_name = "kv_head" if activation in ("k", "v") and _n_kv_heads(model) != int(model.cfg.n_heads) else "head"
    n_heads = _n_kv_heads(model) if head_dim_name == "kv_head" else int(model.cfg.n_heads)
    source_head_axis = 1 if activation == "pattern" else 2
    pos_list = _check_positions(positions, patcher.n_pos) if per_position else None
    if positions is not None and not per_position:
        raise ValueError("positions= only applies with per_position=True.")
    runs = []
    for layer in layer_list:
        name = f"blocks.{layer}.attn.{hook}"
        source = patcher.source_cache[name]
        if source.shape[source_head_axis] != n_heads:
            raise RuntimeError(f"{name} has {source.shape[source_head_axis]} heads, expected {n_heads}.")
        for pos in pos_list if per_position else [None]:
            for head in range(n_heads):
                if pos is not None and not patcher.covers(pos):
                    runs.append(None)  # identical activations in both runs: nothing to patch
                    continue
                rel = None if pos is None else patcher.relative([pos])
                runs.append(_PatchedRun([(name, _set_head(source, head, rel, source_head_axis))], layer))
    values, _ = patcher.run(runs)
    meta = {**patcher.meta, "activation": activation}
    if per_position:
        labels = {"layer": layer_list, "pos": [_position_labels(model, patcher.clean)[p] for p in pos_list],
                  head_dim_name: list(range(n_heads))}
        return _result(values, (len(layer_list), len(pos_list), n_heads), ("layer", "pos", head_dim_name), labels,
                       meta, f"head {activation} per position ({direction})")
    return _result(values, (len(layer_list), n_heads), ("layer", head_dim_name),
                   {"layer": layer_list, head_dim_name: list(range(n_heads))}, meta,
                   f"head {activation} ({direction})")
