"""Tests of helpers.patching: every sweep against a naive one-forward-per-component loop written here,
against transformer_lens.patching where it has the same sweep, exactness checks and input validation.

Tiny random models (tiny-llama: RMSNorm, GQA, rotary; tiny-gemma3: Gemma-3's multi-query attention, (1 + γ)
norms before and after each sublayer, sliding-window layers; tiny-gpt2: LayerNorm, MHA, learned positions) keep
these fast; the ``llama`` fixture runs each test on tiny-llama and on tiny-gemma3 (the name is historical). The
embedded-model tests are marked ``embedded``.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import metrics, patching
from helpers.patching.engine import _Patcher
from helpers.prompts import TokenBatch, single_token_id, tokenize

# IOI-style prompts written inline (the study's generator lives elsewhere). Different lengths, so the
# tiny-llama batch is left-padded; the "equal" set has one token length for transformer_lens' functions.
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
EQUAL_CLEAN = [
    "When Mary and John went to the park, John gave a small ball to",
    "When Alice and Bob went to the store, Bob gave a cold drink to",
]
EQUAL_CORRUPTED = [
    "When Mary and John went to the park, Paul gave a small ball to",
    "When Alice and Bob went to the store, Mark gave a cold drink to",
]
EQUAL_ANSWERS = [(" Mary", " John"), (" Alice", " Bob")]


def _pair(model, clean, corrupted):
    both = tokenize(model, clean + corrupted)
    n = len(clean)
    return both[:n], both[n:]


def _answers(model, pairs):
    return torch.tensor([[single_token_id(model, a), single_token_id(model, b)] for a, b in pairs])


class Setup:
    def __init__(self, name, clean_prompts=CLEAN, corrupted_prompts=CORRUPTED, answers=ANSWERS):
        from helpers.models import load_model

        self.model = load_model(name, device="cpu")
        if name.startswith("tiny"):
            # Random init at std 0.02 leaves heads with tiny effects; larger attention/MLP weights give sharper
            # patterns and effects well above float noise, so that the comparisons below can fail.
            with torch.no_grad():
                for param_name, param in self.model.original_model.named_parameters():
                    if param.ndim == 2 and ("attn" in param_name or "mlp" in param_name):
                        param.mul_(4.0)
        self.clean, self.corrupted = _pair(self.model, clean_prompts, corrupted_prompts)
        self.answers = _answers(self.model, answers)
        self.metric = metrics.make_logit_diff_metric(self.answers, self.clean)
        with torch.no_grad():
            self.clean_value = self.metric(self.run(self.clean)).item()
            self.corrupted_value = self.metric(self.run(self.corrupted)).item()

    def run(self, batch, hooks=()):
        with torch.no_grad():
            return self.model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=list(hooks))

    def naive(self, hook_name, index, direction="denoise", metric=None):
        """One full forward: the target run with ``act[index]`` at ``hook_name`` taken from the source run."""
        target, source = (self.corrupted, self.clean) if direction == "denoise" else (self.clean, self.corrupted)
        with torch.no_grad():
            _, cache = self.model.run_with_cache(source.tokens, attention_mask=source.attention_mask,
                                                 names_filter=[hook_name])
        source_act = cache[hook_name]

        def hook(act, hook):
            act = act.clone()
            act[index] = source_act[index]
            return act

        return (metric or self.metric)(self.run(target, [(hook_name, hook)])).item()


@pytest.fixture(scope="module")
def tiny_llama_setup():
    return Setup("tiny-llama")


@pytest.fixture(scope="module")
def tiny_gemma3_setup():
    return Setup("tiny-gemma3")


RMS_SETUPS = ["tiny_llama_setup", "tiny_gemma3_setup"]
RMS_IDS = ["tiny-llama", "tiny-gemma3"]


@pytest.fixture(scope="module", params=RMS_SETUPS, ids=RMS_IDS)
def llama(request):
    """The RMSNorm layouts in turn: tiny-llama (the embedded model's) and tiny-gemma3 (Gemma-3's)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return Setup("tiny-gpt2")


@pytest.fixture(scope="module")
def llama_equal():
    return Setup("tiny-llama", EQUAL_CLEAN, EQUAL_CORRUPTED, EQUAL_ANSWERS)


@pytest.fixture(scope="module")
def gemma3_equal():
    return Setup("tiny-gemma3", EQUAL_CLEAN, EQUAL_CORRUPTED, EQUAL_ANSWERS)


@pytest.fixture(scope="module")
def gpt2_equal():
    return Setup("tiny-gpt2", EQUAL_CLEAN, EQUAL_CORRUPTED, EQUAL_ANSWERS)


