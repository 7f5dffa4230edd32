"""Tests of helpers.sae on tiny synthetic data (no model): TopK/ReLU encoding, metrics, training on a
known sparse dictionary, seed consistency, AuxK, repeatability, safetensors files and input errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import sae as sae_lib
from helpers.sae import (
    SAEConfig,
    SparseAutoencoder,
    dead_and_dense,
    fraction_of_variance_unexplained,
    l0,
    latent_density,
    load_sae,
    match_latents,
    save_sae,
    shared_fraction,
    train_sae,
)

D_IN, N_TRUE, K = 32, 64, 3


def sparse_dictionary_data(n: int = 8192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples, each a sum of 3 of 64 random unit directions in d=32 with coefficients in [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_TRUE, D_IN, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    chosen = torch.rand(n, N_TRUE, generator=generator).argsort(dim=1)[:, :K]
    coefficients = torch.rand(n, K, generator=generator) + 0.5
    codes = torch.zeros(n, N_TRUE).scatter(1, chosen, coefficients)
    return codes @ directions, directions


def synthetic_config(seed: int = 0, **overrides) -> SAEConfig:
    settings = dict(d_in=D_IN, n_latents=64, k=K, lr=3e-3, batch_size=256, n_steps=1000, seed=seed,
                    dead_after=1024, auxk_k=16, auxk_coefficient=0.5)
    settings.update(overrides)
    return SAEConfig(**settings)


@pytest.fixture(scope="module")
def data():
    return sparse_dictionary_data()


@pytest.fixture(scope="module")
def trained(data):
    """Two TopK SAEs on the same data, seeds 0 and 1."""
    activations, _ = data
    return [train_sae(activations, synthetic_config(seed), progress=False) for seed in (0, 1)]


def _random_input(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _naive_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    pre = pre.detach()
    out = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda j: -float(pre[row, j]))
        for j in order[:k]:
            out[row, j] = max(float(pre[row, j]), 0.0)
    return out


def test_topk_encode_keeps_k_largest_like_a_naive_sort():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=20, k=5, seed=3))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k non-zeros survive the ReLU
        sae.b_dec.copy_(_random_input((8,), seed=4))
    x = _random_input((50, 8), seed=5)
    latents = sae.encode(x)
    assert ((latents != 0).sum(-1) == 5).all()
    torch.testing.assert_close(latents, _naive_topk(sae.pre_activations(x), 5), rtol=0, atol=0)
    # pre-activations follow (x - b_dec) @ W_enc + b_enc
    torch.testing.assert_close(sae.pre_activations(x), (x - sae.b_dec) @ sae.W_enc + sae.b_enc)


def test_topk_relus_kept_negative_pre_activations_and_matches_naive_sort():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=20, k=5, seed=3))
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # many of the k largest are negative
    x = _random_input((50, 8), seed=6)
    latents = sae.encode(x)
    assert ((latents != 0).sum(-1) <= 5).all() and ((latents != 0).sum(-1) < 5).any()
    assert (latents >= 0).all()
    torch.testing.assert_close(latents, _naive_topk(sae.pre_activations(x), 5), rtol=0, atol=0)


def test_relu_encode_and_forward():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=20, activation="relu", seed=1))
    x = _random_input((2, 7, 8))  # leading dimensions are kept
    out = sae(x)
    assert out.latents.shape == (2, 7, 20) and out.reconstruction.shape == (2, 7, 8)
    torch.testing.assert_close(out.latents, torch.relu(out.pre_activations))
    torch.testing.assert_close(out.reconstruction, out.latents @ sae.W_dec + sae.b_dec)


def test_init_has_unit_decoder_rows_and_tied_encoder():
    sae = SparseAutoencoder(SAEConfig(d_in=16, n_latents=40, k=4, seed=0))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(40))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()


def test_init_b_dec_mean_and_geometric_median():
    sae = SparseAutoencoder(SAEConfig(d_in=2, n_latents=4, k=1))
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    sae.init_b_dec(points, "mean")
    torch.testing.assert_close(sae.b_dec.detach(), torch.tensor([11 / 3, 0.0]))
    sae.init_b_dec(points, "geometric_median")  # the median of three collinear points is the middle one
    torch.testing.assert_close(sae.b_dec.detach(), torch.tensor([1.0, 0.0]), atol=1e-2, rtol=0)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_fvu_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 4.0], [5.0, 2.0]])
    # mean (3, 2): total = (4+0) + (0+4) + (4+4) = 16; error = 1 + 1 + 4 = 6
    torch.testing.assert_close(fraction_of_variance_unexplained(x, x_hat), torch.tensor(6 / 16))


def test_fvu_is_zero_for_perfect_and_one_for_the_mean():
    x = _random_input((40, 6))
    torch.testing.assert_close(fraction_of_variance_unexplained(x, x.clone()), torch.tensor(0.0))
    mean = x.mean(0, keepdim=True).expand_as(x)
    torch.testing.assert_close(fraction_of_variance_unexplained(x, mean), torch.tensor(1.0))
    # leading dimensions are flattened
    torch.testing.assert_close(fraction_of_variance_unexplained(x.reshape(4, 10, 6), mean.reshape(4, 10, 6)),
                               torch.tensor(1.0))


def test_l0_density_dead_and_dense():
    latents = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.5, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(l0(latents), torch.tensor(5 / 3))  # 2 + 1 + 2 non-zeros over 3 tokens
    density = latent_density(latents)
    torch.testing.assert_close(density, torch.tensor([1.0, 0.0, 1 / 3, 1 / 3]))
    dead, dense = dead_and_dense(density, dense_above=0.5)
    assert dead.tolist() == [False, True, False, False]
    assert dense.tolist() == [True, False, False, False]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_topk_sae_recovers_the_ground_truth_dictionary(trained, data):
    activations, directions = data
    for result in trained:
        best = (directions @ result.sae.W_dec.detach().T).max(dim=1).values
        assert (best > 0.9).float().mean() >= 0.85, best
        with torch.no_grad():
            out = result.sae(activations)
        assert float(fraction_of_variance_unexplained(activations, out.reconstruction)) < 0.1
        assert float(l0(out.latents)) == pytest.approx(K, abs=0.05)
        assert result.history.fvu[-1] < 0.5 * result.history.fvu[0]
        assert len(result.history.loss) == result.config.n_steps


def test_decoder_rows_stay_unit_norm_after_training(trained, data):
    for result in trained:
        torch.testing.assert_close(result.sae.W_dec.detach().norm(dim=-1), torch.ones(64), atol=1e-5, rtol=0)
    # without normalize_decoder they drift (so the check above is not vacuous)
    activations, _ = data
    loose = train_sae(activations, synthetic_config(0, n_steps=50, normalize_decoder=False), progress=False)
    assert (loose.sae.W_dec.detach().norm(dim=-1) - 1).abs().max() > 1e-3


def test_parallel_gradient_is_removed_from_decoder_rows():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=12, k=3))
    x = _random_input((30, 8))
    (sae(x).reconstruction - x).pow(2).mean().backward()
    scale = float(sae.W_dec.grad.norm())
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() > 1e-2 * scale
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(12), atol=1e-6 * scale, rtol=0)


def test_relu_sae_with_l1_trains_and_is_sparse(data):
    activations, _ = data
    config = SAEConfig(d_in=D_IN, n_latents=64, activation="relu", l1_coefficient=0.05, lr=3e-3,
                       batch_size=256, n_steps=200, auxk_coefficient=0.0)
    result = train_sae(activations, config, progress=False)
    assert result.history.loss[-1] < result.history.loss[0]
    assert result.history.l0[-1] < 32


def test_training_is_bit_for_bit_repeatable(data):
    activations, _ = data
    config = synthetic_config(7, n_steps=60, dead_after=256)
    first, second = (train_sae(activations, config, progress=False) for _ in range(2))
    for name, parameter in first.sae.named_parameters():
        assert torch.equal(parameter, dict(second.sae.named_parameters())[name]), name
    assert first.history == second.history
    other = train_sae(activations, synthetic_config(8, n_steps=60, dead_after=256), progress=False)
    assert not torch.equal(first.sae.W_dec, other.sae.W_dec)


# --------------------------------------------------------------------------------------------------
# AuxK
# --------------------------------------------------------------------------------------------------


def test_auxk_loss_is_zero_without_dead_latents_and_trains_only_dead_ones():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=12, k=3))
    x = _random_input((30, 8))
    out = sae(x)
    residual = x - out.reconstruction
    total = (x - x.mean(0)).pow(2).sum()
    none_dead = torch.zeros(12, dtype=torch.bool)
    assert float(sae_lib.auxk_loss(sae, out.pre_activations, residual, none_dead, total, 4)) == 0.0
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    loss = sae_lib.auxk_loss(sae, out.pre_activations, residual, dead, total, 4)
    assert float(loss.detach()) > 0
    loss.backward()
    touched = sae.W_enc.grad.abs().sum(0) > 0
    assert touched.tolist() == dead.tolist()  # only dead latents' encoders get an AuxK gradient


def test_auxk_leaves_fewer_dead_latents(data):
    """Shifted data and b_dec = 0 kill many latents early; AuxK revives a good part of them."""
    activations, _ = data
    shifted = activations[:4096].clone()
    shifted[:, 0] += 2.0
    dead = {}
    for coefficient in (0.0, 1.0):
        config = synthetic_config(1, n_steps=400, dead_after=512, auxk_coefficient=coefficient, b_dec_init="zeros")
        result = train_sae(shifted, config, progress=False)
        dead[coefficient] = result.history.dead_fraction[-1]
        if coefficient == 0:
            assert max(result.history.auxk_loss) == 0.0
        else:
            assert max(result.history.auxk_loss) > 0.0
    assert dead[0.0] >= 0.15, dead  # the setting does produce dead latents
    assert dead[1.0] <= 0.6 * dead[0.0], dead


# --------------------------------------------------------------------------------------------------
# Seed consistency
# --------------------------------------------------------------------------------------------------


def test_two_seeds_share_most_latents(trained):
    a, b = (result.sae for result in trained)
    for use in ("decoder", "encoder", "both"):
        match = match_latents(a, b, use=use)
        assert sorted(match.index_a.tolist()) == list(range(64)) and sorted(match.index_b.tolist()) == list(range(64))
        assert shared_fraction(match) >= 0.8, (use, shared_fraction(match))
    both = match_latents(a, b, use="both")
    torch.testing.assert_close(both.similarities, torch.minimum(both.decoder_similarity, both.encoder_similarity))
    assert shared_fraction(both) <= shared_fraction(match_latents(a, b, use="decoder"))


def test_trained_and_random_saes_share_almost_nothing(trained):
    random_sae = SparseAutoencoder(synthetic_config(123))
    for use in ("decoder", "both"):
        assert shared_fraction(match_latents(trained[0].sae, random_sae, use=use)) <= 0.05


def test_matching_a_permuted_copy_recovers_the_permutation(trained):
    a = trained[0].sae
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    b = SparseAutoencoder(a.config)
    with torch.no_grad():
        b.W_enc.copy_(a.W_enc[:, perm])
        b.b_enc.copy_(a.b_enc[perm])
        b.W_dec.copy_(a.W_dec[perm])
        b.b_dec.copy_(a.b_dec)
    for use in ("decoder", "encoder", "both"):
        match = match_latents(a, b, use=use)
        assert torch.equal(perm[match.index_b], match.index_a)  # B's latent j is A's latent perm[j]
        torch.testing.assert_close(match.similarities, torch.ones(64))
        assert shared_fraction(match, threshold=0.999) == 1.0


def test_shared_fraction_counts_strictly_above_threshold():
    # Paulo & Belrose: "cosine similarity greater than 0.7"
    assert shared_fraction(torch.tensor([0.1, 0.7, 0.71, 0.95]), threshold=0.7) == 0.5


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(trained, data, tmp_path):
    sae, config = trained[0].sae, trained[0].config
    save_sae(sae, config, tmp_path / "sae")
    loaded, loaded_config = load_sae(tmp_path / "sae")
    assert loaded_config == config
    x = data[0][:100]
    with torch.no_grad():
        original, again = sae(x), loaded(x)
    assert torch.equal(original.reconstruction, again.reconstruction)
    assert torch.equal(original.latents, again.latents)

    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert {"d_in": 32, "num_latents": 64, "k": 3, "activation": "topk", "normalize_decoder": True}.items() <= cfg.items()
    with safe_open(str(tmp_path / "sae" / "sae.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes == {"encoder.weight": (64, 32), "encoder.bias": (64,), "W_dec": (64, 32), "b_dec": (32,)}


def test_load_reads_a_sparsify_style_config(trained, tmp_path):
    sae = trained[0].sae
    save_sae(sae, None, tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "normalize_decoder": True, "num_latents": 64,
                                                   "k": 3, "multi_topk": False, "skip_connection": False, "d_in": 32}))
    loaded, config = load_sae(tmp_path)
    assert (config.d_in, config.n_latents, config.k, config.activation) == (32, 64, 3, "topk")
    assert torch.equal(loaded.W_enc, sae.W_enc)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_wrong_d_in_is_refused():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=12, k=3))
    with pytest.raises(ValueError, match=r"d_in=8"):
        sae.encode(torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"d_in=7.*SAEConfig\(d_in=7"):
        train_sae(torch.randn(64, 7), SAEConfig(d_in=8, n_latents=12, k=3, batch_size=16, n_steps=1), progress=False)
    with pytest.raises(ValueError, match=r"n_latents=12"):
        sae.decode(torch.zeros(5, 8))
    other = SparseAutoencoder(SAEConfig(d_in=9, n_latents=12, k=3))
    with pytest.raises(ValueError, match=r"same site"):
        match_latents(sae, other)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match=r"k=20 is larger than n_latents=12"):
        SAEConfig(d_in=8, n_latents=12, k=20)
    with pytest.raises(ValueError, match=r"activation='gelu' is unknown.*'topk' or 'relu'"):
        SAEConfig(d_in=8, n_latents=12, activation="gelu")
    with pytest.raises(ValueError, match=r"l1_coefficient"):
        SAEConfig(d_in=8, n_latents=12, k=3, l1_coefficient=0.1)
    with pytest.raises(ValueError, match=r"n_latents must be a positive int"):
        SAEConfig(d_in=8, n_latents=0)


def test_nan_and_badly_shaped_activations_are_refused():
    config = SAEConfig(d_in=4, n_latents=8, k=2, batch_size=8, n_steps=1)
    activations = torch.randn(32, 4)
    activations[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf.*1 of 32 tokens"):
        train_sae(activations, config, progress=False)
    with pytest.raises(ValueError, match=r"2-D \[n_tokens, d_in\].*rearrange"):
        train_sae(torch.randn(2, 16, 4), config, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 4 training tokens"):
        train_sae(torch.randn(4, 4), config, progress=False)
    with pytest.raises(ValueError, match=r"zero variance"):
        fraction_of_variance_unexplained(torch.ones(3, 2), torch.zeros(3, 2))


# --------------------------------------------------------------------------------------------------
# On a model (tiny-llama, random init)
# --------------------------------------------------------------------------------------------------

MODEL_TEXTS = ["The cat sat on the mat and looked at the door.", "A short one.", "Numbers: one two three four five six."]


def test_collect_activations_are_the_cached_real_tokens_without_bos(tiny_llama):
    from helpers.prompts import tokenize
    from helpers.sae import collect_activations

    batch = tokenize(tiny_llama, MODEL_TEXTS)
    hook = "blocks.1.hook_resid_post"
    got = collect_activations(tiny_llama, batch, hook, progress=False)
    one_by_one = collect_activations(tiny_llama, batch, hook, rows_per_forward=1, progress=False)
    expected = []
    for text in MODEL_TEXTS:  # each prompt alone (no padding): every position but the first (BOS)
        single = tokenize(tiny_llama, [text])
        with torch.no_grad():
            _, cache = tiny_llama.run_with_cache(single.tokens, attention_mask=single.attention_mask, names_filter=[hook])
        expected.append(cache[hook][0, 1:])
    expected = torch.cat(expected)
    assert got.shape == (int(batch.lengths.sum()) - len(MODEL_TEXTS), tiny_llama.cfg.d_model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_by_one, got, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a hook of this model"):
        collect_activations(tiny_llama, batch, "blocks.1.hook_resid_middle", progress=False)


def test_spliced_loss_identity_zero_and_a_hand_computed_clean_loss(tiny_llama):
    from helpers.prompts import tokenize
    from helpers.sae import spliced_loss

    batch = tokenize(tiny_llama, MODEL_TEXTS)
    hook = "blocks.0.hook_resid_post"
    same = spliced_loss(tiny_llama, batch, hook, lambda x: x)
    assert same["increase"] == pytest.approx(0.0, abs=1e-5) and same["fraction_recovered"] == pytest.approx(1.0, abs=1e-4)
    zeroed = spliced_loss(tiny_llama, batch, hook, torch.zeros_like)
    assert zeroed["spliced"] == pytest.approx(zeroed["zero"], abs=1e-6) and zeroed["fraction_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert abs(zeroed["zero"] - zeroed["clean"]) > 1e-3  # the site matters, so the checks above can fail
    total, count = 0.0, 0
    for text in MODEL_TEXTS:  # the clean loss by hand: each prompt alone, mean over next-token targets
        single = tokenize(tiny_llama, [text])
        with torch.no_grad():
            logprobs = tiny_llama(single.tokens).float().log_softmax(-1)[0]
        ids = single.tokens[0]
        total += float(-logprobs[:-1].gather(-1, ids[1:, None]).sum())
        count += len(ids) - 1
    assert same["clean"] == pytest.approx(total / count, rel=1e-4)
    # a halfway reconstruction recovers part of the loss
    half = spliced_loss(tiny_llama, batch, hook, lambda x: 0.5 * x)
    assert half["clean"] == pytest.approx(same["clean"]) and half["spliced"] != pytest.approx(same["clean"], abs=1e-4)
    # reusing the clean and zeroed losses of an earlier call changes nothing
    reused = spliced_loss(tiny_llama, batch, hook, lambda x: 0.5 * x, baselines=same)
    assert reused == pytest.approx(half)
    with pytest.raises(ValueError, match="baselines"):
        spliced_loss(tiny_llama, batch, hook, lambda x: x, baselines={"clean": 1.0})


def test_float16_files_and_metadata_round_trip(trained, data, tmp_path):
    sae = trained[0].sae
    save_sae(sae, None, tmp_path / "half", dtype=torch.float16, metadata={"tokens": 123})
    with safe_open(str(tmp_path / "half" / "sae.safetensors"), framework="pt") as f:
        assert f.get_tensor("W_dec").dtype == torch.float16
    loaded, _ = load_sae(tmp_path / "half")
    assert loaded.W_dec.dtype == torch.float32
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.half().float())
    assert json.loads((tmp_path / "half" / "cfg.json").read_text())["metadata"] == {"tokens": 123}
    with pytest.raises(ValueError, match="dtype"):
        save_sae(sae, None, tmp_path / "bad", dtype=torch.int8)


def test_token_positions_index_the_collected_rows(tiny_llama):
    from helpers.prompts import tokenize
    from helpers.sae import collect_activations, token_positions

    hook = "blocks.0.hook_resid_post"
    batch = tokenize(tiny_llama, MODEL_TEXTS)
    acts = collect_activations(tiny_llama, batch, hook, progress=False)
    positions = token_positions(batch)
    assert positions.shape == (acts.shape[0], 2)
    _, cache = tiny_llama.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=[hook])
    for i in (0, 5, acts.shape[0] - 1):
        row, pos = positions[i].tolist()
        torch.testing.assert_close(acts[i], cache[hook][row, pos].float())
        assert batch.attention_mask[row, pos] == 1


def test_top_activating_contexts_pick_the_largest_tokens_with_their_context(tiny_llama):
    from helpers.prompts import tokenize
    from helpers.sae import token_positions, top_activating_contexts

    batch = tokenize(tiny_llama, MODEL_TEXTS)
    positions = token_positions(batch)
    values = torch.zeros(positions.shape[0])
    values[3], values[7], values[1] = 5.0, 2.0, -1.0
    found = top_activating_contexts(tiny_llama.tokenizer, batch, positions, values, n=4, before=2, after=1)
    assert [c["activation"] for c in found] == [5.0, 2.0]  # zero and negative values are not contexts
    row, pos = positions[3].tolist()
    token = tiny_llama.tokenizer.decode(batch.tokens[row, pos:pos + 1])
    assert found[0]["token"] == token and f"[[{token}]]" in found[0]["context"]
    assert (found[0]["row"], found[0]["position"]) == (row, pos)
    with pytest.raises(ValueError, match="one value per row"):
        top_activating_contexts(tiny_llama.tokenizer, batch, positions, values[:-1])


def test_decoder_logit_effects_match_a_naive_readout(tiny_llama):
    from helpers.models import final_norm
    from helpers.sae import decoder_logit_effects

    d = tiny_llama.cfg.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=16, k=2), generator=torch.Generator().manual_seed(0))
    got = decoder_logit_effects(tiny_llama, sae, 3, k=5)
    gain = final_norm(tiny_llama).gain.float()
    naive = torch.stack([(sae.W_dec[3] * gain) @ tiny_llama.W_U[:, t].float() for t in range(tiny_llama.W_U.shape[1])])
    naive = (naive - naive.mean()).detach()
    top = naive.topk(5)
    assert [t for t, _ in got["top"]] == [tiny_llama.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert got["top_ids"] == top.indices.tolist() and got["bottom_ids"][0] == int(naive.argmin())
    torch.testing.assert_close(torch.tensor([v for _, v in got["top"]]), top.values.detach(), rtol=1e-4, atol=1e-5)
    assert got["bottom"][0][1] == pytest.approx(float(naive.min()), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        decoder_logit_effects(tiny_llama, sae, 16)


def test_steering_hook_adds_the_scaled_direction_everywhere(tiny_llama):
    from helpers.prompts import tokenize
    from helpers.sae import steering_hook

    hook = "blocks.0.hook_resid_post"
    batch = tokenize(tiny_llama, MODEL_TEXTS[:1])
    direction = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(name):
        def fn(activation, hook):
            seen[name] = activation.detach().clone()
        return fn

    tiny_llama.run_with_hooks(batch.tokens, fwd_hooks=[(hook, grab("clean"))])
    tiny_llama.run_with_hooks(batch.tokens, fwd_hooks=[(hook, steering_hook(direction, 3.0)), (hook, grab("steered"))])
    torch.testing.assert_close(seen["steered"] - seen["clean"], 3.0 * direction.expand_as(seen["clean"]),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="1-D"):
        steering_hook(direction[None], 1.0)


def test_latent_span_finds_the_stretch_where_the_latents_fire_and_keeps_raw_values(tiny_llama):
    from helpers.prompts import tokenize
    from helpers.sae import latent_span, token_positions

    batch = tokenize(tiny_llama, MODEL_TEXTS)
    positions = token_positions(batch)
    values = torch.zeros(positions.shape[0], 5)
    # latent 1 peaks at row 2 position 4, latent 3 fires at rows 2 (position 6) and 0 (position 2, larger);
    # only a stretch of row 2 holds both, and latent 1's scaled peak (1.0) outweighs latent 3's row-0 peak
    index = {tuple(p): i for i, p in enumerate(positions.tolist())}
    values[index[(2, 4)], 1] = 8.0
    values[index[(2, 6)], 3] = 1.0
    values[index[(0, 2)], 3] = 3.0
    got = latent_span(batch, positions, values, [1, 3], span=4)
    assert got["row"] == 2 and got["start"] == 3  # earliest start whose 4 tokens cover positions 4 and 6
    assert got["token_ids"] == batch.tokens[2, 3:7].tolist()
    assert got["values"].shape == (4, 2)
    torch.testing.assert_close(got["values"][:, 0], torch.tensor([0.0, 8.0, 0.0, 0.0]))
    torch.testing.assert_close(got["values"][:, 1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(got["peak"], torch.tensor([8.0, 3.0]))
    whole = latent_span(batch, positions, values, [3], span=500)  # longer than a row: the whole row
    assert whole["row"] == 0 and whole["start"] == 0 and len(whole["token_ids"]) == batch.tokens.shape[1]
    assert float(whole["values"][0, 0]) == 0.0  # BOS is never a position: its value stays 0
    with pytest.raises(ValueError, match="latents must be"):
        latent_span(batch, positions, values, [5])
    with pytest.raises(ValueError, match="one row per row of positions"):
        latent_span(batch, positions, values[:-1], [1])


def test_show_latent_tokens_draws_a_heatmap_and_writes_the_circuitsvis_page(tiny_llama, tmp_path, monkeypatch):
    from helpers.prompts import tokenize
    from helpers.sae import latent_span, show_latent_tokens, token_positions

    monkeypatch.setenv("MI_FIGURES_DIR", str(tmp_path))
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False, **kw: shown.append(obj))
    batch = tokenize(tiny_llama, MODEL_TEXTS)
    positions = token_positions(batch)
    values = torch.rand(positions.shape[0], 4, generator=torch.Generator().manual_seed(0))
    span = latent_span(batch, positions, values, [0, 2], span=5)
    path = show_latent_tokens(tiny_llama.tokenizer, span, [0, 2], name="test/latents")
    assert path == tmp_path / "test" / "latents.circuitsvis.html" and path.stat().st_size > 100_000
    figure = shown[0]["application/vnd.plotly.v1+json"]
    assert list(figure["data"][0]["y"]) == ["latent 0", "latent 2"] and len(figure["data"][0]["x"]) == 5  # latents × tokens
    assert (tmp_path / "test" / "latents.html").is_file()
    with pytest.raises(ValueError, match="expected"):
        show_latent_tokens(tiny_llama.tokenizer, span, [0, 2, 3])
