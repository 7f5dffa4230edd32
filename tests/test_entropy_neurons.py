"""Tests of helpers.studies.entropy_neurons on the tiny models (RMSNorm/gated-MLP, LayerNorm/GPT-2 and Gemma-3 layouts).

The tiny models are random, so their outputs are nearly uniform and ablation effects are tiny. Each
test model therefore gets a large random final-norm weight (peaky outputs, and a γ that must be folded
correctly), and some tests plant neurons with known geometry.
"""

from __future__ import annotations

from functools import partial

import pandas as pd
import pytest
import torch

from helpers.studies import entropy_neurons as en
from helpers.corpus import load_corpus_tokens
from helpers.models import load_model, norm_gain, post_sublayer_norm
from helpers.prompts import TokenBatch

PLANTED_ENTROPY = 7
PLANTED_FREQUENCY = 11


def _set_output_row(model, neuron: int, vector: torch.Tensor) -> None:
    """Make the final-layer ``neuron`` write ``vector`` into the stream per unit of activation (with a
    post-feedforward norm, Gemma-2/3, the raw row is ``vector / (1 + γ)``: that norm multiplies by ``1 + γ``)."""
    module = model.blocks[-1].mlp.out.original_component
    post = post_sublayer_norm(model, model.cfg.n_layers - 1, "mlp")
    if post is not None:
        vector = vector / norm_gain(post)
    with torch.no_grad():
        if isinstance(module, torch.nn.Linear):  # weight [d_model, d_mlp]
            module.weight[:, neuron] = vector
        else:  # GPT-2 Conv1D weight [d_mlp, d_model]
            module.weight[neuron, :] = vector


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def model(request):
    model = load_model(request.param, device="cpu", seed=0)
    norm = model.ln_final.original_component
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(25.0 * (1.0 + 0.5 * torch.randn(norm.weight.shape, generator=generator)))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))
    # plant an entropy neuron: a large output weight along the least-read direction of W_eff
    spectrum = en.unembedding_spectrum(model)
    bottom = spectrum.directions[:, -1]
    if en.final_readout(model).kind == "ln":
        # LayerNorm: the bottom direction is the all-ones vector (the norm removes it); use the next one
        ones = torch.ones(model.cfg.d_model) / model.cfg.d_model**0.5
        assert float((bottom @ ones).abs()) > 0.999 and float(spectrum.singular_values[-1]) < 1e-3
        bottom = spectrum.directions[:, -2]
        assert abs(float(bottom.mean())) < 1e-5
    _set_output_row(model, PLANTED_ENTROPY, 3.0 * bottom / bottom.norm() * model.W_out[-1].norm(dim=-1).max())
    return model


@pytest.fixture(scope="module")
def batch(model) -> TokenBatch:
    return load_corpus_tokens(model, 3, 20, seed=0)