def test_setup_batches_are_padded_and_differ(llama):
    assert not bool(llama.clean.attention_mask.all()), "the tiny-llama test batch should exercise left padding"
    assert abs(llama.clean_value - llama.corrupted_value) > 1e-3


# --------------------------------------------------------------------------------------------------
# Against a naive loop
# --------------------------------------------------------------------------------------------------

S = slice(None)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("setup_name", [*RMS_SETUPS, "gpt2"])
def test_resid_pre_and_post_match_naive_loop(setup_name, direction, request):
    s = request.getfixturevalue(setup_name)
    n_layers, n_pos = s.model.cfg.n_layers, s.clean.tokens.shape[1]
    for site in ("resid_pre", "resid_post"):
        result = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, site=site, direction=direction,
                                         progress=False)
        assert result.dims == ("layer", "pos") and result.shape == (n_layers, n_pos)
        for layer in range(n_layers):
            for pos in range(n_pos):
                expected = s.naive(f"blocks.{layer}.hook_{site}", (S, pos), direction)
                assert result.values[layer, pos].item() == pytest.approx(expected, abs=1e-5), (site, layer, pos)
        assert result.meta["clean_value"] == pytest.approx(s.clean_value, abs=1e-6)
        assert result.meta["corrupted_value"] == pytest.approx(s.corrupted_value, abs=1e-6)


