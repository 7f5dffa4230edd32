"""Tests of helpers.studies.sparse_autoencoders (the SAE notebook's grid, evaluation and seed matching)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.sae import SAEConfig, SparseAutoencoder, fraction_of_variance_unexplained
from helpers.studies import sparse_autoencoders as S


def test_default_lr_is_sparsifys_scaling():
    assert S.default_lr(2**14) == pytest.approx(2e-4)
    assert S.default_lr(2**12) == pytest.approx(4e-4)


def test_grid_has_the_three_parts_with_unique_names():
    grid = S.sae_grid(16, n_latents=64, ks=(2, 4), relu_l1=(0.01, 0.1), seed_k=4, seed_l1=0.01, seeds=(0, 1, 2),
                      sizes=(32, 64, 128), batch_size=8)
    names = [e.name for e in grid]
    assert len(names) == len(set(names))
    parts = {p: [e for e in grid if e.part == p] for p in ("frontier", "seeds", "sizes")}
    assert len(parts["frontier"]) == 4 and all(e.config.seed == 0 and e.config.n_latents == 64 for e in parts["frontier"])
    assert {(e.config.activation, e.config.seed) for e in parts["seeds"]} == {("topk", 1), ("topk", 2), ("relu", 1), ("relu", 2)}
    assert {(e.config.n_latents, e.config.seed) for e in parts["sizes"]} == {(32, 0), (32, 1), (128, 0), (128, 1)}
    main = [e for e in grid if e.family == "topk k=4 n=64"]
    assert sorted(e.config.seed for e in main) == [0, 1, 2]  # frontier seed 0 + the seed part
    assert all(e.config.lr == pytest.approx(S.default_lr(e.config.n_latents)) for e in grid)
    fixed = S.sae_grid(16, n_latents=64, ks=(4,), relu_l1=(0.01,), seed_k=4, seed_l1=0.01, seeds=(0, 1), sizes=(),
                       batch_size=8, lr=1e-3)
    assert all(e.config.lr == 1e-3 for e in fixed)
    with pytest.raises(ValueError, match="seed_k"):
        S.sae_grid(16, n_latents=64, ks=(2,), relu_l1=(0.01,), seed_k=4, seed_l1=0.01, seeds=(0, 1), sizes=())
    with pytest.raises(ValueError, match="two seeds"):
        S.sae_grid(16, n_latents=64, ks=(4,), relu_l1=(0.01,), seed_k=4, seed_l1=0.01, seeds=(0,), sizes=())


def _permuted_copy(sae: SparseAutoencoder, perm: torch.Tensor, seed: int) -> SparseAutoencoder:
    copy = SparseAutoencoder(SAEConfig(**{**sae.config.__dict__, "seed": seed}))
    with torch.no_grad():
        copy.W_enc.copy_(sae.W_enc[:, perm])
        copy.b_enc.copy_(sae.b_enc[perm])
        copy.W_dec.copy_(sae.W_dec[perm])
        copy.b_dec.copy_(sae.b_dec)
    return copy


def test_seed_consistency_pairs_every_seed_of_a_family():
    grid = S.sae_grid(64, n_latents=32, ks=(3,), relu_l1=(0.01,), seed_k=3, seed_l1=0.01, seeds=(0, 1, 2), sizes=(),
                      batch_size=8)
    saes = {e.name: SparseAutoencoder(e.config, generator=torch.Generator().manual_seed(e.config.seed)) for e in grid}
    topk = [e for e in grid if e.config.activation == "topk"]
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    saes[topk[1].name] = _permuted_copy(saes[topk[0].name], perm, 1)  # seed 1 = seed 0's latents, reordered
    pairs, matches = S.seed_consistency(saes, grid)
    assert len(pairs) == 6 and set(pairs["activation"]) == {"topk", "relu"}
    row = pairs[(pairs["family"] == topk[0].family) & (pairs["seed_a"] == 0) & (pairs["seed_b"] == 1)].iloc[0]
    assert row["shared"] == 1.0 and row["median_decoder_cosine"] == pytest.approx(1.0)
    other = pairs[(pairs["family"] == topk[0].family) & (pairs["seed_b"] == 2)]
    assert (other["shared"] < 0.2).all()  # random 64-d directions: no cosines above 0.7 in both
    assert set(matches) == {f"{r.family} seeds {r.seed_a}-{r.seed_b}" for r in pairs.itertuples()}


def test_pick_feature_latents_respects_density_and_picks_the_largest():
    latents = torch.zeros(1000, 5)
    latents[:1, 0] = 9.0           # density 0.001: too rare
    latents[:10, 1] = 3.0          # 0.01
    latents[:20, 2] = 5.0          # 0.02
    latents[:500, 3] = 7.0         # 0.5: too dense
    latents[:30, 4] = 1.0          # 0.03
    assert S.pick_feature_latents(latents, 2) == [2, 1]
    assert S.pick_feature_latents(latents, 10) == [2, 1, 4]
    with pytest.raises(ValueError, match="widen"):
        S.pick_feature_latents(torch.zeros(100, 3), 1)


def test_evaluate_saes_on_a_tiny_model(tiny_llama):
    from helpers.prompts import tokenize
    from helpers.sae import collect_activations, spliced_loss

    hook = "blocks.0.hook_mlp_out"
    batch = tokenize(tiny_llama, ["The cat sat on the mat.", "Numbers: one two three four five."])
    acts = collect_activations(tiny_llama, batch, hook, progress=False)
    d = tiny_llama.cfg.d_model
    grid = S.sae_grid(d, n_latents=2 * d, ks=(4,), relu_l1=(0.01,), seed_k=4, seed_l1=0.01, seeds=(0, 1), sizes=(),
                      batch_size=4)
    saes = {e.name: SparseAutoencoder(e.config, generator=torch.Generator().manual_seed(e.config.seed)) for e in grid}
    table = S.evaluate_saes(tiny_llama, saes, acts, batch, hook, grid=grid)
    assert list(table["name"]) == list(saes) and set(table["part"]) == {"frontier", "seeds"}
    for row in table.itertuples():
        sae = saes[row.name]
        with torch.no_grad():
            out = sae(acts)
        assert row.fvu == pytest.approx(float(fraction_of_variance_unexplained(acts, out.reconstruction)), rel=1e-5)
        alone = spliced_loss(tiny_llama, batch, hook, lambda x, sae=sae: sae(x).reconstruction)
        assert row.loss_spliced == pytest.approx(alone["spliced"], rel=1e-5)
        assert row.fraction_recovered == pytest.approx(alone["fraction_recovered"], rel=1e-4, abs=1e-6)
        assert 0 <= row.dead <= 1 and math.isfinite(row.loss_zero)
    topk = table[table["activation"] == "topk"]
    assert (topk["l0"] <= 4 + 1e-6).all()


def test_steering_effect_raises_the_promoted_tokens(tiny_llama):
    from helpers.prompts import tokenize

    batch = tokenize(tiny_llama, ["The cat sat on the mat."])
    token = 7
    direction = tiny_llama.W_U[:, token].detach().float()  # the final layer's own unembedding of the token
    effect = S.steering_effect(tiny_llama, batch, f"blocks.{tiny_llama.cfg.n_layers - 1}.hook_resid_post",
                               direction / direction.norm(), 20.0, [token])
    assert effect["gain"] > 0.5 and effect["steered"] == pytest.approx(effect["clean"] + effect["gain"])
    none = S.steering_effect(tiny_llama, batch, "blocks.0.hook_mlp_out", direction, 0.0, [token])
    assert none["gain"] == pytest.approx(0.0, abs=1e-6)


def test_shipped_sae_is_found_or_named():
    if (S.SHIPPED_SAE_DIR / "cfg.json").is_file():
        sae, config, metadata = S.load_shipped_sae()
        assert config.activation == "topk" and config.k == 32 and metadata["hook"] == "blocks.15.hook_mlp_out"
        assert metadata["training_tokens"] >= 490_000 and sae.n_latents == 4 * sae.d_in
    with pytest.raises(FileNotFoundError, match="make sae-checkpoint"):
        S.load_shipped_sae(S.DATA_DIR / "no-such-sae")


def test_corpus_windows_hold_out_the_first_windows(tiny_llama):
    from helpers.corpus import load_corpus_tokens

    train, held_out = S.corpus_windows(tiny_llama, 5, 2, 32, seed=3)
    every = load_corpus_tokens(tiny_llama, 7, 32, seed=3)
    assert torch.equal(held_out.tokens, every.tokens[:2]) and torch.equal(train.tokens, every.tokens[2:])
    smaller_train, smaller_held_out = S.corpus_windows(tiny_llama, 2, 1, 32, seed=3)
    assert torch.equal(smaller_held_out.tokens, held_out.tokens[:1])  # a smaller run's held-out windows stay held out
    with pytest.raises(ValueError, match="n_eval"):
        S.corpus_windows(tiny_llama, 5, 0, 32)


def test_chance_similarity_is_low_for_random_and_one_for_a_copy():
    config = SAEConfig(d_in=64, n_latents=32, k=3)
    sae = SparseAutoencoder(config, generator=torch.Generator().manual_seed(0))
    chance = S.chance_similarity(sae)
    assert 0 < chance < 0.5
    assert S.chance_similarity(sae, seed=0) == pytest.approx(1.0)  # seed 0 rebuilds the same initial SAE


def test_sparsify_loads_the_shipped_sae_and_computes_the_same():
    """The files follow EleutherAI sparsify's layout: sparsify itself (not a dependency; runs where it is installed,
    e.g. ``pip install --no-deps eai-sparsify==1.3.3 natsort simple-parsing docstring-parser schedulefree``) reads
    them and reconstructs alike."""
    sparsify = pytest.importorskip("sparsify")
    if not (S.SHIPPED_SAE_DIR / "cfg.json").is_file():
        pytest.skip("no shipped SAE (make sae-checkpoint)")
    ours, _, _ = S.load_shipped_sae()
    theirs = sparsify.SparseCoder.load_from_disk(S.SHIPPED_SAE_DIR).float()  # float16 files; compare in float32 as ours runs
    assert (theirs.d_in, theirs.num_latents, theirs.cfg.k) == (ours.d_in, ours.n_latents, ours.config.k)
    x = torch.randn(32, ours.d_in, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        mine, out = ours(x), theirs(x)
    dense = torch.zeros_like(mine.latents).scatter_(1, out.latent_indices.long(), out.latent_acts.float())
    scale = float(mine.reconstruction.abs().max())
    torch.testing.assert_close(out.sae_out, mine.reconstruction, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(dense, mine.latents, rtol=1e-4, atol=1e-4 * float(mine.latents.abs().max()))
