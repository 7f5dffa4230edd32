"""Tests of helpers.attribution: DLA adds up to the logit difference; attribution patching equals the
numerical directional derivative; it tracks activation patching on the embedded model's IOI-style task."""

from __future__ import annotations

import pytest
import torch

from helpers import attribution, metrics, patching
from helpers.prompts import tokenize


CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Alice and Bob had a long talk at the old house; Bob handed a book to",
]
CORRUPTED = [
    "When Mary and John went to the store, Paul gave a drink to",
    "Then, Alice and Bob had a long talk at the old house; Mark handed a book to",
]
EQUAL_CLEAN = [
    "When Mary and John went to the park, John gave a small ball to",
    "When Alice and Bob went to the store, Bob gave a cold drink to",
]
EQUAL_CORRUPTED = [
    "When Mary and John went to the park, Paul gave a small ball to",
    "When Alice and Bob went to the store, Mark gave a cold drink to",
]
ANSWERS = [(" Mary", " John"), (" Alice", " Bob")]


def _setup(name, clean=CLEAN, corrupted=CORRUPTED, dtype=torch.float32):
    from helpers.models import load_model
    from helpers.prompts import single_token_id

    model = load_model(name, device="cpu", dtype=dtype)
    both = tokenize(model, clean + corrupted)
    clean_b, corrupted_b = both[: len(clean)], both[len(clean):]
    answers = torch.tensor([[single_token_id(model, a), single_token_id(model, b)] for a, b in ANSWERS])
    return model, clean_b, corrupted_b, answers


RMS_MODELS = ["tiny-llama", "tiny-gemma3"]


@pytest.fixture(scope="module", params=RMS_MODELS)
def llama(request):
    """The RMSNorm layouts in turn: tiny-llama (the embedded model's) and tiny-gemma3 (Gemma-3's, with norms
    after each sublayer too). The name is historical."""
    return _setup(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return _setup("tiny-gpt2")


def _cache(model, batch):
    with torch.no_grad():
        return model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)


# --------------------------------------------------------------------------------------------------
# Direct logit attribution
# --------------------------------------------------------------------------------------------------


def test_dla_layers_add_up_to_logit_diff_rmsnorm(llama):
    model, clean, _, answers = llama
    logits, cache = _cache(model, clean)
    by_layer = attribution.direct_logit_attribution(model, cache, answers, by="layer", batch=clean)
    assert by_layer.dims == ("component",) and by_layer.labels["component"][:3] == ["embed", "0 attn", "0 mlp"]
    # tiny-llama has no biases in the final norm or unembedding: the components add up exactly
    assert by_layer.values.sum().item() == pytest.approx(metrics.logit_diff(logits, answers).item(), abs=1e-4)


def test_dla_layers_add_up_to_logit_diff_layernorm(gpt2):
    model, clean, _, answers = gpt2
    logits, cache = _cache(model, clean)
    by_layer = attribution.direct_logit_attribution(model, cache, answers, by="layer", reduce="none")
    directions = attribution.logit_diff_directions(model, answers)
    bias = directions @ model.ln_final.b + (model.b_U[answers[:, 0]] - model.b_U[answers[:, 1]])
    total = by_layer.values.sum(-1) + bias
    torch.testing.assert_close(total, metrics.logit_diff(logits, answers, reduce="none"), atol=1e-4, rtol=0)


def test_dla_heads_and_neurons_add_up_to_their_layer(llama, gpt2):
    for model, clean, _, answers in (llama, gpt2):
        _, cache = _cache(model, clean)
        by_layer = attribution.direct_logit_attribution(model, cache, answers, by="layer")
        by_head = attribution.direct_logit_attribution(model, cache, answers, by="head")
        by_neuron = attribution.direct_logit_attribution(model, cache, answers, by="neuron")
        assert by_head.shape == (model.cfg.n_layers, model.cfg.n_heads)
        assert by_neuron.shape == (model.cfg.d_mlp,)
        # bias terms (GPT-2 has b_O / b_out) are part of the layer component but of no head / neuron
        directions = attribution.logit_diff_directions(model, answers)
        scale = cache["ln_final.hook_scale"][:, -1]
        eff = directions * model.ln_final.w / scale
        centre = model.cfg.normalization_type.upper().startswith("LN")

        def through_norm(vector):
            vector = vector - vector.mean() if centre else vector
            return (eff @ vector).mean().item()

        for layer in range(model.cfg.n_layers):
            b_O = through_norm(model.blocks[layer].attn.b_O) if centre else 0.0
            assert by_head.values[layer].sum().item() + b_O == pytest.approx(
                by_layer.values[1 + 2 * layer].item(), abs=1e-4)
        b_out = through_norm(model.b_out[-1]) if centre else 0.0
        assert by_neuron.values.sum().item() + b_out == pytest.approx(by_layer.values[-1].item(), abs=1e-4)


