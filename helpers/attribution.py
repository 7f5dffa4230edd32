"""Attribution without one forward pass per component: direct logit attribution and attribution patching.

* :func:`direct_logit_attribution` — from a cache of one run: how much each head / layer component /
  neuron writes *directly* along an answer direction (e.g. ``W_U[:, correct] - W_U[:, wrong]``),
  through the final norm with the scale the run actually had (``ln_final.hook_scale`` from the cache,
  treated as a constant — the standard linearisation). The components of ``by="layer"`` add up to the
  final logit difference (up to the final norm's and unembedding's biases). Models that normalise each
  sublayer's output before the residual stream (Gemma-2/3's post-attention / post-feedforward
  RMSNorms) are linearised the same way: a head's or neuron's output goes through its layer's
  post-norm with that run's scale (``blocks.{l}.ln1_post.hook_scale`` / ``ln2_post``) and gain
  ``1 + γ``, so the heads of a layer add up to its attention output and the neurons to its MLP output.
* :func:`attribution_patching` (:func:`attribution_patch`) — the first-order Taylor estimate of
  activation patching (Nanda 2023; Syed et al. 2023): with the run being patched cached with
  gradients, ``metric(patched) ≈ metric(target) + grad · (source_act - target_act)``, for every
  component at once from one forward and one backward pass (plus one forward, without gradients, to
  cache the source run). Same component sets, shapes and direction conventions as
  :mod:`helpers.patching`, so the two can be compared entry by entry. It is an approximation: good
  for small, local changes (e.g. most heads), poor where the metric saturates (e.g. the residual
  stream at the changed token in early layers).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from helpers.metrics import Metric, _check_answer_tokens, _positions_tensor
from helpers.labelled_tensor import LabelledTensor
from helpers.models import final_norm, norm_gain, post_sublayer_norm, post_sublayer_norm_hook
from helpers.patching.engine import _scalar
from helpers.patching.inputs import Direction, _check_direction, _check_hook_names, _check_pair, _position_labels

__all__ = [
    "logit_diff_directions",
    "direct_logit_attribution",
    "dla_hook_names",
    "attribution_patch",
    "attribution_patching",
]


# ==================================================================================================
# Direct logit attribution
# ==================================================================================================


def logit_diff_directions(
    model: Any, answer_tokens: Int[torch.Tensor, "batch 2"] | Int[torch.Tensor, "batch n_pairs 2"]
) -> Float[torch.Tensor, "batch d_model"]:
    """``W_U[:, correct] - W_U[:, wrong]`` per prompt (mean over pairs for ``[batch, n_pairs, 2]``).

    The dot product of the final (normalised) residual stream with it is the logit difference.
    """
    W_U = model.W_U
    answers = _check_answer_tokens(answer_tokens, torch.as_tensor(answer_tokens).shape[0], W_U.shape[1], W_U.device)
    directions = W_U[:, answers[..., 0]] - W_U[:, answers[..., 1]]  # [d_model, batch, n_pairs]
    return directions.mean(-1).T.contiguous()


def dla_hook_names(model: Any, by: Literal["head", "layer", "neuron"] = "head", layer: int | None = None) -> list[str]:
    """The hooks :func:`direct_logit_attribution` reads: pass them as ``run_with_cache(names_filter=...)``."""
    n_layers = int(model.cfg.n_layers)
    names = ["ln_final.hook_scale"]
    if by == "head":
        names += [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
        names += [f"blocks.{i}.{post_sublayer_norm_hook('attn')}.hook_scale" for i in range(n_layers)
                  if post_sublayer_norm(model, i, "attn") is not None]
    elif by == "layer":
        names += ["blocks.0.hook_resid_pre"]
        names += [f"blocks.{i}.hook_{c}" for i in range(n_layers) for c in ("attn_out", "mlp_out")]
    elif by == "neuron":
        layer = n_layers - 1 if layer is None else layer % n_layers
        names += [f"blocks.{layer}.mlp.hook_post"]
        if post_sublayer_norm(model, layer, "mlp") is not None:
            names += [f"blocks.{layer}.{post_sublayer_norm_hook('mlp')}.hook_scale"]
    else:
        raise ValueError(f"by must be 'head', 'layer' or 'neuron', got {by!r}.")
    return names


def _final_norm_direction(model: Any, cache: Any, directions: torch.Tensor, positions: torch.Tensor):
    """Per prompt, the linear map from a residual component at the read position to the answer logit(s).

    Returns ``(effective_direction [batch, d_model], centre: bool)``: component ↦
    ``(centre(component) / scale) · (w ⊙ direction)``.
    """
    if "ln_final.hook_scale" not in cache:
        raise KeyError(
            "direct_logit_attribution needs 'ln_final.hook_scale' in the cache (the final norm's scale of this "
            "run). Cache it, e.g. run_with_cache(..., names_filter=helpers.attribution.dla_hook_names(model, by))."
        )
    scale = cache["ln_final.hook_scale"]  # [batch, pos, 1]
    rows = torch.arange(scale.shape[0], device=scale.device)
    scale = scale[rows, positions]  # [batch, 1]
    norm = final_norm(model)  # γ (1 + γ for Gemma's offset norms), centring; raises instead of guessing
    effective = directions * norm.gain.to(directions)
    centre = norm.centre
    return effective / scale, centre


def _through_post_norm(model: Any, cache: Any, layer: int, sublayer: str, out: torch.Tensor,
                       rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``out [batch, ..., d_model]`` (part of a sublayer's output projection) as it enters the residual
    stream: unchanged, or through the layer's post-sublayer RMSNorm with this run's scale frozen."""
    norm = post_sublayer_norm(model, layer, sublayer)
    if norm is None:
        return out
    scale = cache[f"blocks.{layer}.{post_sublayer_norm_hook(sublayer)}.hook_scale"][rows, positions]  # [batch, 1]
    gain = norm_gain(norm).to(out)
    return out * gain / scale.view(out.shape[0], *([1] * (out.ndim - 1)))


