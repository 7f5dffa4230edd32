"""Tests of helpers.ablation against naive, hand-written hooks (one forward pass per component)."""

from __future__ import annotations

import pytest
import torch

from helpers.ablation import (
    Head,
    Neuron,
    ResidDirection,
    ablation_hooks,
    ablation_values,
    activation_addition_hooks,
    affine_ablation_hooks,
    affine_edit_weights,
    affine_steering_hooks,
    direction_ablation_hooks,
    mean_ablation_hooks,
    normalises_sublayer_outputs,
    orthogonalize_weights,
    resample_reference,
    resample_ablation_hooks,
    stacked_ablation_hooks,
    zero_ablation_hooks,
)
from helpers.models import load_model
from helpers.prompts import tokenize

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank",
    "In 1969 the first humans walked on the surface of the moon and came",
    "She opened the old wooden box and found a letter from her grandmother",
    "Prices rose sharply last year because the supply of grain was very low",
]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def model(request):
    return load_model(request.param, device="cpu")


@pytest.fixture(scope="module")
def batch(model):
    # Equal-length prompts: truncate to the shortest so resampling pairs real tokens with real tokens.
    full = tokenize(model, TEXTS)
    width = int(full.lengths.min())
    return full[:, -width:]


def run(model, batch, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=list(hooks))


def capture(store, key):
    def hook(activation, hook):
        store[key] = activation.detach().clone()
        return activation

    return hook


# ------------------------------------------------------------------------------------------------
# Direction ablation == weight orthogonalisation
# ------------------------------------------------------------------------------------------------


def _check_orthogonalisation_matches_hooks(model, batch, atol):
    torch.manual_seed(1)
    direction = torch.randn(model.cfg.d_model) * 3.0  # not unit: both must normalise
    clean = run(model, batch)
    hooked = run(model, batch, direction_ablation_hooks(model, direction))
    unembed_before = model.unembed.original_component.weight.detach().clone()
    with orthogonalize_weights(model, direction):
        with torch.no_grad():
            edited = model(batch.tokens, attention_mask=batch.attention_mask)
        # Tied embeddings must not drag the unembedding along.
        assert torch.equal(model.unembed.original_component.weight, unembed_before)
    restored = run(model, batch)
    mask = batch.attention_mask.bool()
    assert (clean - hooked)[mask].abs().max() > 1e-3, "the ablation should change the logits"
    torch.testing.assert_close(edited[mask], hooked[mask], atol=atol, rtol=1e-4)
    assert torch.equal(restored, clean), "restore() must put the exact original weights back"


def test_orthogonalize_matches_direction_hooks(model, batch):
    if normalises_sublayer_outputs(model):
        _check_no_weight_edit_for_normalised_outputs(model, batch)
        return
    _check_orthogonalisation_matches_hooks(model, batch, atol=1e-4)


def _check_no_weight_edit_for_normalised_outputs(model, batch):
    """Gemma-3 layout: orthogonalising the output projections does not remove r from the stream (the
    post-sublayer norms rescale each coordinate), so orthogonalize_weights refuses, pointing to the hooks."""
    direction = torch.randn(model.cfg.d_model)
    unit = direction / direction.norm()
    with pytest.raises(NotImplementedError, match="direction_ablation_hooks"):
        orthogonalize_weights(model, direction)
    with pytest.raises(NotImplementedError, match="direction_ablation_hooks"):
        affine_edit_weights(model, direction, 1.0)
    writers = [block.attn.o.original_component for block in model.blocks] + [block.mlp.out.original_component for block in model.blocks]
    saved = [w.weight.detach().clone() for w in writers]
    store: dict = {}
    try:
        with torch.no_grad():
            for w in writers:  # the naive edit: (I - r r^T) W_O, (I - r r^T) W_out
                w.weight.sub_(unit[:, None] * (unit @ w.weight)[None, :])
        run(model, batch, [(f"blocks.{l}.hook_{site}", capture(store, (l, site)))
                           for l in range(model.cfg.n_layers) for site in ("attn_out", "mlp_out")])
    finally:
        with torch.no_grad():
            for w, weight in zip(writers, saved):
                w.weight.copy_(weight)
    assert max((out @ unit).abs().max().item() for out in store.values()) > 1e-2