def test_readout_reproduces_the_logits(model, batch):
    logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                         names_filter=lambda n: n in (f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", "ln_final.hook_scale"))
    readout = en.final_readout(model)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert torch.allclose(readout.logits(resid), logits, atol=1e-3, rtol=1e-4)
    assert torch.allclose(readout.scale(resid), cache["ln_final.hook_scale"][..., 0], rtol=1e-5)
    assert not torch.allclose(readout.weight, torch.ones_like(readout.weight))  # γ really is folded


def test_effective_unembedding_and_spectrum(model):
    readout = en.final_readout(model)
    W_eff = en.effective_unembedding(model, readout)
    assert torch.allclose(W_eff.mean(-1), torch.zeros(model.cfg.d_model), atol=1e-4)
    expected = readout.weight[:, None] * readout.W_U
    if readout.kind == "ln":
        expected = expected - expected.mean(0, keepdim=True)
        assert torch.allclose(W_eff.mean(0), torch.zeros(W_eff.shape[1]), atol=1e-5)
    assert torch.allclose(W_eff, expected - expected.mean(-1, keepdim=True), atol=1e-6)
    spectrum = en.unembedding_spectrum(model, readout)
    assert torch.allclose(spectrum.singular_values, torch.linalg.svdvals(W_eff), rtol=1e-3, atol=1e-3)
    assert bool((spectrum.singular_values[:-1] >= spectrum.singular_values[1:]).all())
    assert torch.allclose(spectrum.directions.T @ spectrum.directions, torch.eye(model.cfg.d_model), atol=1e-4)
    null = spectrum.null_space(3)
    assert null.shape == (model.cfg.d_model, 3)
    # the bottom direction is read least: smallest logit norm of all singular directions
    read = (spectrum.directions.T @ W_eff).norm(dim=-1)
    assert int(read.argmin()) == model.cfg.d_model - 1
    with pytest.raises(ValueError, match="null-space dimension"):
        spectrum.null_space(0)


def test_geometry_finds_the_planted_entropy_neuron(model):
    geometry = en.final_layer_neuron_geometry(model, null_space_dim=2)
    assert geometry.norm.shape == geometry.logit_var.shape == geometry.null_fraction.shape == (model.cfg.d_mlp,)
    assert float(geometry.null_fraction[PLANTED_ENTROPY]) > 0.99
    assert en.entropy_neuron_candidates(geometry, 3)[0] == PLANTED_ENTROPY
    # writing into the null space makes the logit effect nearly flat: lowest LogitVar of all
    assert int(geometry.logit_var.argmin()) == PLANTED_ENTROPY
    frame = geometry.to_frame()
    assert frame.loc[PLANTED_ENTROPY, "null_norm_rank"] == 1
    assert frame.loc[PLANTED_ENTROPY, "name"] == f"{model.cfg.n_layers - 1}.{PLANTED_ENTROPY}"
    # a random unit vector has rho ≈ sqrt(k / d_model); the median neuron is near that
    assert float(geometry.null_fraction.median()) < 0.5


def test_random_neurons_are_seeded_and_exclude():
    drawn = en.random_neurons(100, 5, seed=3, exclude=[1, 2, 3])
    assert drawn == en.random_neurons(100, 5, seed=3, exclude=[1, 2, 3])
    assert len(set(drawn)) == 5 and not set(drawn) & {1, 2, 3}
    assert drawn != en.random_neurons(100, 5, seed=4, exclude=[1, 2, 3])
    with pytest.raises(ValueError, match="cannot draw"):
        en.random_neurons(4, 3, seed=0, exclude=[0, 1])


def _naive_effects(model, batch, neuron: int, value: float, clean: en.CleanRun):
    """Full forward passes with hand-written hooks: the neuron set to value; norm scale free / frozen."""
    layer = model.cfg.n_layers - 1

    def set_neuron(activation, hook):
        activation = activation.clone()
        activation[..., neuron] = value
        return activation

    _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=lambda n: n == "ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"].clone()
    hooks = [(f"blocks.{layer}.mlp.hook_post", set_neuron)]
    total = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    direct = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks + [("ln_final.hook_scale", lambda a, hook: scale)])
    out = {}
    for label, logits in (("total", total), ("direct", direct)):
        logprobs = logits.log_softmax(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        targets = torch.cat([batch.tokens[:, 1:], batch.tokens[:, :1]], dim=1)
        loss = -logprobs.gather(-1, targets[..., None])[..., 0]
        out[f"entropy_{label}"] = (entropy - clean.entropy)[clean.valid]
        out[f"loss_{label}"] = (loss - clean.loss)[clean.valid]
    return out


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")
def test_cache_based_effects_match_full_forward_passes(model, batch):
    neurons = [PLANTED_ENTROPY, 3, 40]
    clean = en.run_clean(model, batch, neurons)
    values = [float(clean.neuron_means[n]) + 4.0 for n in neurons]  # far from the clean activations: big effects
    effects = en.mean_ablation_effects(model, clean, neurons, values=values, token_chunk=7)
    for i, (neuron, value) in enumerate(zip(neurons, values)):
        naive = _naive_effects(model, batch, neuron, value, clean)
        for key in ("entropy_total", "entropy_direct", "loss_total", "loss_direct"):
            ours = getattr(effects, key)[i]
            assert float(naive[key].abs().max()) > 1e-3, f"{key} of neuron {neuron} too small to test anything"
            torch.testing.assert_close(ours, naive[key], atol=2e-4, rtol=1e-3)


def test_planted_entropy_neuron_acts_through_the_norm(model, batch, request):
    if post_sublayer_norm(model, model.cfg.n_layers - 1, "mlp") is not None:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=(
            "Gemma-3 layout: the post-feedforward RMSNorm fixes the size of the final MLP's output, so a planted "
            "null-space neuron cannot grow the residual stream's norm; ablating it mostly rotates the MLP output "
            "(a direct effect). Measured norm-mediated share 0.28 (0.52 with that norm's scale frozen too). An "
            "architectural difference for the entropy-neuron study to report, not a helpers bug.")))
    neurons = [PLANTED_ENTROPY, *en.random_neurons(model.cfg.d_mlp, 5, seed=0, exclude=[PLANTED_ENTROPY])]
    clean = en.run_clean(model, batch, neurons)
    values = [float(clean.neuron_means[n]) + 4.0 for n in neurons]
    summary = en.mean_ablation_effects(model, clean, neurons, values=values).summary({"planted": [PLANTED_ENTROPY]})
    shares = summary.set_index("neuron")["entropy_norm_share"]
    assert shares[PLANTED_ENTROPY] > 0.8
    assert shares[PLANTED_ENTROPY] > shares.drop(PLANTED_ENTROPY).max()
    assert summary.loc[summary.neuron == PLANTED_ENTROPY, "group"].item() == "planted"


def test_toolkit_forward_pass_agrees(model, batch):
    neurons = [PLANTED_ENTROPY, 3]
    clean = en.run_clean(model, batch, neurons)
    values = [float(clean.neuron_means[n]) + 4.0 for n in neurons]
    table = en.cache_vs_forward_discrepancy(model, batch, neurons, values)
    assert (table["max |total effect|"] > 1e-3).all()
    assert (table["max |total: cache − forward|"] < 2e-4).all()
    assert (table["max |direct: cache − forward|"] < 2e-4).all()


