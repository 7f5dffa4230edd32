"""Independent references for helpers.attribution.attribution_patch on the residual stream after attention
(``resid_mid``) and after each block (``resid_post``), every (layer, position) at once.

The reference is the definition of attribution patching: the estimate minus the target run's metric is
the derivative of the metric along ``source - target`` of one component, at the target run. Here one
scalar ``eps[layer, pos]`` per component scales ``source - target`` added to the *real* residual stream —
resid_mid through the attention output (so the MLP reads it and the skip connection carries it), with
``mid = resid_pre + attn_out`` computed by hand; resid_post at the next block's input (the final norm's
input for the last block) — and autograd gives every derivative in one backward pass. None of this uses
the bridge's ``hook_resid_mid`` / ``hook_resid_post`` aliases that attribution_patch reads.
"""

from __future__ import annotations

import pytest
import torch

from helpers import attribution, metrics
from helpers.prompts import single_token_id, tokenize

CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Alice and Bob had a long talk at the old house; Bob handed a book to",
    "After Sarah and Tom arrived, Tom gave a gift to",
]
CORRUPTED = [
    "When Mary and John went to the store, Paul gave a drink to",
    "Then, Alice and Bob had a long talk at the old house; Mark handed a book to",
    "After Sarah and Tom arrived, Anna gave a gift to",
]
ANSWERS = [(" Mary", " John"), (" Alice", " Bob"), (" Sarah", " Tom")]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def setup(request):
    from helpers.models import load_model

    model = load_model(request.param, device="cpu")
    with torch.no_grad():  # sharper attention and larger effects than the std-0.02 initialisation
        for name, param in model.original_model.named_parameters():
            if param.ndim == 2 and ("attn" in name or "mlp" in name):
                param.mul_(4.0)
    both = tokenize(model, CLEAN + CORRUPTED)
    clean, corrupted = both[: len(CLEAN)], both[len(CLEAN):]
    answers = torch.tensor([[single_token_id(model, a), single_token_id(model, b)] for a, b in ANSWERS])
    return model, clean, corrupted, metrics.make_logit_diff_metric(answers, clean)


def _streams(model, batch, site):
    """``[layer, batch, pos, d_model]``: the residual stream at ``site`` of every layer, by hand."""
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + \
            [f"blocks.{l}.hook_attn_out" for l in range(n_layers)] + ["ln_final.hook_in"]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=names)
    if site == "resid_mid":
        return torch.stack([cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"]
                            for l in range(n_layers)])
    return torch.stack([cache[f"blocks.{l + 1}.hook_resid_pre"] for l in range(n_layers - 1)] + [cache["ln_final.hook_in"]])


def _where_added(model, site, layer):
    """The hook where a change of the stream at ``site`` of ``layer`` enters the real residual stream."""
    if site == "resid_mid":
        return f"blocks.{layer}.hook_attn_out"
    return f"blocks.{layer + 1}.hook_resid_pre" if layer + 1 < model.cfg.n_layers else "ln_final.hook_in"


def _derivatives(model, target, metric, diff, site):
    """d metric / d eps[layer, pos] at eps = 0, the stream at (layer, pos) moved by eps * diff there."""
    n_layers, n_pos = model.cfg.n_layers, target.tokens.shape[1]
    eps = torch.zeros(n_layers, n_pos, requires_grad=True)

    def shift(layer):
        def hook(activation, hook):
            return activation + eps[layer][None, :, None] * diff[layer].to(activation)

        return hook

    hooks = [(_where_added(model, site, layer), shift(layer)) for layer in range(n_layers)]
    with torch.enable_grad():
        value = metric(model.run_with_hooks(target.tokens, attention_mask=target.attention_mask, fwd_hooks=hooks))
        (grad,) = torch.autograd.grad(value, eps)
    return value.item(), grad


@pytest.mark.parametrize("site", ["resid_mid", "resid_post"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_patching_of_the_residual_stream_is_its_directional_derivative(setup, site, direction):
    model, clean, corrupted, metric = setup
    target, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    diff = _streams(model, source, site) - _streams(model, target, site)
    target_value, derivative = _derivatives(model, target, metric, diff, site)

    result = attribution.attribution_patch(model, clean, corrupted, metric, site, direction)
    assert result.dims == ("layer", "pos") and result.shape == tuple(derivative.shape)
    assert result.meta["corrupted_value" if direction == "denoise" else "clean_value"] == pytest.approx(target_value,
                                                                                                        abs=1e-6)
    scale = float(derivative.abs().max())
    assert scale > 1e-3, "the metric should depend on the stream, so that the comparison can fail"
    torch.testing.assert_close(result.values - target_value, derivative, atol=1e-4 * scale, rtol=1e-3)
    # all positions at once: the derivative along the whole layer's difference is the sum over positions
    whole = attribution.attribution_patch(model, clean, corrupted, metric, site, direction, per_position=False)
    assert whole.dims == ("layer",)
    torch.testing.assert_close(whole.values - target_value, derivative.sum(1), atol=1e-4 * scale, rtol=1e-3)