def _project(component: torch.Tensor, effective: torch.Tensor, centre: bool) -> torch.Tensor:
    """``component [batch, ..., d_model]`` · ``effective [batch, d_model]`` → ``[batch, ...]``."""
    if centre:
        component = component - component.mean(-1, keepdim=True)
    shape = (effective.shape[0],) + (1,) * (component.ndim - 2) + (effective.shape[1],)
    return (component * effective.view(shape)).sum(-1)


def direct_logit_attribution(
    model: Any,
    cache: Any,
    directions: Float[torch.Tensor, "batch d_model"] | Int[torch.Tensor, "batch 2"] | Int[torch.Tensor, "batch n 2"],
    by: Literal["head", "layer", "neuron"] = "head",
    *,
    batch: Any = None,
    positions: Any = None,
    layer: int | None = None,
    reduce: Literal["mean", "none"] = "mean",
) -> LabelledTensor:
    """Direct effect of each component on the answer direction, read from one run's cache.

    What is measured: the component's output at each prompt's last real token, passed through the
    final norm *with that run's scale* (``ln_final.hook_scale``, frozen) and dotted with the
    direction. For a logit-difference direction this is the component's direct contribution to the
    logit difference.

    Args:
        cache: ``ActivationCache`` (or dict) of the run; :func:`dla_hook_names` lists what it needs.
        directions: ``[batch, d_model]`` residual directions, or answer tokens ``[batch, 2]``
            (``[batch, n_pairs, 2]``) turned into ``W_U[:, correct] - W_U[:, wrong]``.
        by: ``"head"`` → ``[layer, head]`` (head output = ``z @ W_O``, without the output bias);
            ``"layer"`` → ``[component]``: the embeddings, then each layer's attention and MLP output
            (these add up to the logit difference minus the final norm/unembedding biases);
            ``"neuron"`` → ``[neuron]`` of MLP layer ``layer`` (default the last):
            ``post-activation × W_out`` row. With post-sublayer norms (Gemma-2/3) head and neuron
            outputs pass through their layer's norm with the run's scale (see the module docstring).
        batch / positions: where each prompt's last real token is (default position -1).
        reduce: ``"mean"`` over prompts (default) or ``"none"`` (a leading ``batch`` dim).
    """
    if by not in ("head", "layer", "neuron"):
        raise ValueError(f"by must be 'head', 'layer' or 'neuron', got {by!r}.")
    if batch is not None and positions is not None:
        raise ValueError("Pass either batch= or positions=, not both.")
    missing = [name for name in dla_hook_names(model, by, layer) if name not in cache]
    if missing:
        raise KeyError(
            f"The cache lacks {missing[:4]}{' …' if len(missing) > 4 else ''}. Run the model with "
            f"run_with_cache(..., names_filter=helpers.attribution.dla_hook_names(model, {by!r}))."
        )
    scale = cache["ln_final.hook_scale"]
    n_batch, n_pos = scale.shape[0], scale.shape[1]
    directions = torch.as_tensor(directions)
    if not directions.is_floating_point():
        directions = logit_diff_directions(model, directions)
    if directions.shape != (n_batch, model.cfg.d_model):
        raise ValueError(
            f"directions must be [batch, d_model] = [{n_batch}, {model.cfg.d_model}] or answer tokens [batch, 2]; "
            f"got shape {tuple(directions.shape)}."
        )
    pos = _positions_tensor(batch if batch is not None else positions, n_batch, n_pos, scale.device)
    rows = torch.arange(n_batch, device=scale.device)
    effective, centre = _final_norm_direction(model, cache, directions.to(scale.device, scale.dtype), pos)
    n_layers = int(model.cfg.n_layers)

    if by == "head":
        W_O = model.W_O  # [layer, head, d_head, d_model]
        per = []
        for i in range(n_layers):
            z = cache[f"blocks.{i}.attn.hook_z"][rows, pos]  # [batch, head, d_head]
            out = _through_post_norm(model, cache, i, "attn", torch.einsum("bhd,hdm->bhm", z, W_O[i]), rows, pos)
            per.append(_project(out, effective, centre))  # [batch, head]
        values = torch.stack(per, dim=1)  # [batch, layer, head]
        dims, labels = ("layer", "head"), {}
    elif by == "layer":
        parts = [cache["blocks.0.hook_resid_pre"][rows, pos]]
        names = ["embed"]
        for i in range(n_layers):
            parts += [cache[f"blocks.{i}.hook_attn_out"][rows, pos], cache[f"blocks.{i}.hook_mlp_out"][rows, pos]]
            names += [f"{i} attn", f"{i} mlp"]
        values = _project(torch.stack(parts, dim=1), effective, centre)  # [batch, component]
        dims, labels = ("component",), {"component": names}
    else:
        layer = n_layers - 1 if layer is None else layer % n_layers
        post = cache[f"blocks.{layer}.mlp.hook_post"][rows, pos]  # [batch, d_mlp]
        W_out = model.W_out[layer]  # [d_mlp, d_model]
        if centre:
            W_out = W_out - W_out.mean(-1, keepdim=True)
        # a post-feedforward norm with the run's scale: per prompt, each neuron's row times gain / scale
        read = _through_post_norm(model, cache, layer, "mlp", effective[:, None, :], rows, pos)[:, 0]  # [batch, d_model]
        values = post * torch.einsum("nm,bm->bn", W_out, read)  # [batch, neuron]
        dims, labels = ("neuron",), {}
    meta = {"what": f"direct logit attribution by {by}", "layer": layer if by == "neuron" else None}
    if reduce == "mean":
        return LabelledTensor(values.mean(0).detach().cpu(), dims, labels, meta)
    if reduce == "none":
        labels = {**labels, "batch": list(range(n_batch))}
        return LabelledTensor(values.detach().cpu(), ("batch", *dims), labels, meta)
    raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}.")