def test_resid_mid_matches_independent_naive_loop(llama):
    """resid_mid patched = the MLP reads the clean mid-stream AND the skip connection carries it.

    Naive version, built differently from the implementation: patch the MLP norm's input (the bridge's
    hook_resid_mid alias) and add (clean_mid - corrupted_mid) to the MLP output.
    """
    s = llama
    result = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, site="resid_mid", progress=False)
    with torch.no_grad():
        _, clean_cache = s.model.run_with_cache(s.clean.tokens, attention_mask=s.clean.attention_mask)
        _, corr_cache = s.model.run_with_cache(s.corrupted.tokens, attention_mask=s.corrupted.attention_mask)
    for layer in range(s.model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_mid"
        for pos in range(s.clean.tokens.shape[1]):
            delta = clean_cache[name][:, pos] - corr_cache[name][:, pos]

            def norm_in(act, hook, pos=pos, name=name):
                act = act.clone()
                act[:, pos] = clean_cache[name][:, pos]
                return act

            def mlp_out(act, hook, pos=pos, delta=delta):
                act = act.clone()
                act[:, pos] += delta
                return act

            logits = s.run(s.corrupted, [(name, norm_in), (f"blocks.{layer}.hook_mlp_out", mlp_out)])
            assert result.values[layer, pos].item() == pytest.approx(s.metric(logits).item(), abs=1e-5)


@pytest.mark.parametrize("component", ["attn_out", "mlp_out"])
def test_attn_and_mlp_out_match_naive_loop(llama, component):
    s = llama
    sweep = patching.patch_attn_out if component == "attn_out" else patching.patch_mlp_out
    result = sweep(s.model, s.clean, s.corrupted, s.metric, progress=False)
    for layer in range(s.model.cfg.n_layers):
        for pos in range(s.clean.tokens.shape[1]):
            expected = s.naive(f"blocks.{layer}.hook_{component}", (S, pos))
            assert result.values[layer, pos].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("activation, n_heads_attr", [("z", "n_heads"), ("q", "n_heads"), ("k", "kv"), ("v", "kv"),
                                                      ("pattern", "n_heads")])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_heads_all_positions_match_naive_loop(llama, activation, n_heads_attr, direction):
    s = llama
    result = patching.patch_heads(s.model, s.clean, s.corrupted, s.metric, activation=activation,
                                  direction=direction, progress=False)
    n_heads = s.model.cfg.n_heads if n_heads_attr == "n_heads" else s.model.cfg.n_key_value_heads
    assert result.dims[1] == ("kv_head" if n_heads_attr == "kv" else "head")
    assert result.shape == (s.model.cfg.n_layers, n_heads)
    for layer in range(s.model.cfg.n_layers):
        for head in range(n_heads):
            index = (S, head) if activation == "pattern" else (S, S, head)
            expected = s.naive(f"blocks.{layer}.attn.hook_{activation}", index, direction)
            assert result.values[layer, head].item() == pytest.approx(expected, abs=1e-5), (layer, head)


@pytest.mark.parametrize("activation", ["z", "k", "pattern"])
def test_heads_per_position_match_naive_loop(llama, activation):
    s = llama
    positions = [0, 5, -1]
    result = patching.patch_heads(s.model, s.clean, s.corrupted, s.metric, activation=activation, per_position=True,
                                  positions=positions, progress=False)
    n_pos = s.clean.tokens.shape[1]
    assert result.dims[:2] == ("layer", "pos") and result.shape[1] == 3
    for layer in range(s.model.cfg.n_layers):
        for i, pos in enumerate(p % n_pos for p in positions):
            for head in range(result.shape[2]):
                index = (S, head, pos) if activation == "pattern" else (S, pos, head)
                expected = s.naive(f"blocks.{layer}.attn.hook_{activation}", index)
                assert result.values[layer, i, head].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("component", ["attn", "mlp"])
def test_layer_window_and_layer_outputs_match_naive_loop(llama, component):
    s = llama
    n_layers = s.model.cfg.n_layers
    site = f"hook_{component}_out"
    windows = patching.patch_layer_window(s.model, s.clean, s.corrupted, s.metric, component=component, window=2,
                                          progress=False)
    with torch.no_grad():
        _, clean_cache = s.model.run_with_cache(s.clean.tokens, attention_mask=s.clean.attention_mask)
    for layer in range(n_layers):
        first, last = max(0, layer - 1), min(n_layers - 1, layer)
        hooks = [(f"blocks.{i}.{site}", lambda act, hook, i=i: clean_cache[f"blocks.{i}.{site}"])
                 for i in range(first, last + 1)]
        assert windows.values[layer].item() == pytest.approx(s.metric(s.run(s.corrupted, hooks)).item(), abs=1e-5)
    assert windows.labels["layer"][1] == "0-1"
    single = patching.patch_layer_outputs(s.model, s.clean, s.corrupted, s.metric, component=component,
                                          progress=False)
    for layer in range(n_layers):
        assert single.values[layer].item() == pytest.approx(s.naive(f"blocks.{layer}.{site}", (S,)), abs=1e-5)


@pytest.mark.parametrize("window", [3, 4, 5])
@pytest.mark.parametrize("component", ["attn", "mlp"])
def test_layer_windows_of_three_or_more_layers_match_naive_loop(gpt2, component, window):
    """Windows centred on each layer (Meng et al.): layers l - window//2 .. l - window//2 + window - 1, clipped
    to the model; odd and even sizes and one wider than the model; all positions and one position."""
    s = gpt2
    n_layers, n_pos = s.model.cfg.n_layers, s.clean.tokens.shape[1]
    site = f"hook_{component}_out"
    with torch.no_grad():
        _, clean_cache = s.model.run_with_cache(s.clean.tokens, attention_mask=s.clean.attention_mask)
    expected_windows = []
    for layer in range(n_layers):
        lowest = layer - window // 2
        expected_windows.append([i for i in range(lowest, lowest + window) if 0 <= i < n_layers])
    for positions in (None, [n_pos - 1]):
        result = patching.patch_layer_window(s.model, s.clean, s.corrupted, s.metric, component=component,
                                             window=window, positions=positions, progress=False)
        assert result.meta["windows"] == expected_windows
        assert result.labels["layer"] == [f"{w[0]}-{w[-1]}" for w in expected_windows]
        at = slice(None) if positions is None else positions
        for layer, members in enumerate(expected_windows):
            def patch(act, hook):
                act = act.clone()
                act[:, at] = clean_cache[hook.name][:, at]
                return act

            hooks = [(f"blocks.{i}.{site}", patch) for i in members]
            expected = s.metric(s.run(s.corrupted, hooks)).item()
            assert result.values[layer].item() == pytest.approx(expected, abs=1e-6), (positions, layer)
        assert float((result.values - s.corrupted_value).abs().max()) > 1e-3  # the patches matter


def test_patch_hook_single_run_matches_naive(llama):
    s = llama
    value = patching.patch_hook(s.model, s.clean, s.corrupted, s.metric, "blocks.1.mlp.hook_post", positions=[-1])
    assert value == pytest.approx(s.naive("blocks.1.mlp.hook_post", (S, -1)), abs=1e-5)
    value = patching.patch_hook(s.model, s.clean, s.corrupted, s.metric, "hook_embed")
    assert value == pytest.approx(s.naive("hook_embed", (S,)), abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------------


def test_patching_clean_into_clean_reproduces_clean_metric(llama):
    s = llama
    for sweep in (
        lambda: patching.patch_residual(s.model, s.clean, s.clean, s.metric, progress=False),
        lambda: patching.patch_heads(s.model, s.clean, s.clean, s.metric, progress=False),
        lambda: patching.patch_mlp_out(s.model, s.clean, s.clean, s.metric, progress=False),
    ):
        values = sweep().values
        torch.testing.assert_close(values, torch.full_like(values, s.clean_value), atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_a_whole_residual_layer_reproduces_source_output(llama, site, direction):
    s = llama
    result = patching.patch_layer_outputs(s.model, s.clean, s.corrupted, s.metric, component=site,
                                          direction=direction, progress=False)
    expected = s.clean_value if direction == "denoise" else s.corrupted_value
    torch.testing.assert_close(result.values, torch.full_like(result.values, expected), atol=1e-5, rtol=0)


def test_metric_reading_all_positions_still_exact(llama):
    """A metric that reads every position (so the last-token shortcut must not be used)."""
    s = llama
    with torch.no_grad():
        clean_logits = s.run(s.clean)

    def all_positions_kl(logits):
        mask = s.corrupted.attention_mask.bool()
        logp = logits.log_softmax(-1)[mask]
        ref = clean_logits.log_softmax(-1)[mask]
        return (ref.exp() * (ref - logp)).sum(-1).mean()

    result = patching.patch_residual(s.model, s.clean, s.corrupted, all_positions_kl, layers=[1], progress=False)
    for pos in range(s.clean.tokens.shape[1]):
        expected = s.naive("blocks.1.hook_resid_pre", (S, pos), metric=all_positions_kl)
        assert result.values[0, pos].item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="logit_positions='all'"):
        patching.patch_residual(s.model, s.clean, s.corrupted, all_positions_kl, layers=[1],
                                logit_positions="last", progress=False)


def test_shared_prefix_is_computed_once(llama):
    """Patched runs compute only the positions from the first clean/corrupted difference on (the tests
    above check the results against full naive runs, so they cover this path)."""
    s = llama
    patcher = _Patcher(s.model, s.clean, s.corrupted, s.metric, "denoise", [])
    first_difference = int(((s.clean.tokens != s.corrupted.tokens) | (s.clean.attention_mask != s.corrupted.attention_mask))
                           .any(0).nonzero()[0])
    assert patcher.p0 == first_difference > 0
    assert not patcher.covers(first_difference - 1) and patcher.covers(first_difference)
    full = _Patcher(s.model, s.clean, s.corrupted, s.metric, "denoise", [], allow_suffix=False)
    assert full.p0 == 0


def _first_difference(s):
    differs = (s.clean.tokens != s.corrupted.tokens) | (s.clean.attention_mask != s.corrupted.attention_mask)
    return int(differs.any(0).nonzero()[0])


def _assert_resid_pre_layer_matches_naive(s, result, layer=1):
    for pos in range(s.clean.tokens.shape[1]):
        expected = s.naive(f"blocks.{layer}.hook_resid_pre", (S, pos))
        assert result.values[0, pos].item() == pytest.approx(expected, abs=1e-5), pos


def test_shared_prefix_fast_path_says_whether_it_is_on(llama):
    s = llama
    on = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[1], progress=False)
    assert on.meta["shared_prefix_positions"] == _first_difference(s) > 0
    assert "shared_prefix_off" not in on.meta
    with torch.no_grad():
        clean_logits = s.run(s.clean)

    def reads_every_position(logits):
        return (logits - clean_logits).pow(2).mean()

    off = patching.patch_residual(s.model, s.clean, s.corrupted, reads_every_position, layers=[1], progress=False)
    assert off.meta["shared_prefix_positions"] == 0
    assert "every position" in off.meta["shared_prefix_off"]


def test_shared_prefix_fast_path_off_when_the_model_hands_back_no_cache(llama, monkeypatch):
    """A model without a Hugging Face KV cache: a SharedPrefixWarning and the reason in meta; the results
    stay those of the naive loop."""
    s = llama
    forward = s.model.forward

    def without_cache(*args, **kwargs):
        out = forward(*args, **kwargs)
        return (out[0], None) if kwargs.get("return_type") == "logits_and_cache" else out

    monkeypatch.setattr(s.model, "forward", without_cache)
    with pytest.warns(patching.SharedPrefixWarning, match="no Hugging Face cache"):
        result = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[1], progress=False)
    assert result.meta["shared_prefix_positions"] == 0 and "NoneType" in result.meta["shared_prefix_off"]
    _assert_resid_pre_layer_matches_naive(s, result)