def _perturbed(name):
    """A tiny model whose final norm is not the identity: random γ far from 1 (Gemma: the stored offset) and,
    for LayerNorm, a random β, plus a random unembedding bias where the layout has one — so every correction
    term of the readout is exercised (random init leaves γ = 1 and β = 0)."""
    model, clean, _, answers = _setup(name)
    generator = torch.Generator().manual_seed(7)
    norm = model.original_model.transformer.ln_f if name == "tiny-gpt2" else model.original_model.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.empty_like(norm.weight).uniform_(0.3, 2.0, generator=generator))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.5)
        head = model.original_model.lm_head
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.5)
    return model, clean, answers, norm


def _hf_final_norm_readout(name, norm, resid, directions):
    """Reference written from the Hugging Face final-norm module (not the bridge): the frozen-scale map
    ``component ↦ (centre?(component) / s) · (g ⊙ direction)`` with ``s`` computed from the final residual
    ``resid [batch, d_model]`` as the module does, ``g = weight`` (``1 + weight`` for Gemma-3), and the
    constant ``β · direction``."""
    if name == "tiny-gpt2":
        centred = resid - resid.mean(-1, keepdim=True)
        s = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        gain, constant = norm.weight, directions @ norm.bias
    else:
        eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
        s = (resid.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        gain = 1.0 + norm.weight if name == "tiny-gemma3" else norm.weight
        constant = torch.zeros(resid.shape[0])

    def read(component):  # [batch, ..., d_model] -> [batch, ...]
        if name == "tiny-gpt2":
            component = component - component.mean(-1, keepdim=True)
        shape = (resid.shape[0],) + (1,) * (component.ndim - 2) + (resid.shape[1],)
        return (component * (gain * directions / s).view(shape)).sum(-1)

    return read, constant


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_dla_matches_a_reference_written_from_the_hf_final_norm(name):
    model, clean, answers, norm = _perturbed(name)
    logits, cache = _cache(model, clean)
    directions = attribution.logit_diff_directions(model, answers)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]
    read, constant = _hf_final_norm_readout(name, norm, resid, directions)
    unembed_bias = model.original_model.lm_head.bias
    if unembed_bias is not None:
        constant = constant + unembed_bias[answers[:, 0]] - unembed_bias[answers[:, 1]]
    with torch.no_grad():
        by_layer = attribution.direct_logit_attribution(model, cache, answers, by="layer", reduce="none").values
        # the components plus the biases' constant are the model's real logit difference (scale frozen at its value)
        torch.testing.assert_close(by_layer.sum(-1) + constant, metrics.logit_diff(logits, answers, reduce="none"),
                                   atol=2e-4, rtol=0)
        # ... and each component is the reference's readout of it
        parts = [cache["blocks.0.hook_resid_pre"][:, -1]]
        for i in range(model.cfg.n_layers):
            parts += [cache[f"blocks.{i}.hook_attn_out"][:, -1], cache[f"blocks.{i}.hook_mlp_out"][:, -1]]
        torch.testing.assert_close(by_layer, read(torch.stack(parts, 1)), atol=1e-4, rtol=1e-4)
        if name != "tiny-gemma3":  # heads: z @ W_O from the HF output projection (Gemma's post-norm: see above)
            by_head = attribution.direct_logit_attribution(model, cache, answers, by="head", reduce="none").values
            d_head = model.cfg.d_head
            for layer in range(model.cfg.n_layers):
                z = cache[f"blocks.{layer}.attn.hook_z"][:, -1]  # [batch, head, d_head]
                if name == "tiny-gpt2":
                    W_O = model.original_model.transformer.h[layer].attn.c_proj.weight  # [in, out]
                else:
                    W_O = model.original_model.model.layers[layer].self_attn.o_proj.weight.T
                outs = torch.stack([z[:, h] @ W_O[h * d_head:(h + 1) * d_head] for h in range(model.cfg.n_heads)], 1)
                torch.testing.assert_close(by_head[:, layer], read(outs), atol=1e-4, rtol=1e-4)