def test_orthogonalize_matches_hooks_in_compatibility_mode():
    model = load_model("tiny-gpt2", device="cpu", compatibility_mode=True)
    _check_orthogonalisation_matches_hooks(model, tokenize(model, TEXTS[:2]), atol=1e-4)


def test_tied_embeddings_retied_after_restore():
    model = load_model("tiny-llama", device="cpu")
    embed, unembed = model.embed.original_component, model.unembed.original_component
    assert embed.weight.data_ptr() == unembed.weight.data_ptr()
    handle = orthogonalize_weights(model, torch.randn(model.cfg.d_model))
    assert embed.weight.data_ptr() != unembed.weight.data_ptr()
    handle.restore()
    assert embed.weight.data_ptr() == unembed.weight.data_ptr()


def test_direction_hooks_leave_no_component_along_direction(model, batch):
    direction = torch.randn(model.cfg.d_model)
    unit = direction / direction.norm()
    store: dict = {}
    hooks = direction_ablation_hooks(model, direction)
    hooks += [(f"blocks.{l}.hook_resid_post", capture(store, l)) for l in range(model.cfg.n_layers)]
    run(model, batch, hooks)
    for layer, resid in store.items():
        assert (resid @ unit).abs().max() < 1e-4, f"resid_post of layer {layer} still has a component along r"


# ------------------------------------------------------------------------------------------------
# Affine concept editing (ACE)
# ------------------------------------------------------------------------------------------------


def naive_affine_hooks(model, direction, values):
    """ACE written out as matrices: resid_pre ← (I − r rᵀ) x + c_l r; outputs ← (I − r rᵀ) y."""
    unit = direction / direction.norm()
    projector = torch.eye(model.cfg.d_model) - torch.outer(unit, unit)

    def at_resid(value):
        return lambda x, hook: x @ projector.T + value * unit

    def at_output(y, hook):
        return y @ projector.T

    hooks = []
    for layer, value in enumerate(values):
        hooks += [(f"blocks.{layer}.hook_resid_pre", at_resid(value)), (f"blocks.{layer}.hook_attn_out", at_output),
                  (f"blocks.{layer}.hook_mlp_out", at_output)]
    return hooks


def test_affine_ablation_matches_naive_matrices_and_holds_the_coordinate(model, batch):
    torch.manual_seed(2)
    direction = torch.randn(model.cfg.d_model) * 2.0
    unit = direction / direction.norm()
    values = (torch.randn(model.cfg.n_layers) * 3.0).tolist()
    mask = batch.attention_mask.bool()
    store: dict = {}
    hooks = affine_ablation_hooks(model, direction, values)
    hooks += [(f"blocks.{l}.hook_resid_post", capture(store, l)) for l in range(model.cfg.n_layers)]
    got = run(model, batch, hooks)
    expected = run(model, batch, naive_affine_hooks(model, direction, values))
    assert (got - run(model, batch))[mask].abs().max() > 1e-3, "the edit should change the logits"
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-4)
    for layer, resid in store.items():  # nothing in block l moves the coordinate away from c_l
        torch.testing.assert_close((resid @ unit)[mask], torch.full_like((resid @ unit)[mask], values[layer]),
                                   atol=1e-3, rtol=1e-4)


def test_affine_ablation_at_zero_is_directional_ablation(model, batch):
    direction = torch.randn(model.cfg.d_model)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(run(model, batch, affine_ablation_hooks(model, direction, 0.0))[mask],
                               run(model, batch, direction_ablation_hooks(model, direction))[mask], atol=1e-5, rtol=1e-5)