def test_shared_prefix_fast_path_off_when_the_suffix_run_does_not_reproduce_the_full_run(llama, monkeypatch):
    """A cache whose prefix keys/values are wrong (as for a model whose attention ignores the cache): the
    setup check catches it, warns, and the sweep runs over every position."""
    from transformers import DynamicCache

    s = llama

    def zeroed_prefix(self, n_copies):
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.prefix_kv):
            cache.update(torch.zeros_like(keys).repeat(n_copies, 1, 1, 1),
                         torch.zeros_like(values).repeat(n_copies, 1, 1, 1), layer)
        return cache

    monkeypatch.setattr(_Patcher, "_prefix_cache", zeroed_prefix)
    with pytest.warns(patching.SharedPrefixWarning, match="does not reproduce the full run"):
        result = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[1], progress=False)
    assert result.meta["shared_prefix_positions"] == 0
    _assert_resid_pre_layer_matches_naive(s, result)


def test_unexpected_error_while_setting_up_the_fast_path_propagates(llama, monkeypatch):
    """Only the known "no usable cache" cases switch the fast path off; any other error is a bug and is raised."""
    s = llama
    forward = s.model.forward

    def broken(*args, **kwargs):
        if kwargs.get("return_type") == "logits_and_cache":
            raise RuntimeError("a bug in the cache path")
        return forward(*args, **kwargs)

    monkeypatch.setattr(s.model, "forward", broken)
    with pytest.raises(RuntimeError, match="a bug in the cache path"):
        patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[1], progress=False)