# ==================================================================================================
# Attribution patching
# ==================================================================================================

_COMPONENT_HOOKS = {
    "heads": "attn.hook_z",
    "resid": "hook_resid_pre",
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}


def attribution_patch(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    component: Literal["heads", "resid", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = "heads",
    direction: Direction = "denoise",
    *,
    per_position: bool | None = None,
) -> LabelledTensor:
    """Attribution patching: the linear estimate of every activation-patching result at once.

    For each component ``a`` (same sets as :mod:`helpers.patching`), with ``target`` the run being
    patched (corrupted when denoising) and ``source`` the run patched in::

        estimate = metric(target) + sum( d metric / d a |target  ×  (a_source - a_target) )

    summed over prompts and the component's dimensions (``d_model``, or ``d_head`` for heads).
    Costs one forward + one backward on the target run and one no-grad forward on the source run.

    Args:
        component: ``"heads"`` (head outputs, ``hook_z``) → ``[layer, head]``, or ``[layer, pos, head]``
            with ``per_position=True``; ``"resid"``/``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``,
            ``"attn_out"``, ``"mlp_out"`` → ``[layer, pos]`` (or ``[layer]`` with ``per_position=False``).
        direction: ``"denoise"`` (gradient at the corrupted run, clean activations patched in) or
            ``"noise"`` (gradient at the clean run, corrupted activations patched in).

    Returns:
        Estimated metric values, directly comparable to the activation-patching sweep of the same
        component (``meta`` holds ``clean_value``/``corrupted_value`` as there).
    """
    _check_direction(direction)
    if component not in (*_COMPONENT_HOOKS, "resid_mid"):
        raise ValueError(f"component must be one of {sorted([*_COMPONENT_HOOKS, 'resid_mid'])}, got {component!r}.")
    if per_position is None:
        per_position = component != "heads"
    clean_b, corrupted_b = _check_pair(model, clean, corrupted)
    target, source = (corrupted_b, clean_b) if direction == "denoise" else (clean_b, corrupted_b)
    n_layers = int(model.cfg.n_layers)
    if component == "resid_mid":
        # The residual stream after attention: its value is the MLP norm's input; the gradient with
        # respect to the whole mid stream equals the gradient with respect to the attention output.
        value_names = [f"blocks.{i}.hook_resid_mid" for i in range(n_layers)]
        grad_names = [f"blocks.{i}.hook_attn_out" for i in range(n_layers)]
    else:
        value_names = [f"blocks.{i}.{_COMPONENT_HOOKS[component]}" for i in range(n_layers)]
        grad_names = value_names
    _check_hook_names(model, {*value_names, *grad_names})

    with torch.no_grad():
        source_logits, source_cache = model.run_with_cache(source.tokens, attention_mask=source.attention_mask,
                                                           names_filter=value_names)
    target_values: dict[str, torch.Tensor] = {}
    grad_inputs: dict[str, torch.Tensor] = {}

    def make_hook(name: str, keep_value: bool, keep_grad: bool):
        def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            if keep_value:
                target_values[name] = activation.detach()
            if keep_grad:
                grad_inputs[name] = activation
            return activation

        return hook

    # Gradients flow from the embeddings on (the parameters do not require grad).
    def embed_hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return activation.detach().requires_grad_(True)

    hooks = [("blocks.0.hook_resid_pre", embed_hook)]
    for v_name, g_name in zip(value_names, grad_names):
        if v_name == g_name:
            hooks.append((v_name, make_hook(v_name, True, True)))
        else:
            hooks += [(v_name, make_hook(v_name, True, False)), (g_name, make_hook(g_name, False, True))]
    with torch.enable_grad():
        with model.hooks(fwd_hooks=hooks):
            target_logits = model(target.tokens, attention_mask=target.attention_mask)
        value = metric(target_logits)
        target_value = _scalar(value.detach(), "metric")
        grads = torch.autograd.grad(value, [grad_inputs[g] for g in grad_names], allow_unused=True)

    per_layer = []
    for v_name, grad in zip(value_names, grads):
        diff = source_cache[v_name] - target_values[v_name]
        if grad is None:
            grad = torch.zeros_like(diff)
        product = (grad.detach() * diff).sum(0)  # [pos, ...] summed over prompts
        if component == "heads":
            product = product.sum(-1)  # [pos, head]
            per_layer.append(product if per_position else product.sum(0))
        else:
            product = product.sum(-1)  # [pos]
            per_layer.append(product if per_position else product.sum())
    estimate = target_value + torch.stack(per_layer).float().cpu()
    with torch.no_grad():
        source_value = _scalar(metric(source_logits), "metric")
    meta = {
        "what": f"attribution patching {component} ({direction})",
        "direction": direction,
        "clean_value": source_value if direction == "denoise" else target_value,
        "corrupted_value": target_value if direction == "denoise" else source_value,
    }
    labels: dict[str, list] = {"layer": list(range(n_layers))}
    if per_position:
        labels["pos"] = _position_labels(model, clean_b)
    if component == "heads":
        dims = ("layer", "pos", "head") if per_position else ("layer", "head")
    else:
        dims = ("layer", "pos") if per_position else ("layer",)
    return LabelledTensor(estimate, dims, labels, meta)


attribution_patching = attribution_patch
"""Alias of :func:`attribution_patch`."""