def test_dla_uses_the_norm_gain_not_one():
    """The perturbed γ is far from 1, so a readout that dropped it (the old fallback) would be far off."""
    model, clean, answers, norm = _perturbed("tiny-gpt2")
    _, cache = _cache(model, clean)
    with torch.no_grad():
        got = attribution.direct_logit_attribution(model, cache, answers, by="layer").values
        norm.weight.fill_(1.0)
        without_gain = attribution.direct_logit_attribution(model, cache, answers, by="layer").values
    assert (got - without_gain).abs().max() > 1e-2


def test_final_norm_readout_raises_instead_of_guessing(tiny_llama):
    from types import SimpleNamespace

    from helpers.models import final_norm

    with pytest.raises(ValueError, match="no `ln_final`"):
        final_norm(SimpleNamespace(cfg=tiny_llama.cfg))
    with pytest.raises(ValueError, match="not a TransformerLens normalisation bridge"):
        final_norm(SimpleNamespace(cfg=tiny_llama.cfg, ln_final=torch.nn.LayerNorm(4)))
    weightless = SimpleNamespace(uses_rms_norm=True, uses_weight_offset=False, weight=None,
                                 original_component=torch.nn.RMSNorm(4, elementwise_affine=False))
    with pytest.raises(ValueError, match="has no weight"):
        final_norm(SimpleNamespace(cfg=tiny_llama.cfg, ln_final=weightless))
    readout = final_norm(tiny_llama)
    assert readout.centre is False and readout.bias is None and readout.gain.shape == (tiny_llama.cfg.d_model,)


def test_dla_validates_inputs(llama):
    model, clean, _, answers = llama
    with torch.no_grad():
        _, cache = model.run_with_cache(clean.tokens, attention_mask=clean.attention_mask,
                                        names_filter=attribution.dla_hook_names(model, "head"))
    attribution.direct_logit_attribution(model, cache, answers, by="head")  # enough hooks
    with pytest.raises(KeyError, match="dla_hook_names"):
        attribution.direct_logit_attribution(model, cache, answers, by="layer")
    with pytest.raises(ValueError, match="d_model"):
        attribution.direct_logit_attribution(model, cache, torch.zeros(2, 7), by="head")
    with pytest.raises(ValueError, match="by must be"):
        attribution.direct_logit_attribution(model, cache, answers, by="block")


# --------------------------------------------------------------------------------------------------
# Attribution patching
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=RMS_MODELS)
def llama64(request):
    # float64 (for a clean numerical derivative) with unpadded prompts: the bridge returns NaN logits for
    # left-padded float64 batches (seen with transformer-lens 4.3 + transformers 5.23).
    return _setup(request.param, EQUAL_CLEAN, EQUAL_CORRUPTED, dtype=torch.float64)


@pytest.mark.parametrize("component, hook, index", [
    ("heads", "blocks.1.attn.hook_z", (slice(None), slice(None), 2)),
    ("heads per position", "blocks.1.attn.hook_z", (slice(None), 12, 2)),  # one head at one position
    ("resid", "blocks.2.hook_resid_pre", (slice(None), 10)),  # the changed (second-subject) token
    ("mlp_out", "blocks.0.hook_mlp_out", (slice(None), -1)),
    ("attn_out", "blocks.1.hook_attn_out", (slice(None), 12)),
])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_patching_is_the_directional_derivative(llama64, component, hook, index, direction):
    """estimate - metric(target) == d/dt metric(target with act + t (source - target) at one component), t=0."""
    model, clean, corrupted, answers = llama64
    metric = metrics.make_logit_diff_metric(answers, clean)
    result = attribution.attribution_patch(model, clean, corrupted, metric, component=component.split()[0],
                                           direction=direction, per_position=True if component.endswith("position") else None)
    target, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source.tokens, attention_mask=source.attention_mask, names_filter=[hook])
        target_logits, target_cache = model.run_with_cache(target.tokens, attention_mask=target.attention_mask,
                                                           names_filter=[hook])
    diff = source_cache[hook] - target_cache[hook]

    def run_at(t):
        def shift(act, hook):
            act = act.clone()
            act[index] += t * diff[index]
            return act

        with torch.no_grad():
            return metric(model.run_with_hooks(target.tokens, attention_mask=target.attention_mask,
                                               fwd_hooks=[(hook, shift)])).item()

    eps = 1e-2  # central difference: O(eps^2) error, well below the tolerance; smaller eps hits rounding
    derivative = (run_at(eps) - run_at(-eps)) / (2 * eps)
    layer = int(hook.split(".")[1])
    if component == "heads":
        estimate = result.values[layer, index[2]].item()
    elif component == "heads per position":
        estimate = result.values[layer, index[1], index[2]].item()
    else:
        estimate = result.values[layer, index[1]].item()
    assert estimate - metric(target_logits).item() == pytest.approx(derivative, rel=2e-3, abs=1e-7)
    assert abs(derivative) > 1e-6  # a real signal, so the check can fail