def test_shared_prefix_fast_path_off_when_a_layer_keeps_only_a_sliding_window(tiny_gemma3_setup, monkeypatch):
    """Gemma-3's own cache keeps only the last window - 1 keys in its sliding-window layers: handed such a
    cache (instead of the plain DynamicCache the engine passes in), the fast path is off with a warning
    that says so, and the results stay those of the naive loop."""
    s = tiny_gemma3_setup
    forward = s.model.forward

    def own_cache(*args, **kwargs):
        if kwargs.get("return_type") == "logits_and_cache":
            kwargs.pop("past_key_values", None)
            kwargs.pop("use_cache", None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(s.model, "forward", own_cache)
    with pytest.warns(patching.SharedPrefixWarning, match="does not hold the keys of all"):
        result = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[1], progress=False)
    assert result.meta["shared_prefix_positions"] == 0 and "sliding-window" in result.meta["shared_prefix_off"]
    _assert_resid_pre_layer_matches_naive(s, result)


def test_shared_prefix_fast_path_off_when_the_suffix_run_raises_a_runtime_error(llama, monkeypatch):
    """An attention that cannot continue from the cache fails with a RuntimeError (a tensor-shape mismatch):
    the fast path is off, the error's type and message are in meta and the warning; results stay exact."""
    s = llama

    def mismatched(self, n_copies):
        raise RuntimeError("The size of tensor a (20) must match the size of tensor b (10)")

    monkeypatch.setattr(_Patcher, "_prefix_cache", mismatched)
    with pytest.warns(patching.SharedPrefixWarning, match="RuntimeError: The size of tensor a"):
        result = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[1], progress=False)
    assert result.meta["shared_prefix_positions"] == 0
    assert "RuntimeError: The size of tensor a (20)" in result.meta["shared_prefix_off"]
    _assert_resid_pre_layer_matches_naive(s, result)


def test_other_errors_in_the_suffix_check_propagate(llama, monkeypatch):
    s = llama

    def broken(self, n_copies):
        raise TypeError("a bug in the suffix path")

    monkeypatch.setattr(_Patcher, "_prefix_cache", broken)
    with pytest.raises(TypeError, match="a bug in the suffix path"):
        patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[1], progress=False)