def test_affine_steering_sets_one_coordinate_and_keeps_the_rest(model, batch):
    direction = torch.randn(model.cfg.d_model)
    unit = direction / direction.norm()
    layer, value = model.cfg.n_layers - 1, 7.5
    clean, edited = {}, {}
    run(model, batch, [(f"blocks.{layer}.hook_resid_pre", capture(clean, "x"))])
    run(model, batch, affine_steering_hooks(model, direction, value, layer)
        + [(f"blocks.{layer}.hook_resid_pre", capture(edited, "x"))])
    x, y = clean["x"], edited["x"]
    torch.testing.assert_close(y @ unit, torch.full_like(y @ unit, value), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y - (y @ unit)[..., None] * unit, x - (x @ unit)[..., None] * unit, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        affine_steering_hooks(model, direction, value, model.cfg.n_layers)


def test_affine_edit_weights_match_the_hooks_with_one_value():
    model = load_model("tiny-llama", device="cpu")
    batch = tokenize(model, TEXTS[:3])
    direction, value = torch.randn(model.cfg.d_model) * 4.0, -2.5
    mask = batch.attention_mask.bool()
    clean = run(model, batch)
    hooked = run(model, batch, affine_ablation_hooks(model, direction, value))
    with affine_edit_weights(model, direction, value):
        edited = run(model, batch)
    torch.testing.assert_close(edited[mask], hooked[mask], atol=1e-4, rtol=1e-4)
    assert torch.equal(run(model, batch), clean), "restore() must put the exact original weights back"
    assert model.embed.original_component.weight.data_ptr() == model.unembed.original_component.weight.data_ptr()


def test_affine_hooks_reject_bad_reference(model):
    direction = torch.randn(model.cfg.d_model)
    with pytest.raises(ValueError, match="one value per layer"):
        affine_ablation_hooks(model, direction, [1.0, 2.0][: model.cfg.n_layers - 1] + [0.0] * (model.cfg.n_layers + 1))
    with pytest.raises(ValueError, match="finite"):
        affine_ablation_hooks(model, direction, float("nan"))
    with pytest.raises(ValueError, match="d_model"):
        affine_ablation_hooks(model, torch.randn(model.cfg.d_model + 1), 0.0)


@pytest.mark.embedded
def test_orthogonalize_matches_direction_hooks_embedded(embedded_model):
    batch = tokenize(embedded_model, TEXTS[:2])
    _check_orthogonalisation_matches_hooks(embedded_model, batch, atol=2e-3)


def test_named_shortcuts_match_ablation_hooks(model, batch):
    reference = resample_reference(batch)
    for shortcut, method in ((lambda c: zero_ablation_hooks(model, c), "zero"),
                             (lambda c: mean_ablation_hooks(model, c, reference), "mean"),
                             (lambda c: resample_ablation_hooks(model, c, reference), "resample")):
        expected = run(model, batch, ablation_hooks(model, [Head(1, 1)], method, reference=reference))
        torch.testing.assert_close(run(model, batch, shortcut([Head(1, 1)])), expected)


def test_activation_addition_adds_vector_at_one_layer(model, batch):
    direction = torch.randn(model.cfg.d_model)
    store_clean, store_add = {}, {}
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
    run(model, batch, [(n, capture(store_clean, n)) for n in names])
    hooks = activation_addition_hooks(model, direction, layer=1, coeff=2.5)
    run(model, batch, hooks + [(n, capture(store_add, n)) for n in names])
    torch.testing.assert_close(store_add[names[0]], store_clean[names[0]])
    torch.testing.assert_close(store_add[names[1]] - store_clean[names[1]], (2.5 * direction).expand_as(store_clean[names[1]]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Zero / mean / resample ablation vs naive hooks
# ------------------------------------------------------------------------------------------------


def naive_head_hook(head, value_fn):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head, :] = value_fn(z[:, :, head, :])
        return z

    return hook


def naive_neuron_hook(neuron, value_fn):
    def hook(post, hook):
        post = post.clone()
        post[:, :, neuron] = value_fn(post[:, :, neuron])
        return post

    return hook


def masked_mean(values, mask):
    """values [batch, pos, ...] averaged over real tokens."""
    weights = mask.float().reshape(*mask.shape, *([1] * (values.ndim - 2)))
    return (values * weights).sum(dim=(0, 1)) / weights.sum()


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_head_ablation_matches_naive_loop(model, batch, method):
    reference = resample_reference(batch, seed=3) if method == "resample" else tokenize(model, TEXTS[::-1])
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, ref_cache = model.run_with_cache(reference.tokens, attention_mask=reference.attention_mask, names_filter=names)
    for layer, head in [(0, 1), (2, 3)]:
        ref_z = ref_cache[f"blocks.{layer}.attn.hook_z"][:, :, head, :]
        if method == "zero":
            value_fn = lambda z: torch.zeros_like(z)  # noqa: E731
        elif method == "mean":
            mean = masked_mean(ref_z, reference.attention_mask)
            value_fn = lambda z, mean=mean: mean.expand_as(z)  # noqa: E731
        else:
            value_fn = lambda z, ref=ref_z: ref  # noqa: E731
        expected = run(model, batch, [(f"blocks.{layer}.attn.hook_z", naive_head_hook(head, value_fn))])
        got = run(model, batch, ablation_hooks(model, [Head(layer, head)], method, reference=None if method == "zero" else reference))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_neuron_ablation_matches_naive_loop(model, batch, method):
    reference = resample_reference(batch, seed=5) if method == "resample" else tokenize(model, TEXTS[1:])
    layer, neuron = 1, 7
    name = f"blocks.{layer}.mlp.hook_post"
    with torch.no_grad():
        _, ref_cache = model.run_with_cache(reference.tokens, attention_mask=reference.attention_mask, names_filter=[name])
    ref_post = ref_cache[name][:, :, neuron]
    value_fn = {
        "zero": lambda x: torch.zeros_like(x),
        "mean": lambda x: masked_mean(ref_post, reference.attention_mask).expand_as(x),
        "resample": lambda x: ref_post,
    }[method]
    expected = run(model, batch, [(name, naive_neuron_hook(neuron, value_fn))])
    got = run(model, batch, ablation_hooks(model, Neuron(layer, neuron), method, reference=reference))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def naive_stream_hooks(site, layer, new_stream):
    """Hooks that set the residual stream at ``site`` of ``layer`` to ``new_stream(stream)``, each reached
    its own way: resid_pre at the block's input; resid_post at the next block's input; resid_mid (the
    stream after attention, which the bridge has no hook for) through the attention output, as
    ``attn_out := new_stream(resid_pre + attn_out) - resid_pre`` with this run's resid_pre."""
    if site == "resid_pre":
        return [(f"blocks.{layer}.hook_resid_pre", lambda x, hook: new_stream(x))]
    if site == "resid_post":
        return [(f"blocks.{layer + 1}.hook_resid_pre", lambda x, hook: new_stream(x))]
    seen = {}

    def keep(x, hook):
        seen["resid_pre"] = x.detach().clone()
        return x

    def through_attn_out(attn_out, hook):
        return new_stream(seen["resid_pre"] + attn_out) - seen["resid_pre"]

    return [(f"blocks.{layer}.hook_resid_pre", keep), (f"blocks.{layer}.hook_attn_out", through_attn_out)]


def stream_by_hand(model, batch, site, layer):
    """The residual stream at ``site`` of ``layer`` on a clean run, from resid_pre / attn_out hooks."""
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out", f"blocks.{layer + 1}.hook_resid_pre"]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=names)
    return {"resid_pre": cache[names[0]], "resid_mid": cache[names[0]] + cache[names[1]],
            "resid_post": cache[names[2]]}[site]


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_direction_ablation_matches_naive_projection(model, batch, method, site):
    """The residual stream itself is edited at each site (resid_mid included: not only the MLP's input)."""
    reference = resample_reference(batch, seed=7) if method == "resample" else tokenize(model, TEXTS)
    direction = torch.randn(model.cfg.d_model)
    unit = direction / direction.norm()
    ref_proj = stream_by_hand(model, reference, site, 1) @ unit
    target = {"zero": lambda proj: torch.zeros_like(proj),
              "mean": lambda proj: masked_mean(ref_proj, reference.attention_mask).expand_as(proj),
              "resample": lambda proj: ref_proj}[method]

    def new_stream(x):
        proj = x @ unit
        return x + (target(proj) - proj)[..., None] * unit

    expected = run(model, batch, naive_stream_hooks(site, 1, new_stream))
    got = run(model, batch, ablation_hooks(model, ResidDirection(1, direction, site), method, reference=reference))
    assert (expected - run(model, batch)).abs().max() > 1e-4, "the ablation should change the logits"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_resid_mid_edits_the_residual_stream_not_only_the_mlp_input(model, batch):
    """Hand-computed: mid = resid_pre + attn_out (clean run; nothing upstream changes), mid' = mid with its
    component along r removed. The MLP must read mid', and the block's output must be mid' + MLP output
    — the skip connection carries the edited stream too."""
    layer = 1
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    unit = direction / direction.norm()
    mid = stream_by_hand(model, batch, "resid_mid", layer)
    edited = mid - (mid @ unit)[..., None] * unit
    store: dict = {}
    names = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out", f"blocks.{layer + 1}.hook_resid_pre"]
    hooks = ablation_hooks(model, ResidDirection(layer, direction, "resid_mid"), "zero")
    run(model, batch, hooks + [(n, capture(store, n)) for n in names])
    mlp_input, mlp_out, next_stream = (store[n] for n in names)
    torch.testing.assert_close(mlp_input, edited, atol=1e-5, rtol=1e-5)
    block = model.blocks[layer]
    with torch.no_grad():
        mlp_by_hand = block.mlp.original_component(block.ln2.original_component(edited))
        if hasattr(block, "ln2_post"):  # Gemma-2/3 normalise the MLP output before adding it (hook_mlp_out is after)
            mlp_by_hand = block.ln2_post.original_component(mlp_by_hand)
    torch.testing.assert_close(mlp_out, mlp_by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(next_stream, edited + mlp_out, atol=1e-5, rtol=1e-5)
    # along r only what the MLP wrote is left (on the skip connection the old component is gone)
    torch.testing.assert_close(next_stream @ unit, mlp_out @ unit, atol=1e-4, rtol=1e-4)
    assert float((mid @ unit).abs().max()) > 1e-2  # there was a component to remove
    # activation addition at resid_mid: the MLP reads mid + v and the skip connection carries it
    vector = 0.5 * direction
    store.clear()
    run(model, batch, activation_addition_hooks(model, vector, layer, site="resid_mid") + [(n, capture(store, n)) for n in names])
    torch.testing.assert_close(store[names[0]], mid + vector, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(store[names[2]], mid + vector + store[names[1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_ablation_leaves_other_components_untouched(model, batch, method):
    """Checked by hooks: record z and mlp.hook_post right after the ablation hook ran."""
    reference = resample_reference(batch) if method == "resample" else tokenize(model, TEXTS[:2])
    layer = 1
    clean, ablated = {}, {}
    names = [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post"]
    run(model, batch, [(n, capture(clean, n)) for n in names])
    hooks = ablation_hooks(model, [Head(layer, 2), Neuron(layer, 5)], method, reference=reference)
    run(model, batch, hooks + [(n, capture(ablated, n)) for n in names])
    z_clean, z_abl = clean[names[0]], ablated[names[0]]
    others = [h for h in range(model.cfg.n_heads) if h != 2]
    # Heads of the same layer are computed before the hook: they must be bit-identical.
    assert torch.equal(z_abl[:, :, others], z_clean[:, :, others])
    assert not torch.allclose(z_abl[:, :, 2], z_clean[:, :, 2])
    # The neuron's own value is replaced; the other neurons of the layer only see the head change
    # through the residual stream, so compare against a run with the head ablated alone.
    head_only = {}
    run(model, batch, ablation_hooks(model, [Head(layer, 2)], method, reference=reference) + [(names[1], capture(head_only, names[1]))])
    post_abl, post_head_only = ablated[names[1]], head_only[names[1]]
    keep = [n for n in range(model.cfg.d_mlp) if n != 5]
    assert torch.equal(post_abl[:, :, keep], post_head_only[:, :, keep])
    assert not torch.allclose(post_abl[:, :, 5], post_head_only[:, :, 5])


def test_stacked_ablation_matches_one_forward_per_component(model, batch):
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    components = [Head(0, 0), Head(1, 3), Neuron(2, 4), Head(2, 1), ResidDirection(1, direction, "resid_mid"),
                  ResidDirection(0, direction, "resid_post")]
    reference = resample_reference(batch, seed=11)
    values = ablation_values(model, components, "resample", reference)
    n = len(batch)
    stacked_tokens = batch.tokens.repeat(len(components), 1)
    stacked_mask = batch.attention_mask.repeat(len(components), 1)
    with torch.no_grad():
        stacked = model.run_with_hooks(stacked_tokens, attention_mask=stacked_mask,
                                       fwd_hooks=stacked_ablation_hooks(model, components, values, n))
    for i, component in enumerate(components):
        single = run(model, batch, ablation_hooks(model, [component], "resample", reference=reference))
        torch.testing.assert_close(stacked[i * n : (i + 1) * n], single, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_resid_mid_is_refused_where_hook_resid_mid_is_not_the_mlp_norm_input(model, monkeypatch):
    from helpers.ablation import resid_mid_hooks

    monkeypatch.setitem(model.blocks[1].hook_aliases, "hook_resid_mid", "hook_out")
    with pytest.raises(NotImplementedError, match="not the MLP norm's input"):
        ablation_hooks(model, ResidDirection(1, torch.ones(model.cfg.d_model), "resid_mid"), "zero")
    with pytest.raises(NotImplementedError, match="resid_pre"):
        resid_mid_hooks(model, 1, lambda x, hook: x)


def test_bad_input_fails_clearly(model, batch):
    with pytest.raises(ValueError, match="needs reference"):
        ablation_hooks(model, [Head(0, 0)], "mean")
    with pytest.raises(ValueError, match="method must be one of"):
        ablation_hooks(model, [Head(0, 0)], "gaussian", reference=batch)
    with pytest.raises(ValueError, match="head 99 is out of range"):
        ablation_hooks(model, [Head(0, 99)], "zero")
    with pytest.raises(ValueError, match="layer 42 is out of range"):
        ablation_hooks(model, [Neuron(42, 0)], "zero")
    with pytest.raises(TypeError, match="Cannot ablate"):
        ablation_hooks(model, ["L0H0"], "zero")
    with pytest.raises(ValueError, match="length d_model"):
        direction_ablation_hooks(model, torch.randn(model.cfg.d_model + 1))
    with pytest.raises(ValueError, match="non-zero"):
        orthogonalize_weights(model, torch.zeros(model.cfg.d_model))
    with pytest.raises(TypeError, match="TokenBatch"):
        ablation_hooks(model, [Head(0, 0)], "mean", reference=batch.tokens)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        resample_reference(batch[:1])
    # A resample reference of the wrong shape is caught when the hook runs.
    hooks = ablation_hooks(model, [Head(0, 0)], "resample", reference=batch[:2])
    with pytest.raises(ValueError, match="exactly the ablated batch's shape"):
        run(model, batch, hooks)