def test_norm_mediated_share_bounds():
    total = torch.tensor([[1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    direct = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    share = en.norm_mediated_share(total, direct)
    assert share.tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_max_tokens_limits_the_tokens(model, batch):
    clean = en.run_clean(model, batch, [3])
    full = en.mean_ablation_effects(model, clean, [3])
    part = en.mean_ablation_effects(model, clean, [3], max_tokens=10)
    assert part.entropy_total.shape == (1, 10)
    torch.testing.assert_close(part.entropy_total, full.entropy_total[:, :10])
    with pytest.raises(ValueError, match="max_tokens"):
        en.mean_ablation_effects(model, clean, [3], max_tokens=0)


def test_clean_run_contents_and_errors(model, batch):
    clean = en.run_clean(model, batch, [3, 5])
    n, p = batch.tokens.shape
    assert clean.resid.shape == (n, p, model.cfg.d_model) and clean.activations.shape == (n, p, 2)
    assert not bool(clean.valid[:, -1].any()) and not bool(clean.valid[:, 0].any())  # last position, BOS
    assert clean.neuron_means.shape == (model.cfg.d_mlp,)
    layer = model.cfg.n_layers - 1
    _, cache = model.run_with_cache(batch.tokens, names_filter=lambda name: name == f"blocks.{layer}.mlp.hook_post")
    post = cache[f"blocks.{layer}.mlp.hook_post"][:, 1:]  # the mean skips BOS
    torch.testing.assert_close(clean.neuron_means, post.reshape(-1, model.cfg.d_mlp).mean(0), atol=1e-5, rtol=1e-4)
    with pytest.raises(KeyError, match="not tracked"):
        clean.activation(9)
    padded = TokenBatch(batch.tokens, batch.attention_mask.clone())
    padded.attention_mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        en.run_clean(model, padded, [3])
    with pytest.raises(ValueError, match="neurons must be"):
        en.run_clean(model, batch, [model.cfg.d_mlp])


def test_unigram_distribution():
    tokens = torch.tensor([[0, 1, 1, 2], [2, 2, 5, 0]])
    probs = en.unigram_distribution(tokens, 6, pseudocount=1.0, ignore=[0])
    counts = torch.tensor([0, 2, 3, 0, 0, 1], dtype=torch.float) + 1
    torch.testing.assert_close(probs, counts / counts.sum())
    with pytest.raises(ValueError, match="pseudocount"):
        en.unigram_distribution(tokens, 6, pseudocount=0)
    with pytest.raises(ValueError, match="token ids"):
        en.unigram_distribution(tokens, 4)


def test_token_counts_and_log_frequency_vector():
    tokens = torch.tensor([[0, 1, 1, 2], [2, 2, 5, 0]])
    counts = en.token_counts(tokens, 6, ignore=[0])
    assert counts.tolist() == [0, 2, 3, 0, 0, 1]
    log_unigram = en.unigram_distribution(tokens, 6, ignore=[0]).log()
    torch.testing.assert_close(en.log_frequency_vector(log_unigram), log_unigram - log_unigram.mean())
    vector = en.log_frequency_vector(log_unigram, seen=counts > 0)
    seen = log_unigram[[1, 2, 5]]
    torch.testing.assert_close(vector[[1, 2, 5]], seen - seen.mean())  # centred over the measured tokens
    assert vector[[0, 3, 4]].tolist() == [0.0, 0.0, 0.0]  # no measured frequency: left at 0
    assert abs(float(vector.sum())) < 1e-6  # sums to 0 over the vocabulary: centring it again changes nothing
    with pytest.raises(ValueError, match="one entry per token"):
        en.log_frequency_vector(log_unigram, seen=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2"):
        en.log_frequency_vector(log_unigram, seen=counts == 3)
    with pytest.raises(ValueError, match="token ids"):
        en.token_counts(tokens, 4)


def test_frequency_scores_with_unseen_tokens_find_the_planted_neuron(model):
    # Half the vocabulary never occurs in the counted text: those tokens sit at the smoothing floor.
    generator = torch.Generator().manual_seed(6)
    d_vocab = model.cfg.d_vocab
    seen = torch.zeros(d_vocab, dtype=torch.bool)
    seen[torch.randperm(d_vocab, generator=generator)[: d_vocab // 2]] = True
    counts = torch.where(seen, torch.randint(1, 1000, (d_vocab,), generator=generator), 0).float()
    log_unigram = ((counts + 1) / (counts + 1).sum()).log()
    readout = en.final_readout(model)
    direction = en.unigram_direction(model, log_unigram, readout=readout, seen=seen)
    # the fit is over the seen tokens only: no other unit direction matches ℓ better there
    W_eff = en.effective_unembedding(model, readout)
    target = en.log_frequency_vector(log_unigram, seen=seen)[seen]
    fit = lambda v: float(torch.nn.functional.cosine_similarity(W_eff.T[seen] @ v, target, dim=0))
    whole_vocab = en.unigram_direction(model, log_unigram, readout=readout)
    assert fit(direction) >= fit(whole_vocab) - 1e-5
    _set_output_row(model, PLANTED_FREQUENCY, direction - direction.mean() if readout.kind == "ln" else direction)
    try:
        scores = en.frequency_scores(model, log_unigram, readout=readout, seen=seen)
        assert en.token_frequency_candidates(scores, 1) == [PLANTED_FREQUENCY]
    finally:
        _set_output_row(model, PLANTED_FREQUENCY, torch.zeros(model.cfg.d_model))


def test_frequency_scores_find_a_planted_frequency_neuron(model):
    generator = torch.Generator().manual_seed(5)
    log_unigram = torch.log_softmax(3 * torch.randn(model.cfg.d_vocab, generator=generator), -1)
    readout = en.final_readout(model)
    direction = en.unigram_direction(model, log_unigram, readout=readout)
    assert direction.shape == (model.cfg.d_model,) and float(direction.norm()) == pytest.approx(1.0, abs=1e-5)
    # a neuron writing v changes the logits by W_effᵀ v / s (W_eff = diag(γ) W_U): the best unigram fit,
    # so it must have the largest score
    row = direction
    _set_output_row(model, PLANTED_FREQUENCY, row - row.mean() if readout.kind == "ln" else row)
    try:
        scores = en.frequency_scores(model, log_unigram, readout=readout)
        assert int(scores.abs().argmax()) == PLANTED_FREQUENCY and float(scores[PLANTED_FREQUENCY]) > 0
        assert en.token_frequency_candidates(scores, 2)[0] == PLANTED_FREQUENCY
        assert PLANTED_FREQUENCY not in en.token_frequency_candidates(scores, 2, exclude=[PLANTED_FREQUENCY])
    finally:
        _set_output_row(model, PLANTED_FREQUENCY, torch.zeros(model.cfg.d_model))


def test_kl_to_unigram_effects_match_definition(model, batch):
    log_unigram = torch.log_softmax(torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(2)), -1)
    clean = en.run_clean(model, batch, [3], log_unigram=log_unigram)
    logits = model(batch.tokens, attention_mask=batch.attention_mask)
    logprobs = logits.log_softmax(-1)
    kl = (log_unigram.exp() * (log_unigram - logprobs)).sum(-1)
    torch.testing.assert_close(clean.kl_unigram, kl, atol=1e-4, rtol=1e-4)
    effects = en.mean_ablation_effects(model, clean, [3], values=[float(clean.neuron_means[3]) + 4.0])
    assert effects.kl_total is not None and float(effects.kl_total.abs().max()) > 0


def test_repeated_random_tokens(model):
    batch = en.repeated_random_tokens(model, 4, 10, seed=0)
    assert batch.tokens.shape == (4, 21)
    assert bool((batch.tokens[:, 0] == model.tokenizer.bos_token_id).all())
    assert torch.equal(batch.tokens[:, 1:11], batch.tokens[:, 11:])
    special = set(model.tokenizer.all_special_ids)
    assert not special & set(batch.tokens[:, 1:].flatten().tolist())
    assert torch.equal(batch.tokens, en.repeated_random_tokens(model, 4, 10, seed=0).tokens)
    assert not torch.equal(batch.tokens, en.repeated_random_tokens(model, 4, 10, seed=1).tokens)
    restricted = en.repeated_random_tokens(model, 2, 5, seed=0, vocabulary=[100, 101, 102, 103, 104, 105])
    assert set(restricted.tokens[:, 1:].flatten().tolist()) <= {100, 101, 102, 103, 104, 105}
    with pytest.raises(ValueError):
        en.repeated_random_tokens(model, 0, 10)


def test_induction_tables(model):
    half = 8
    batch = en.repeated_random_tokens(model, 3, half, seed=0)
    clean = en.run_clean(model, batch, [PLANTED_ENTROPY, 3])
    frame = en.per_position_effects(model, clean, PLANTED_ENTROPY, float(clean.neuron_means[PLANTED_ENTROPY]) + 4.0)
    assert list(frame.position) == list(range(2 * half))
    summary = en.induction_summary(frame, half)
    assert {"first half", "repeated half"} <= set(summary.columns) and "entropy" in summary.index
    assert summary.loc["entropy", "first half"] == pytest.approx(frame.entropy[1:half].mean())



def _naive_induction_row(model, batch, neuron, value, half):
    """One candidate of pick_induction_neuron, by full forward passes: the final-layer neuron set to
    ``value`` at every position; entropy of each next-token prediction; means over sequences and over the
    repeated half (positions half+1 .. 2·half-1 predict the copy) and the first half (1 .. half-1)."""
    layer = model.cfg.n_layers - 1
    name = f"blocks.{layer}.mlp.hook_post"
    store = {}

    def keep(post, hook):
        store["post"] = post.detach().clone()
        return post

    def set_value(post, hook):
        post = post.clone()
        post[:, :, neuron] = value
        return post

    def entropy(logits):
        logp = logits.double().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)                                  # [seq, pos]

    with torch.no_grad():
        clean = entropy(model.run_with_hooks(batch.tokens, fwd_hooks=[(name, keep)]))
        ablated = entropy(model.run_with_hooks(batch.tokens, fwd_hooks=[(name, set_value)]))
    repeated, first = slice(half + 1, 2 * half), slice(1, half)
    activation = store["post"][:, :, neuron]
    return {"activation first half": float(activation[:, first].mean()),
            "activation repeated half": float(activation[:, repeated].mean()),
            "entropy change (total), repeated half": float((ablated - clean)[:, repeated].mean()),
            "relative entropy change, repeated half": float((ablated - clean)[:, repeated].mean() / clean[:, repeated].mean())}


def test_pick_induction_neuron_matches_full_forward_passes(model):
    """Replaces 'best in the only two candidates': every candidate's row recomputed by full forward passes
    with the neuron set by a hook, and the pick is the naive lowest relative entropy change."""
    half = 8
    batch = en.repeated_random_tokens(model, 3, half, seed=0)
    candidates = [3, PLANTED_ENTROPY, 5, 12]
    values = [0.0, 3.0, -2.0, 1.0]
    clean = en.run_clean(model, batch, candidates)
    best, table = en.pick_induction_neuron(model, clean, candidates, values, half)
    assert list(table["neuron"]) == candidates
    naive = {n: _naive_induction_row(model, batch, n, v, half) for n, v in zip(candidates, values)}
    rows = table.set_index("neuron")
    for neuron, expected in naive.items():
        for column, value in expected.items():
            assert rows.loc[neuron, column] == pytest.approx(value, rel=1e-3, abs=1e-6), (neuron, column)
    relative = {n: r["relative entropy change, repeated half"] for n, r in naive.items()}
    assert best == min(relative, key=relative.get)
    ranked = sorted(relative.values())
    assert ranked[1] - ranked[0] > 1e-3  # a real choice
    # the same pick whatever the candidates' order (so neither "the first" nor "the last" passes)
    again, _ = en.pick_induction_neuron(model, clean, candidates[::-1], values[::-1], half)
    assert again == best


def test_figures_build(model):
    geometry = en.final_layer_neuron_geometry(model, null_space_dim=2)
    spectrum = en.unembedding_spectrum(model)
    assert len(en.spectrum_figure(spectrum, 2).data) == 2
    assert len(en.geometry_figure(geometry, {"candidates": [PLANTED_ENTROPY], "random": [1, 2]}).data) == 3


def test_neuron_names():
    assert en.neuron_name(11, 584) == "11.584"
    assert en.parse_neuron_name("11.584") == (11, 584)
    with pytest.raises(ValueError, match="layer.neuron"):
        en.parse_neuron_name("L11N584")
    assert en.rank_of(5, [9, 5, 1]) == 2 and en.rank_of(4, [9, 5]) is None
    assert en.default_null_space_dim(768) == 12


def test_final_norm_facts_detects_a_uniform_logit_shift():
    generator = torch.Generator().manual_seed(0)
    d_model, d_vocab = 8, 50
    W_U = 0.01 * torch.randn(d_model, d_vocab, generator=generator)
    W_U[0] += 5.0  # direction 0 shifts every logit by the same amount
    readout = en.FinalReadout("rms", 1e-5, torch.linspace(-1.0, 2.0, d_model), torch.zeros(d_model), W_U, torch.zeros(d_vocab))
    facts = en.final_norm_facts(readout)
    assert facts["gamma_min"] == pytest.approx(-1.0) and facts["gamma_max"] == pytest.approx(2.0)
    assert facts["uncentred_top_direction_uniformity"] > 0.99
    W_U[0] -= 5.0
    W_U[1, ::2] += 5.0  # now the strongest direction separates tokens instead
    facts = en.final_norm_facts(en.FinalReadout("rms", 1e-5, torch.ones(d_model), torch.zeros(d_model), W_U, torch.zeros(d_vocab)))
    assert facts["uncentred_top_direction_uniformity"] < 0.9


# --------------------------------------------------------------------------------------------------
# The paper's induction setup (clipped mean ablation on repeated text), token-frequency direct
# effect, induction heads and BOS ablation
# --------------------------------------------------------------------------------------------------


def _entropy(logits):
    logp = logits.double().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _naive_edit_effects(model, batch, edit, clean, *, direction=None):
    """Full forward passes with ``edit`` on the final layer's hook_post; total, frozen-scale (direct) and,
    given a vocab ``direction``, total with the logits' component along its centred unit vector reset to
    the clean value (the official ``adjust_vectors_3dim``). Per-token changes on ``clean.valid``."""
    layer = model.cfg.n_layers - 1
    logits0, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n == "ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"].clone()
    hooks = [(f"blocks.{layer}.mlp.hook_post", edit)]
    total = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
    direct = model.run_with_hooks(batch.tokens, fwd_hooks=hooks + [("ln_final.hook_scale", lambda a, hook: scale)])
    variants = {"total": total, "direct": direct}
    if direction is not None:
        u = direction - direction.mean()
        u = u / u.norm()
        variants["frozen"] = total + ((logits0 @ u) - (total @ u))[..., None] * u
    targets = torch.cat([batch.tokens[:, 1:], batch.tokens[:, :1]], dim=1)
    out = {}
    for label, logits in variants.items():
        logprobs = logits.double().log_softmax(-1)
        loss = -logprobs.gather(-1, targets[..., None])[..., 0]
        out[f"entropy_{label}"] = (_entropy(logits) - clean.entropy)[clean.valid].float()
        out[f"loss_{label}"] = (loss - clean.loss)[clean.valid].float()
    return out


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")
@pytest.mark.parametrize("side", ["above", "below"])
def test_clipped_ablation_matches_full_forward_passes(model, batch, side):
    """Clipped ablation = the official strict_neurons_clipped_ablation_hook: min(a, v) ("above") or max(a, v)."""
    neurons = [PLANTED_ENTROPY, 3]
    clean = en.run_clean(model, batch, neurons)
    values = [float(clean.activation(n)[clean.valid].median()) for n in neurons]  # about half the tokens clipped
    effects = en.mean_ablation_effects(model, clean, neurons, values=values, clip=[side, side], token_chunk=9)
    plain = en.mean_ablation_effects(model, clean, neurons, values=values)
    for i, (neuron, value) in enumerate(zip(neurons, values)):
        def edit(post, hook, neuron=neuron, value=value):
            post = post.clone()
            clip = torch.minimum if side == "above" else torch.maximum
            post[..., neuron] = clip(post[..., neuron], torch.tensor(value))
            return post

        naive = _naive_edit_effects(model, batch, edit, clean)
        untouched = (clean.activation(neuron)[clean.valid] <= value) if side == "above" else (clean.activation(neuron)[clean.valid] >= value)
        assert 0 < int(untouched.sum()) < untouched.numel()  # some tokens clipped, some not
        for key in ("entropy_total", "entropy_direct", "loss_total", "loss_direct"):
            ours = getattr(effects, key)[i]
            assert float(naive[key].abs().max()) > 1e-4, f"{key} of neuron {neuron} too small to test anything"
            torch.testing.assert_close(ours, naive[key], atol=2e-4, rtol=1e-3)
            assert float(ours[untouched].abs().max()) < 1e-5  # the clip leaves these tokens alone
        assert not torch.allclose(effects.entropy_total[i], plain.entropy_total[i])
    with pytest.raises(ValueError, match="clip"):
        en.mean_ablation_effects(model, clean, neurons, values=values, clip=["above"])
    with pytest.raises(ValueError, match="clip"):
        en.mean_ablation_effects(model, clean, neurons, values=values, clip=["up", "down"])


def test_frozen_logit_direction_matches_definition(model, batch):
    log_unigram = torch.log_softmax(2 * torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(3)), -1)
    neurons = [PLANTED_ENTROPY, 3, 40]
    clean = en.run_clean(model, batch, neurons, log_unigram=log_unigram)
    values = [float(clean.neuron_means[n]) + 4.0 for n in neurons]
    effects = en.mean_ablation_effects(model, clean, neurons, values=values, frozen_logit_direction=log_unigram, token_chunk=11)
    assert effects.kl_frozen_direction is not None
    for i, (neuron, value) in enumerate(zip(neurons, values)):
        def edit(post, hook, neuron=neuron, value=value):
            post = post.clone()
            post[..., neuron] = value
            return post

        naive = _naive_edit_effects(model, batch, edit, clean, direction=log_unigram)
        assert float((naive["loss_frozen"] - naive["loss_total"]).abs().max()) > 1e-4  # the freeze matters
        torch.testing.assert_close(effects.loss_frozen_direction[i], naive["loss_frozen"], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(effects.loss_total[i], naive["loss_total"], atol=2e-4, rtol=1e-3)
    summary = effects.summary()
    expected = 1 - effects.loss_frozen_direction.abs().mean(-1) / effects.loss_total.abs().mean(-1)
    assert summary["loss_direction_share"].tolist() == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-6)
    # a constant shift of the direction changes nothing (it is centred first)
    shifted = en.mean_ablation_effects(model, clean, neurons[:1], values=values[:1], frozen_logit_direction=log_unigram + 5.0)
    torch.testing.assert_close(shifted.loss_frozen_direction[0], effects.loss_frozen_direction[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="d_vocab"):
        en.mean_ablation_effects(model, clean, neurons, frozen_logit_direction=log_unigram[:-1])
    with pytest.raises(ValueError, match="constant"):
        en.mean_ablation_effects(model, clean, neurons, frozen_logit_direction=torch.ones(model.cfg.d_vocab))


def test_repeated_text(model):
    windows = load_corpus_tokens(model, 3, 12, seed=0)
    repeated = en.repeated_text(windows, 7)
    assert repeated.tokens.shape == (3, 15)
    assert torch.equal(repeated.tokens[:, :8], windows.tokens[:, :8])
    assert torch.equal(repeated.tokens[:, 8:], windows.tokens[:, 1:8])
    assert bool((repeated.attention_mask == 1).all())
    with pytest.raises(ValueError, match="at least"):
        en.repeated_text(windows, 12)
    with pytest.raises(TypeError):
        en.repeated_text(windows.tokens, 5)


def test_induction_ablation_values_by_hand(model):
    half = 6
    repeated = en.repeated_text(load_corpus_tokens(model, 4, half + 1, seed=1), half)
    neurons = [PLANTED_ENTROPY, 3, 5, 12]
    clean = en.run_clean(model, repeated, neurons)
    values, sides = en.induction_ablation_values(clean, neurons, half)
    for neuron, value, side in zip(neurons, values, sides):
        activation = clean.activation(neuron)
        first = activation[:, 1 : half + 1].mean()  # text of the first occurrence (BOS left out)
        second = activation[:, half + 1 :].mean()
        assert value == pytest.approx(float(first), rel=1e-5, abs=1e-6)
        assert side == ("above" if second >= first else "below")
    with pytest.raises(ValueError, match="positions"):
        en.induction_ablation_values(clean, neurons, half + 1)


def test_per_position_effects_of_several_neurons_equals_one_at_a_time(model):
    """One shared pass (clean logits formed once per chunk) gives each neuron's frame as its own call does;
    under a clipped ablation the tokens a neuron leaves alone get exactly zero effect."""
    half = 6
    repeated = en.repeated_text(load_corpus_tokens(model, 4, half + 1, seed=2), half)
    neurons = [PLANTED_ENTROPY, 3, 5]
    clean = en.run_clean(model, repeated, neurons)
    values = [float(clean.activation(n)[:, 1:].median()) for n in neurons]
    sides = ["above", "below", "none"]
    together = en.per_position_effects_of(model, clean, neurons, values, clip=sides)
    for neuron, value, side, frame in zip(neurons, values, sides, together):
        alone = en.per_position_effects(model, clean, neuron, value, clip=side)
        # Float32 rounding only: the shared pass multiplies other batch shapes (another BLAS kernel on
        # another CPU; CI saw 2e-5 on a ratio whose clean entropy is small). A wrong token or neuron is O(1).
        pd.testing.assert_frame_equal(frame, alone, rtol=1e-4, atol=1e-4)
    effects = en.mean_ablation_effects(model, clean, neurons[:1], values=values[:1], clip=["above"], token_chunk=5)
    untouched = clean.activation(neurons[0])[clean.valid] <= values[0]
    assert 0 < int(untouched.sum()) < untouched.numel()
    assert bool((effects.entropy_total[0][untouched] == 0).all()) and bool((effects.loss_direct[0][untouched] == 0).all())
    assert float(effects.entropy_total[0][~untouched].abs().max()) > 0
    with pytest.raises(ValueError, match="one entry per neuron"):
        en.per_position_effects_of(model, clean, neurons, values[:2], clip=sides)


def test_entropy_ratio_curve_and_largest_reduction_match_full_forward_passes(model):
    """Fig. 5b: mean over sequences of H_ablated / H per position; the statistic is 1 − its minimum on the repeat."""
    half = 6
    repeated = en.repeated_text(load_corpus_tokens(model, 4, half + 1, seed=2), half)
    neuron = PLANTED_ENTROPY
    clean = en.run_clean(model, repeated, [neuron])
    value = float(clean.activation(neuron)[:, 1:].median())
    frame = en.per_position_effects(model, clean, neuron, value, clip="above")
    layer = model.cfg.n_layers - 1

    def edit(post, hook):
        post = post.clone()
        post[..., neuron] = torch.minimum(post[..., neuron], torch.tensor(value))
        return post

    with torch.no_grad():
        h_clean = _entropy(model(repeated.tokens))[:, :-1]
        h_ablated = _entropy(model.run_with_hooks(repeated.tokens, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", edit)]))[:, :-1]
    ratio = h_ablated / h_clean
    assert float((ratio - 1).abs().max()) > 1e-3
    assert frame["entropy_ratio_total"].to_numpy() == pytest.approx(ratio.mean(0).numpy(), rel=5e-4, abs=1e-5)
    assert frame["entropy_ratio_total_min"].to_numpy() == pytest.approx(ratio.min(0).values.numpy(), rel=5e-4, abs=1e-5)
    stats = en.largest_entropy_reduction(frame, half)
    assert stats["token"] > 1e-3  # something to compare
    on_repeat = ratio[:, half + 1 :]
    assert stats["curve"] == pytest.approx(float(1 - on_repeat.mean(0).min()), abs=5e-4)
    assert stats["token"] == pytest.approx(float(1 - on_repeat.min()), abs=5e-4)
    assert stats["mean"] == pytest.approx(float(1 - on_repeat.mean(0).mean()), abs=5e-4)
    assert stats["token"] >= stats["curve"] >= stats["mean"] - 1e-9
    with pytest.raises(ValueError, match="half_length"):
        en.largest_entropy_reduction(frame, 2 * half)


def test_induction_scores_match_a_naive_loop(model):
    half = 5
    batch = en.repeated_random_tokens(model, 3, half, seed=0)
    scores = en.induction_scores(model, batch, half)
    assert scores.shape == (model.cfg.n_layers, model.cfg.n_heads)
    _, cache = model.run_with_cache(batch.tokens)
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        for head in range(model.cfg.n_heads):
            values = [float(pattern[b, head, q, q - half + 1]) for b in range(3) for q in range(half + 1, 2 * half + 1)]
            assert float(scores[layer, head]) == pytest.approx(sum(values) / len(values), rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="positions"):
        en.induction_scores(model, batch, half + 1)


def test_top_and_random_heads():
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.0, 0.7]])
    assert en.top_heads(scores, 3) == [(0, 1), (1, 0), (1, 2)]
    with pytest.raises(ValueError):
        en.top_heads(scores, 7)
    drawn = en.random_heads((2, 3), 2, seed=0, layers=[0, 1], exclude=[(0, 1), (1, 0)])
    assert len(set(drawn)) == 2 and not set(drawn) & {(0, 1), (1, 0)}
    assert drawn == en.random_heads((2, 3), 2, seed=0, layers=[0, 1], exclude=[(0, 1), (1, 0)])
    assert set(en.random_heads((2, 3), 3, seed=1, layers=[1])) == {(1, 0), (1, 1), (1, 2)}
    with pytest.raises(ValueError, match="cannot draw"):
        en.random_heads((2, 3), 3, seed=0, layers=[0], exclude=[(0, 0)])


def test_bos_ablation_matches_one_forward_pass_per_position(model):
    """The batched copies against the official loop: one full forward pass per (sequence, position), the
    heads' pattern row at that position one-hot on BOS, activation and entropy read there."""
    half = 4
    batch = en.repeated_random_tokens(model, 2, half, seed=1)
    heads = [(0, 1), (1, 0), (1, 2)] if model.cfg.n_heads > 2 else [(0, 1), (1, 0)]
    neurons = [PLANTED_ENTROPY, 3]
    positions = [2, 3, 5, 6, 7, 8]
    result = en.bos_ablation(model, batch, heads, neurons, positions=positions, copies_per_pass=4)
    final = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post"
    changed = 0.0
    for seq in range(2):
        for i, p in enumerate(positions):
            def to_bos(pattern, hook, layer):
                pattern = pattern.clone()
                for l, h in heads:
                    if l == layer:
                        pattern[:, h, p, :] = 0.0
                        pattern[:, h, p, 0] = 1.0
                return pattern

            names = {f"blocks.{l}.attn.hook_pattern" for l, _ in heads}
            with model.hooks(fwd_hooks=[(n, partial(to_bos, layer=int(n.split(".")[1]))) for n in names]):
                logits, cache = model.run_with_cache(batch.tokens[seq : seq + 1])
            expected = cache[final][0, p, neurons]
            torch.testing.assert_close(result["activation"][seq, i], expected.float(), atol=1e-4, rtol=1e-4)
            assert float(result["entropy"][seq, i]) == pytest.approx(float(_entropy(logits[0, p])), rel=1e-4, abs=1e-5)
            changed = max(changed, float((expected - result["clean_activation"][seq, i]).abs().max()))
            # the ablated head's output at p is its value vector at BOS (what attending only to BOS means)
            l, h = heads[0]
            v, z = cache[f"blocks.{l}.attn.hook_v"], cache[f"blocks.{l}.attn.hook_z"]
            kv = h // (z.shape[2] // v.shape[2])
            torch.testing.assert_close(z[0, p, h], v[0, 0, kv], atol=1e-5, rtol=1e-5)
    assert changed > 1e-4  # the ablation moved the neuron
    _, clean_cache = model.run_with_cache(batch.tokens)
    torch.testing.assert_close(result["clean_activation"], clean_cache[final][:, positions][..., neurons].float())
    summary = en.bos_ablation_summary({"heads": result}, neuron_index=0)
    assert summary.loc[0, "activation change"] == pytest.approx(
        float(result["activation"][..., 0].mean() - result["clean_activation"][..., 0].mean()), abs=1e-6)
    assert len(en.bos_ablation_figure({"heads": result}, "x", half_length=half).data) == 2
    with pytest.raises(ValueError, match="positions"):
        en.bos_ablation(model, batch, heads, neurons, positions=[0])
    with pytest.raises(ValueError, match="heads"):
        en.bos_ablation(model, batch, [(model.cfg.n_layers, 0)], neurons)


def test_run_clean_chunking_does_not_change_the_results(model, batch):
    whole = en.run_clean(model, batch, [3], batch_size=len(batch))
    one_by_one = en.run_clean(model, batch, [3], batch_size=1)
    default = en.run_clean(model, batch, [3])  # rows from helpers.batching's memory budget
    for other in (one_by_one, default):
        torch.testing.assert_close(other.entropy, whole.entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.loss, whole.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.activation(3), whole.activation(3), atol=1e-5, rtol=1e-5)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            en.run_clean(model, batch, [3], batch_size=bad)