def test_batched_and_unbatched_runs_agree(llama):
    s = llama
    small = patching.patch_heads(s.model, s.clean, s.corrupted, s.metric, max_batch_tokens=1, progress=False)
    large = patching.patch_heads(s.model, s.clean, s.corrupted, s.metric, max_batch_tokens=10**6, progress=False)
    torch.testing.assert_close(small.values, large.values, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Against transformer_lens.patching (unpadded prompts: its functions take bare token tensors)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup_name", ["llama_equal", "gemma3_equal", "gpt2_equal"])
def test_agrees_with_transformer_lens_patching(setup_name, request):
    from transformer_lens import patching as tl

    s = request.getfixturevalue(setup_name)
    assert bool(s.clean.attention_mask.all())
    model, toks = s.model, s.corrupted.tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(s.clean.tokens)
        pairs = [
            (patching.patch_residual(model, s.clean, s.corrupted, s.metric, progress=False),
             tl.get_act_patch_resid_pre(model, toks, cache, s.metric)),
            (patching.patch_attn_out(model, s.clean, s.corrupted, s.metric, progress=False),
             tl.get_act_patch_attn_out(model, toks, cache, s.metric)),
            (patching.patch_mlp_out(model, s.clean, s.corrupted, s.metric, progress=False),
             tl.get_act_patch_mlp_out(model, toks, cache, s.metric)),
            (patching.patch_heads(model, s.clean, s.corrupted, s.metric, progress=False),
             tl.get_act_patch_attn_head_out_all_pos(model, toks, cache, s.metric)),
            (patching.patch_heads(model, s.clean, s.corrupted, s.metric, per_position=True, progress=False),
             tl.get_act_patch_attn_head_out_by_pos(model, toks, cache, s.metric)),
            (patching.patch_heads(model, s.clean, s.corrupted, s.metric, activation="q", progress=False),
             tl.get_act_patch_attn_head_q_all_pos(model, toks, cache, s.metric)),
            (patching.patch_heads(model, s.clean, s.corrupted, s.metric, activation="pattern", progress=False),
             tl.get_act_patch_attn_head_pattern_all_pos(model, toks, cache, s.metric)),
        ]
        if model.cfg.n_key_value_heads in (None, model.cfg.n_heads):  # TL loops over n_heads for k/v
            pairs.append((patching.patch_heads(model, s.clean, s.corrupted, s.metric, activation="v", progress=False),
                          tl.get_act_patch_attn_head_v_all_pos(model, toks, cache, s.metric)))
    for ours, theirs in pairs:
        assert ours.values.shape == theirs.shape, ours
        torch.testing.assert_close(ours.values, theirs.float().cpu(), atol=1e-4, rtol=0, msg=repr(ours))


# --------------------------------------------------------------------------------------------------
# Path patching
# --------------------------------------------------------------------------------------------------


def _naive_path_patch(s, senders, receivers, receiver_input, direction="noise", *, freeze_mlps=False,
                      receiver_positions=None):
    """Direct implementation for standard attention: freeze all heads but the senders (and, with
    ``freeze_mlps``, every MLP output) to the target run, record the receivers' q/k/v input, then patch
    exactly that input of the receivers, at ``receiver_positions`` only if given (per head: needs
    n_kv_heads == n_heads for k/v; q is always per query head)."""
    model = s.model
    target, source = (s.clean, s.corrupted) if direction == "noise" else (s.corrupted, s.clean)
    n_layers = model.cfg.n_layers
    at = slice(None) if receiver_positions is None else list(receiver_positions)
    with torch.no_grad():
        _, tcache = model.run_with_cache(target.tokens, attention_mask=target.attention_mask)
        _, scache = model.run_with_cache(source.tokens, attention_mask=source.attention_mask)
    hooks = []
    for layer in range(n_layers):
        name = f"blocks.{layer}.attn.hook_z"

        def freeze(act, hook, layer=layer, name=name):
            out = tcache[name].clone()
            for l_, h in senders:
                if l_ == layer:
                    out[:, :, h] = scache[name][:, :, h]
            return out

        hooks.append((name, freeze))
        if freeze_mlps:
            mlp = f"blocks.{layer}.hook_mlp_out"
            hooks.append((mlp, lambda act, hook, mlp=mlp: tcache[mlp].clone()))
    recorded = {}
    for layer in {l_ for l_, _ in receivers}:
        name = f"blocks.{layer}.attn.hook_{receiver_input}"
        hooks.append((name, lambda act, hook, name=name: recorded.__setitem__(name, act.clone())))
    s.run(target, hooks)
    patch_hooks = []
    for layer in {l_ for l_, _ in receivers}:
        name = f"blocks.{layer}.attn.hook_{receiver_input}"

        def patch(act, hook, layer=layer, name=name):
            act = act.clone()
            for l_, h in receivers:
                if l_ == layer:
                    act[:, at, h] = recorded[name][:, at, h]
            return act

        patch_hooks.append((name, patch))
    return s.metric(s.run(target, patch_hooks)).item()


@pytest.mark.parametrize("receiver_input", ["q", "k", "v"])
def test_path_patch_matches_direct_implementation_on_mha(gpt2, receiver_input):
    s = gpt2
    effects = []
    for senders, receivers in [([(0, 1)], [(2, 0), (2, 3)]), ([(0, 0), (1, 2)], [(2, 1)]), ([(0, 3)], [(1, 0), (2, 2)])]:
        ours = patching.path_patch(s.model, s.clean, s.corrupted, s.metric, senders, receivers, receiver_input)
        expected = _naive_path_patch(s, senders, receivers, receiver_input)
        assert ours == pytest.approx(expected, abs=1e-5), (senders, receivers)
        effects.append(abs(expected - s.clean_value))
    assert max(effects) > 2e-4  # the paths matter, so the comparison can fail


@pytest.mark.parametrize("setup_name, receiver_input, senders, receivers", [
    ("gpt2", "q", [(0, 1)], [(2, 0), (2, 3)]), ("gpt2", "k", [(0, 1)], [(2, 0), (2, 3)]),
    ("gpt2", "v", [(0, 0), (1, 2)], [(2, 1)]),
    *[(name, "q", [(0, 2)], [(2, 1), (1, 3)]) for name in RMS_SETUPS],
])
def test_path_patch_options_match_direct_implementation(setup_name, receiver_input, senders, receivers, request):
    """direction="denoise", freeze_mlps and receiver_positions (the IOI notebook's S-inhibition search patches
    the receivers' queries at END only) against the direct implementation; each option changes the result
    here by far more than the tolerance, so a path patch that ignored it would fail."""
    s = request.getfixturevalue(setup_name)
    n_pos = s.clean.tokens.shape[1]
    plain = patching.path_patch(s.model, s.clean, s.corrupted, s.metric, senders, receivers, receiver_input)
    options = [
        dict(direction="denoise"),
        dict(freeze_mlps=True),
        dict(receiver_positions=[n_pos - 3, -1]),
        dict(direction="denoise", freeze_mlps=True, receiver_positions=[n_pos - 3, -1]),
    ]
    changed = {}
    for option in options:
        ours = patching.path_patch(s.model, s.clean, s.corrupted, s.metric, senders, receivers, receiver_input,
                                   **option)
        naive_option = dict(option)
        if "receiver_positions" in naive_option:
            naive_option["receiver_positions"] = [p % n_pos for p in naive_option["receiver_positions"]]
        expected = _naive_path_patch(s, senders, receivers, receiver_input, **naive_option)
        assert ours == pytest.approx(expected, abs=2e-6), option
        changed[tuple(option)] = abs(expected - plain)
    assert changed[("direction",)] > 1e-3 and changed[("freeze_mlps",)] > 1e-4, changed
    if (setup_name, receiver_input) != ("gpt2", "q"):  # layer-2 queries before END cannot reach the metric
        assert changed[("receiver_positions",)] > 2e-5, changed


def test_path_patch_receiver_positions_for_shared_keys_values_fail_clearly(llama):
    s = llama
    with pytest.raises(NotImplementedError, match="receiver_positions"):
        patching.path_patch(s.model, s.clean, s.corrupted, s.metric, [(0, 0)], [(2, 0)], "k", receiver_positions=[-1])


def test_path_patch_queries_on_gqa_model_matches_direct_implementation(llama):
    s = llama
    senders, receivers = [(0, 2)], [(2, 1), (1, 3)]
    ours = patching.path_patch(s.model, s.clean, s.corrupted, s.metric, senders, receivers, "q")
    expected = _naive_path_patch(s, senders, receivers, "q")
    assert ours == pytest.approx(expected, abs=1e-5)
    assert abs(expected - s.clean_value) > 1e-4


@pytest.mark.parametrize("receiver_input", ["k", "v"])
def test_path_patch_keys_values_on_gqa_model_for_a_whole_kv_group(llama, receiver_input):
    """With GQA, patching receivers' k/v works through their outputs; when the receivers are exactly the
    query heads sharing one key/value head, that equals patching the shared k/v head directly."""
    s = llama
    group = s.model.cfg.n_heads // s.model.cfg.n_key_value_heads
    kv_head = s.model.cfg.n_key_value_heads - 1  # tiny-llama: 1 of 2; tiny-gemma3: the only one
    receivers = [(2, kv_head * group + i) for i in range(group)]
    ours = patching.path_patch(s.model, s.clean, s.corrupted, s.metric, [(0, 0), (1, 3)], receivers, receiver_input)
    expected = _naive_path_patch(s, [(0, 0), (1, 3)], [(2, kv_head)], receiver_input)
    assert ours == pytest.approx(expected, abs=1e-5)
    assert abs(expected - s.clean_value) > 1e-4


def test_path_patch_to_all_later_residual_readers_is_not_the_full_effect_but_bounded(gpt2):
    """Sanity: a sender with no later receivers has no path (nan); patching with source == target is a no-op."""
    s = gpt2
    assert math.isnan(patching.path_patch(s.model, s.clean, s.corrupted, s.metric, [(2, 0)], [(1, 0)], "q"))
    same = patching.path_patch(s.model, s.clean, s.clean, s.metric, [(0, 0)], [(2, 0)], "k")
    assert same == pytest.approx(s.clean_value, abs=1e-5)


def test_path_patch_senders_matches_single_path_patch(llama):
    s = llama
    receivers = [(2, 0), (2, 3)]
    grid = patching.path_patch_senders(s.model, s.clean, s.corrupted, s.metric, receivers=receivers,
                                       receiver_input="v", progress=False)
    assert grid.shape == (3, 4) and bool(grid.values[2].isnan().all())
    for layer in range(2):
        for head in range(4):
            single = patching.path_patch(s.model, s.clean, s.corrupted, s.metric, [(layer, head)], receivers, "v")
            assert grid.values[layer, head].item() == pytest.approx(single, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Labelled results and validation
# --------------------------------------------------------------------------------------------------


def test_labelled_tensor_frame_and_top(llama):
    s = llama
    result = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, progress=False)
    frame = result.to_frame()
    assert len(frame) == result.values.numel()
    assert set(frame.columns) >= {"layer", "pos", "layer_index", "pos_index", "value"}
    deviation = patching.LabelledTensor(result.values - s.corrupted_value, result.dims, result.labels)
    top = deviation.top(3)
    flat = (result.values - s.corrupted_value).abs().flatten()
    assert top["value"].abs().tolist() == pytest.approx(flat.sort(descending=True).values[:3].tolist())
    assert "'" in result.labels["pos"][-1]  # "p:'token'" labels
    with pytest.raises(ValueError, match="labels"):
        patching.LabelledTensor(torch.zeros(2, 3), ("layer", "head"), {"head": [0, 1]})


def test_mismatched_clean_and_corrupted_shapes_fail_clearly(llama):
    s = llama
    shorter = TokenBatch(s.corrupted.tokens[:, 1:], s.corrupted.attention_mask[:, 1:])
    with pytest.raises(ValueError, match="same number of prompts and positions"):
        patching.patch_residual(s.model, s.clean, shorter, s.metric)
    with pytest.raises(ValueError, match="same number of prompts and positions"):
        patching.patch_heads(s.model, s.clean, s.corrupted[:2], s.metric)


def test_bad_hook_name_fails_with_close_matches(llama):
    s = llama
    with pytest.raises(KeyError, match="blocks.1.hook_mlp_out"):
        patching.patch_hook(s.model, s.clean, s.corrupted, s.metric, "blocks.1.hook_mlp_outt")


def test_positions_and_layers_out_of_range_fail_clearly(llama):
    s = llama
    n_pos = s.clean.tokens.shape[1]
    with pytest.raises(IndexError, match="out of range"):
        patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, positions=[n_pos])
    with pytest.raises(IndexError, match="out of range"):
        patching.patch_heads(s.model, s.clean, s.corrupted, s.metric, per_position=True, positions=[-n_pos - 1])
    with pytest.raises(IndexError, match="out of range"):
        patching.patch_mlp_out(s.model, s.clean, s.corrupted, s.metric, layers=[7])
    with pytest.raises(IndexError, match="does not exist"):
        patching.path_patch(s.model, s.clean, s.corrupted, s.metric, [(0, 9)], [(2, 0)])


