"""Tests of helpers.effects against naive hook-based computations, one forward pass per component."""

from __future__ import annotations

import pytest
import torch

from helpers.ablation import Head, Neuron, heads, resample_reference
from helpers.effects import (
    ablation_effects,
    direct_effect_decomposition,
    final_norm_scale,
    freeze_final_norm_scale_hooks,
    logit_readout,
    masked_mean,
    next_token_targets,
    norm_mediated_effects,
    quiet_frozen_norm_warning,
)
from helpers.models import load_model
from helpers.prompts import tokenize

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank",
    "In 1969 the first humans walked on the surface of the moon and came",
    "She opened the old wooden box and found a letter from her grandmother",
]


def _perturb_final_norm(model):
    """Random init leaves γ = 1, β = 0: perturb them so a readout that ignores them fails."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.ln_final.weight.mul_(torch.rand(model.ln_final.weight.shape, generator=gen) + 0.5)
        bias = getattr(model.ln_final.original_component, "bias", None)
        if bias is not None:
            bias.add_(0.2 * torch.randn(bias.shape, generator=gen))


@pytest.fixture(scope="module", params=[("tiny-llama", False), ("tiny-gpt2", False), ("tiny-gpt2", True),
                                        ("tiny-gemma3", False), ("tiny-gemma3", True)],
                ids=["tiny-llama", "tiny-gpt2", "tiny-gpt2-compat", "tiny-gemma3", "tiny-gemma3-compat"])
def model(request):
    name, compat = request.param
    model = load_model(name, device="cpu", compatibility_mode=compat)
    _perturb_final_norm(model)
    return model


@pytest.fixture(scope="module")
def batch(model):
    full = tokenize(model, TEXTS)
    return full[:, -int(full.lengths.min()):]


def target_logits(logits, targets):
    return logits.gather(-1, targets[..., None])[..., 0]


def clean_cache(model, batch, names):
    with torch.no_grad():
        return model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=lambda n: n in names)


def naive_resample_head_hook(layer, head, ref_z):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = ref_z[:, :, head]
        return z

    return hook


def test_direct_effects_sum_to_the_logit(model, batch):
    d = direct_effect_decomposition(model, batch)
    recon = d["embed"] + d["heads"].sum((0, 1)) + d["attn_bias"].sum(0) + d["mlps"].sum(0) + d["bias"]
    torch.testing.assert_close(recon, d["logit"], atol=1e-5, rtol=1e-5)
    assert d["heads"].shape == (model.cfg.n_layers, model.cfg.n_heads, *batch.tokens.shape)


@pytest.mark.embedded
def test_direct_effects_sum_to_the_logit_embedded(embedded_model):
    model = embedded_model
    batch = tokenize(model, TEXTS[:2])
    d = direct_effect_decomposition(model, batch)
    recon = d["embed"] + d["heads"].sum((0, 1)) + d["attn_bias"].sum(0) + d["mlps"].sum(0) + d["bias"]
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(recon[valid], d["logit"][valid], atol=2e-3, rtol=1e-4)


def test_readout_scale_matches_hook_scale(model, batch):
    logits, cache = clean_cache(model, batch, {"ln_final.hook_scale", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"})
    targets, _ = next_token_targets(batch)
    readout = logit_readout(model, targets)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(readout.scale(resid), final_norm_scale(cache)[..., 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((resid * readout.directions).sum(-1) / readout.scale(resid) + readout.bias,
                               target_logits(logits, targets), atol=1e-5, rtol=1e-5)


def test_next_token_targets_masks_last_position_and_padding(model):
    batch = tokenize(model, ["one two three four", "five"])
    targets, valid = next_token_targets(batch)
    assert torch.equal(targets[:, :-1], batch.tokens[:, 1:])
    assert not valid[:, -1].any()
    assert valid[1].sum() == batch.lengths[1] - 1
    assert valid[0].sum() == batch.lengths[0] - 1


def test_frozen_scale_hooks_freeze_the_scale(model, batch):
    logits, cache = clean_cache(model, batch, {"ln_final.hook_scale"})
    scale = final_norm_scale(cache)
    with quiet_frozen_norm_warning(), torch.no_grad():
        same = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=freeze_final_norm_scale_hooks(scale))
        doubled = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=freeze_final_norm_scale_hooks(2 * scale))
    torch.testing.assert_close(same, logits, atol=1e-5, rtol=1e-5)
    assert (doubled - logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="same prompts"):
        with quiet_frozen_norm_warning(), torch.no_grad():
            model.run_with_hooks(batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                                 fwd_hooks=freeze_final_norm_scale_hooks(scale))


@pytest.fixture(scope="module")
def effects(model, batch):
    components = heads(model) + [Neuron(1, 5), Neuron(model.cfg.n_layers - 1, 3)]
    return ablation_effects(model, batch, components, method="resample", seed=4, chunk_size=5,
                            freeze=("final_norm", "later_heads", "later_mlps"), keep_per_layer=True, progress=False)


def test_total_effect_matches_one_forward_per_component(model, batch, effects):
    reference = resample_reference(batch, seed=4)
    names = {f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)} | {f"blocks.{l}.mlp.hook_post" for l in range(model.cfg.n_layers)}
    _, ref = clean_cache(model, reference, names)
    clean_logits = clean_cache(model, batch, set())[0]
    targets, _ = next_token_targets(batch)
    for component in effects.components:
        if isinstance(component, Head):
            name = f"blocks.{component.layer}.attn.hook_z"
            hook = naive_resample_head_hook(component.layer, component.head, ref[name])
        else:
            name = f"blocks.{component.layer}.mlp.hook_post"

            def hook(post, hook, ref_post=ref[name], i=component.neuron):
                post = post.clone()
                post[:, :, i] = ref_post[:, :, i]
                return post

        with torch.no_grad():
            ablated = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[(name, hook)])
        expected = target_logits(clean_logits, targets) - target_logits(ablated, targets)
        torch.testing.assert_close(effects.total[effects.index(component)], expected, atol=1e-5, rtol=1e-4)


def _frozen_downstream_run(model, batch, component, reference, freeze_final=True):
    """Ablate ``component`` with every later attention and MLP output patched back to clean and the
    final scale frozen: the logit change is then the direct effect alone."""
    n_layers = model.cfg.n_layers
    names = {f"blocks.{l}.hook_attn_out" for l in range(n_layers)} | {f"blocks.{l}.hook_mlp_out" for l in range(n_layers)}
    names |= {"ln_final.hook_scale"}
    logits, cache = clean_cache(model, batch, names)
    _, ref = clean_cache(model, reference, {f"blocks.{component.layer}.attn.hook_z"})
    hooks = [(f"blocks.{component.layer}.attn.hook_z",
              naive_resample_head_hook(component.layer, component.head, ref[f"blocks.{component.layer}.attn.hook_z"]))]

    def restore(name):
        return lambda act, hook: cache[name]

    for layer in range(n_layers):
        if layer > component.layer:
            hooks.append((f"blocks.{layer}.hook_attn_out", restore(f"blocks.{layer}.hook_attn_out")))
        if layer >= component.layer:
            hooks.append((f"blocks.{layer}.hook_mlp_out", restore(f"blocks.{layer}.hook_mlp_out")))
    if freeze_final:
        hooks += freeze_final_norm_scale_hooks(final_norm_scale(cache))
    with quiet_frozen_norm_warning(), torch.no_grad():
        ablated = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    targets, _ = next_token_targets(batch)
    return target_logits(logits, targets) - target_logits(ablated, targets)


def test_direct_effect_is_the_effect_with_everything_downstream_frozen(model, batch, effects):
    reference = resample_reference(batch, seed=4)
    for component in [Head(0, 1), Head(1, 3), Head(2, 0)]:
        expected = _frozen_downstream_run(model, batch, component, reference)
        torch.testing.assert_close(effects.direct[effects.index(component)], expected, atol=1e-5, rtol=1e-4)


def test_skipping_the_prefix_changes_nothing(model, batch, effects):
    components = [Head(2, 1), Head(0, 3), Neuron(1, 5), Head(1, 0)]
    full = ablation_effects(model, batch, components, method="resample", seed=4, chunk_size=3,
                            freeze=("later_heads",), skip_prefix=False, progress=False)
    skipped = ablation_effects(model, batch, components, method="resample", seed=4, chunk_size=3,
                               freeze=("later_heads",), skip_prefix=True, progress=False)
    for name in ("direct", "total", "later_heads", "later_mlps", "final_norm"):
        torch.testing.assert_close(getattr(skipped, name), getattr(full, name), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(skipped.frozen_total["later_heads"], full.frozen_total["later_heads"], atol=1e-5, rtol=1e-4)
    # the blocks' forward methods are restored
    assert all("forward" not in vars(block) for block in model.blocks)


def test_self_repair_split_is_exact(effects):
    assert effects.unexplained.abs().max() < 1e-4
    assert effects.self_repair.abs().max() > 1e-3, "the tiny models should show some self-repair"
    torch.testing.assert_close(effects.freeze_repair("final_norm"), effects.final_norm, atol=1e-5, rtol=1e-5)
    # the ablated head's own layer changes by exactly −DE
    for i, component in enumerate(effects.components):
        if isinstance(component, Head):
            torch.testing.assert_close(effects.per_layer_attn[i, component.layer], -effects.direct[i], atol=1e-5, rtol=1e-4)


def test_freezing_later_heads_matches_naive_run(model, batch, effects):
    reference = resample_reference(batch, seed=4)
    component = Head(0, 2)
    n_layers = model.cfg.n_layers
    names = {f"blocks.{l}.hook_attn_out" for l in range(n_layers)}
    logits, cache = clean_cache(model, batch, names)
    _, ref = clean_cache(model, reference, {"blocks.0.attn.hook_z"})
    hooks = [("blocks.0.attn.hook_z", naive_resample_head_hook(0, 2, ref["blocks.0.attn.hook_z"]))]
    hooks += [(f"blocks.{l}.hook_attn_out", (lambda name: lambda act, hook: cache[name])(f"blocks.{l}.hook_attn_out")) for l in range(1, n_layers)]
    with torch.no_grad():
        ablated = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    targets, _ = next_token_targets(batch)
    expected = target_logits(logits, targets) - target_logits(ablated, targets)
    torch.testing.assert_close(effects.frozen_total["later_heads"][effects.index(component)], expected, atol=1e-5, rtol=1e-4)


def test_mean_and_zero_ablation_direct_effects(model, batch):
    comps = [Head(2, 1), Neuron(2, 7)]
    zero = ablation_effects(model, batch, comps, method="zero", progress=False)
    d = direct_effect_decomposition(model, batch)
    # zero ablation: DE of a head is its plain direct logit attribution
    torch.testing.assert_close(zero.direct[0], d["heads"][2, 1], atol=1e-5, rtol=1e-4)
    mean = ablation_effects(model, batch, comps, method="mean", progress=False)
    assert mean.unexplained.abs().max() < 1e-4
    assert not torch.allclose(mean.direct[0], zero.direct[0])


def test_norm_mediated_effects_match_naive(model, batch):
    def entropy(logits):
        logp = logits.float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)

    neuron = Neuron(model.cfg.n_layers - 1, 3)
    result = norm_mediated_effects(model, batch, [neuron, Neuron(1, 2)], entropy, method="zero", chunk_size=2, progress=False)
    logits, cache = clean_cache(model, batch, {"ln_final.hook_scale"})
    name = f"blocks.{neuron.layer}.mlp.hook_post"

    def zero(post, hook):
        post = post.clone()
        post[:, :, neuron.neuron] = 0
        return post

    with quiet_frozen_norm_warning(), torch.no_grad():
        total = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[(name, zero)])
        frozen = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask,
                                      fwd_hooks=[(name, zero)] + freeze_final_norm_scale_hooks(final_norm_scale(cache)))
    torch.testing.assert_close(result["total"][0], entropy(total) - entropy(logits), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result["frozen_scale"][0], entropy(frozen) - entropy(logits), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result["norm_mediated"], result["total"] - result["frozen_scale"])


def test_masked_mean():
    values = torch.tensor([[[1.0, 2.0], [3.0, 100.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    assert masked_mean(values, valid).item() == pytest.approx(2.0)


def test_bad_input(model, batch):
    with pytest.raises(ValueError, match="freeze entries"):
        ablation_effects(model, batch, [Head(0, 0)], freeze=("everything",), progress=False)
    with pytest.raises(ValueError, match="no components"):
        ablation_effects(model, batch, [], progress=False)
    with pytest.raises(TypeError, match="TokenBatch"):
        ablation_effects(model, batch.tokens, [Head(0, 0)], progress=False)
    with pytest.raises(KeyError, match="No freeze run"):
        ablation_effects(model, batch, [Head(0, 0)], progress=False).freeze_repair("later_heads")
    with pytest.raises(KeyError, match="ln_final.hook_scale"):
        final_norm_scale({})
    with pytest.raises(ValueError, match=r"\[batch, pos, 1\]"):
        freeze_final_norm_scale_hooks(torch.ones(2, 3, 4))


def test_token_losses_and_mean_token_loss_match_a_naive_loop(tiny_llama):
    import math

    from helpers.effects import mean_token_loss, token_losses
    from helpers.prompts import TokenBatch

    tokens = torch.tensor([[1, 5, 9, 13, 17], [1, 7, 11, 0, 0]])
    batch = TokenBatch(tokens=tokens, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
                       padding_side="right")
    logits = tiny_llama(tokens, attention_mask=batch.attention_mask)
    losses, valid = token_losses(logits, batch)
    expected, n = 0.0, 0
    for row, length in ((0, 5), (1, 3)):
        for p in range(length - 1):
            logp = torch.log_softmax(logits[row, p].double(), -1)[tokens[row, p + 1]]
            assert math.isclose(float(losses[row, p]), -float(logp), rel_tol=1e-4)
            expected -= float(logp)
            n += 1
    assert valid.sum() == n == 6 and not valid[1, 2:].any() and not valid[:, -1].any()
    assert math.isclose(mean_token_loss(tiny_llama, batch, batch_size=1), expected / n, rel_tol=1e-4)
    with pytest.raises(ValueError, match="no next-token targets"):
        mean_token_loss(tiny_llama, TokenBatch(tokens=tokens[:, :1], attention_mask=batch.attention_mask[:, :1]))