def test_attribution_patching_shapes_and_baselines(llama):
    model, clean, corrupted, answers = llama
    metric = metrics.make_logit_diff_metric(answers, clean)
    n_layers, n_pos = model.cfg.n_layers, clean.tokens.shape[1]
    heads = attribution.attribution_patch(model, clean, corrupted, metric, "heads")
    assert heads.dims == ("layer", "head") and heads.shape == (n_layers, model.cfg.n_heads)
    by_pos = attribution.attribution_patch(model, clean, corrupted, metric, "heads", per_position=True)
    assert by_pos.shape == (n_layers, n_pos, model.cfg.n_heads)
    # the per-position values are checked entry by entry against a numerical derivative
    # (test_attribution_patching_is_the_directional_derivative, "heads per position")
    resid = attribution.attribution_patch(model, clean, corrupted, metric, "resid")
    assert resid.dims == ("layer", "pos") and resid.shape == (n_layers, n_pos)
    with torch.no_grad():
        clean_value = metric(model(clean.tokens, attention_mask=clean.attention_mask)).item()
    assert resid.meta["clean_value"] == pytest.approx(clean_value, abs=1e-6)
    mid = attribution.attribution_patch(model, clean, corrupted, metric, "resid_mid")
    assert mid.shape == (n_layers, n_pos)


def test_attribution_patching_validates_inputs(llama):
    model, clean, corrupted, answers = llama
    metric = metrics.make_logit_diff_metric(answers, clean)
    with pytest.raises(ValueError, match="same number of prompts and positions"):
        attribution.attribution_patch(model, clean, corrupted[:1], metric)
    with pytest.raises(ValueError, match="component"):
        attribution.attribution_patch(model, clean, corrupted, metric, component="neurons")


@pytest.mark.embedded
def test_attribution_patching_tracks_activation_patching_on_embedded_ioi():
    """A known approximation: test a sane floor on the correlation with activation patching (late layers,
    where IOI's name-mover-like heads are; measured 0.99 for heads and 0.86 for resid_pre on 2 prompts)."""
    pytest.importorskip("gguf")
    model, clean, corrupted, answers = _setup("embedded", EQUAL_CLEAN, EQUAL_CORRUPTED)
    with torch.no_grad():
        clean_ld = metrics.logit_diff(model(clean.tokens), answers).item()
        corrupted_ld = metrics.logit_diff(model(corrupted.tokens), answers).item()
    assert clean_ld - corrupted_ld > 1.0
    metric = metrics.make_logit_diff_metric(answers, clean, clean_ld, corrupted_ld)
    layers = list(range(18, 30))
    attr = attribution.attribution_patch(model, clean, corrupted, metric, "heads")
    act = patching.patch_heads(model, clean, corrupted, metric, layers=layers, progress=False)
    corr = torch.corrcoef(torch.stack([attr.values[layers].flatten(), act.values.flatten()]))[0, 1].item()
    print(f"embedded IOI heads (layers {layers[0]}-{layers[-1]}): corr(attribution, activation patching) = {corr:.3f}")
    assert corr > 0.8
    # the strongest head by activation patching is among the top 5 by attribution
    top_act = act.top(1).iloc[0]
    top_attr = attr.top(5)
    assert any((top_attr["layer"] == top_act["layer"]) & (top_attr["head"] == top_act["head"]))