def test_bad_direction_site_and_metric_fail_clearly(llama):
    s = llama
    with pytest.raises(ValueError, match="denoise"):
        patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, direction="forward")
    with pytest.raises(ValueError, match="site"):
        patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, site="resid_middle")
    with pytest.raises(ValueError, match="scalar"):
        patching.patch_residual(s.model, s.clean, s.corrupted,
                                lambda logits: metrics.logit_diff(logits, s.answers, reduce="none"))


# --------------------------------------------------------------------------------------------------
# Embedded model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    pytest.importorskip("gguf")
    return Setup("embedded", EQUAL_CLEAN, EQUAL_CORRUPTED, EQUAL_ANSWERS)


@pytest.mark.embedded
def test_embedded_heads_and_resid_match_naive_loop(embedded):
    s = embedded
    assert s.clean_value - s.corrupted_value > 1.0, "the embedded model should do the IOI-style task"
    layers = [0, 14, 28]
    heads = patching.patch_heads(s.model, s.clean, s.corrupted, s.metric, layers=layers, progress=False)
    assert heads.shape == (3, s.model.cfg.n_heads)
    for i, layer in enumerate(layers):
        for head in (0, 4):
            expected = s.naive(f"blocks.{layer}.attn.hook_z", (S, S, head))
            assert heads.values[i, head].item() == pytest.approx(expected, abs=1e-4)
    kv = patching.patch_heads(s.model, s.clean, s.corrupted, s.metric, activation="v", layers=[14], progress=False)
    assert kv.dims == ("layer", "kv_head") and kv.shape == (1, 3)
    assert kv.values[0, 2].item() == pytest.approx(s.naive("blocks.14.attn.hook_v", (S, S, 2)), abs=1e-4)
    s2 = int((s.clean.tokens != s.corrupted.tokens).any(0).nonzero()[0])  # where the prompts differ
    resid = patching.patch_residual(s.model, s.clean, s.corrupted, s.metric, layers=[10], positions=[s2, -1],
                                    progress=False)
    assert resid.values[0, 0].item() == pytest.approx(s.naive("blocks.10.hook_resid_pre", (S, s2)), abs=1e-4)
    # at layer 10 the information still sits at the changed (second-subject) position: patching it there
    # restores most of the clean value, patching the last position hardly anything
    gap = s.clean_value - s.corrupted_value
    assert resid.values[0, 0].item() - s.corrupted_value > 0.5 * gap
    assert abs(resid.values[0, 1].item() - s.corrupted_value) < 0.5 * gap
