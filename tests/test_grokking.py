"""Tests for helpers.studies.grokking.training (model, data, training) and helpers.studies.grokking.fourier (analysis, progress measures)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.studies.grokking import fourier
from helpers.studies.grokking.training import (
    GrokkingConfig,
    GrokkingTransformer,
    cross_entropy_float64,
    init_params,
    load_checkpoint,
    load_history,
    make_dataset,
    save_checkpoint,
    save_history,
    step_flops,
    to_bridge,
    train,
)

SMALL = GrokkingConfig(p=13, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_epochs=20, checkpoint_every=5)


def reference_logits(params: dict[str, torch.Tensor], tokens: torch.Tensor, index: int) -> torch.Tensor:
    """A plain full-sequence causal transformer (the paper's code, written out), last position."""
    p = {k: v[index].double() for k, v in params.items()}
    x = p["W_E"][tokens] + p["W_pos"]                                     # [batch, pos, d]
    q = torch.einsum("bpd,hde->bhpe", x, p["W_Q"])
    k = torch.einsum("bpd,hde->bhpe", x, p["W_K"])
    v = torch.einsum("bpd,hde->bhpe", x, p["W_V"])
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = tokens.shape[1]
    scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    z = scores.softmax(-1) @ v                                            # [batch, head, pos, e]
    x = x + torch.einsum("bhpe,hed->bpd", z, p["W_O"])
    x = x + F.relu(x @ p["W_in"] + p["b_in"]) @ p["W_out"] + p["b_out"]
    return (x @ p["W_U"])[:, -1]


# --------------------------------------------------------------------------------------------------
# Data and configuration
# --------------------------------------------------------------------------------------------------


def test_dataset_matches_the_paper_split():
    data = make_dataset(113, 0.3, seed=0)
    assert data.tokens.shape == (113 * 113, 3)
    assert len(data.train_indices) == 3830 and len(data.test_indices) == 8939
    assert torch.equal(data.labels, (data.tokens[:, 0] + data.tokens[:, 1]) % 113)
    assert bool((data.tokens[:, 2] == 113).all())
    # The paper's code: random.seed(seed); random.shuffle(pairs); first 30% train.
    pairs = [(i, j) for i in range(113) for j in range(113)]
    random.seed(0)
    random.shuffle(pairs)
    expected = sorted(i * 113 + j for i, j in pairs[:3830])
    assert data.train_indices.tolist() == expected
    assert set(data.train_indices.tolist()).isdisjoint(data.test_indices.tolist())
    assert make_dataset(113, 0.3, seed=1).train_indices.tolist() != expected


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="frac_train"):
        GrokkingConfig(frac_train=1.5)
    with pytest.raises(ValueError, match="n_ctx"):
        GrokkingConfig(n_ctx=4)
    with pytest.raises(ValueError, match="d_model"):
        GrokkingConfig(d_model=0)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def test_initialisation_follows_the_paper_code():
    config = GrokkingConfig()
    params = init_params(config, seeds=(0, 1))
    assert params["W_E"].shape == (2, 114, 128) and params["W_U"].shape == (2, 128, 114)
    assert params["W_Q"].shape == (2, 4, 128, 32) and params["W_O"].shape == (2, 4, 32, 128)
    for name in ("W_E", "W_Q", "W_in", "W_out", "W_O"):
        assert params[name].std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05), name
    assert params["W_U"].std().item() == pytest.approx(1 / math.sqrt(114), rel=0.05)
    assert bool((params["b_in"] == 0).all()) and bool((params["b_out"] == 0).all())
    # A seed's weights do not depend on the other seeds it is trained with.
    alone = init_params(config, seeds=(1,))
    assert all(torch.equal(params[k][1], alone[k][0]) for k in params)
    assert not torch.equal(params["W_E"][0], params["W_E"][1])


def test_forward_matches_a_plain_full_sequence_transformer():
    config = GrokkingConfig()
    model = GrokkingTransformer(config, seeds=(0, 7))
    data = make_dataset()
    tokens = torch.stack([data.tokens[:300], data.tokens[5000:5300]])
    tokens[1, :10, 2] = 5  # the tables handle any last token, not only "="
    with torch.no_grad():
        ours = model(tokens)
        for i in range(2):
            expected = reference_logits(model.params, tokens[i], i)
            assert torch.allclose(ours[i].double(), expected, atol=2e-5), (ours[i].double() - expected).abs().max()
        shared = model(data.tokens[:50])
        assert torch.allclose(shared[1], model(data.tokens[:50].expand(2, -1, -1))[1])


def test_bridge_conversion_gives_identical_logits():
    model = GrokkingTransformer(GrokkingConfig(), seeds=(3, 4))
    data = make_dataset()
    tokens = data.tokens[::37]
    with torch.no_grad():
        ours = model(tokens)
        bridge = to_bridge(model, index=1)
        theirs = bridge(tokens)[:, -1]
        _, cache = bridge.run_with_cache(tokens[:4], names_filter=lambda n: n.endswith("hook_pattern"))
    assert torch.allclose(ours[1], theirs, atol=1e-5)
    assert not torch.allclose(ours[0], theirs, atol=1e-3)
    assert cache["blocks.0.attn.hook_pattern"].shape == (4, 4, 3, 3)


def test_cache_holds_last_position_activations():
    model = GrokkingTransformer(SMALL, seeds=(0,))
    data = make_dataset(SMALL.p)
    logits, cache = model.run_with_cache(data.tokens)
    n = SMALL.p ** 2
    assert logits.shape == (1, n, SMALL.p + 1)
    assert cache["pattern"].shape == (1, n, SMALL.n_heads, 3)
    assert torch.allclose(cache["pattern"].sum(-1), torch.ones(1, n, SMALL.n_heads))
    assert cache["mlp_post"].shape == (1, n, SMALL.d_mlp) and bool((cache["mlp_post"] >= 0).all())
    assert torch.allclose(cache["resid_post"] @ model.W_U, logits, atol=1e-5)


def test_forward_rejects_bad_tokens():
    model = GrokkingTransformer(SMALL, seeds=(0, 1))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.zeros(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="models"):
        model(torch.zeros(3, 5, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Loss and training
# --------------------------------------------------------------------------------------------------


def test_float64_cross_entropy_resolves_tiny_losses():
    logits = torch.randn(2, 6, 10)
    labels = torch.randint(0, 10, (6,))
    expected = torch.stack([F.cross_entropy(l.double(), labels) for l in logits])
    assert torch.allclose(cross_entropy_float64(logits, labels), expected)
    confident = torch.full((1, 1, 10), -30.0)
    confident[..., 3] = 0.0
    tiny = cross_entropy_float64(confident, torch.tensor([3]))
    assert 1e-13 < tiny.item() < 1e-11  # 9 e^-30 ≈ 8.4e-13; float32 log_softmax returns exactly 0
    assert F.cross_entropy(confident[0].float(), torch.tensor([3])).item() == 0.0


def test_warmup_starts_at_zero_learning_rate():
    # LambdaLR(min(step / 10, 1)) gives lr 0 on the first step, as in the paper's code.
    start = GrokkingTransformer(SMALL, seeds=(0,))
    run = train(SMALL, seeds=(0,), n_epochs=1, progress=False)
    assert all(torch.equal(run.model.params[k], start.params[k]) for k in start.params)
    run2 = train(SMALL, seeds=(0,), n_epochs=2, progress=False)
    assert not torch.equal(run2.model.W_E, start.W_E)


def test_vectorised_seeds_train_exactly_like_separate_runs():
    together = train(SMALL, seeds=(0, 1, 2), n_epochs=12, progress=False)
    for i, seed in enumerate((0, 1, 2)):
        alone = train(SMALL, seeds=(seed,), n_epochs=12, progress=False)
        for name, value in alone.model.params.items():
            assert torch.allclose(together.model.params[name][i], value[0], atol=1e-6, rtol=1e-5), (seed, name)
        assert np.allclose(together.train_loss[:, i], alone.train_loss[:, 0], rtol=1e-6)
    assert together.data[1].train_indices.tolist() != together.data[0].train_indices.tolist()


def test_training_memorises_and_snapshots_line_up():
    config = SMALL.replace(n_epochs=150, checkpoint_every=50)
    run = train(config, seeds=(0,), progress=False)
    assert run.train_loss[-1, 0] < 0.3 * run.train_loss[0, 0]
    assert run.snapshots["W_E"].shape == (4, 1, config.d_vocab, config.d_model)
    assert list(run.checkpoint_epochs) == [0, 50, 100, 150]
    assert torch.equal(run.snapshots["W_U"][-1], run.model.W_U)
    history = fourier.progress_measures(run, [[1, 2]], progress=False)
    # train_loss[e] is measured before step e, i.e. on the parameters after e steps = snapshot e.
    assert np.allclose(history["train_loss"][:3, 0], run.train_loss[[0, 50, 100], 0], rtol=1e-6)
    assert history["test_loss"][-1, 0] > history["train_loss"][-1, 0]
    for name in ("restricted_loss", "excluded_loss", "gini_W_E", "gini_W_L", "sum_squared_weights"):
        assert history[name].shape == (4, 1) and np.isfinite(history[name]).all(), name
    initial_norm = sum(v[0, 0].double().pow(2).sum().item() for v in run.snapshots.values())
    assert history["sum_squared_weights"][0, 0] == pytest.approx(initial_norm, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# Progress measures against a naive recomputation
# --------------------------------------------------------------------------------------------------


def naive_gini(values: torch.Tensor) -> float:
    """Gini coefficient from its definition: mean absolute difference over all pairs / (2 · mean)."""
    x = values.double().flatten()
    return float((x[:, None] - x[None, :]).abs().mean() / (2 * x.mean()))


def naive_component_norms(weights: torch.Tensor, p: int) -> torch.Tensor:
    """Norm of each Fourier component (const, cos k, sin k, …) of ``weights`` ``[p, d]`` along its p axis,
    with the unit basis vectors written out (const/√p, √(2/p)·cos, √(2/p)·sin)."""
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.full((p,), 1 / math.sqrt(p), dtype=torch.float64)]
    for k in range(1, p // 2 + 1):
        rows += [math.sqrt(2 / p) * torch.cos(2 * math.pi * k * x / p), math.sqrt(2 / p) * torch.sin(2 * math.pi * k * x / p)]
    return (torch.stack(rows) @ weights.double()).norm(dim=-1)


def naive_progress_row(params: dict[str, torch.Tensor], data, key_frequencies) -> dict[str, float]:
    """One snapshot's progress measures, from the plain transformer (:func:`reference_logits`) and a least-
    squares fit of the number logits on cos/sin(w_k(a + b)) over the inputs (the span the paper keeps)."""
    p = data.p
    logits = reference_logits({k: v[None] for k, v in params.items()}, data.tokens, 0)   # [p², vocab_out] float64
    labels = data.labels
    train = data.is_train

    def ce(values, rows):
        return float(F.cross_entropy(values[rows], labels[rows]))

    def acc(values, rows):
        return float((values[rows].argmax(-1) == labels[rows]).double().mean())

    row = {"train_loss": ce(logits, train), "test_loss": ce(logits, ~train),
           "train_accuracy": acc(logits, train), "test_accuracy": acc(logits, ~train)}
    numbers = logits[:, :p]
    a, b = data.tokens[:, 0].double(), data.tokens[:, 1].double()
    design = torch.stack([f(2 * math.pi * k * (a + b) / p) for k in key_frequencies for f in (torch.cos, torch.sin)], 1)
    fitted = design @ torch.linalg.lstsq(design, numbers).solution                    # the key-frequency part
    restricted = fitted + (numbers - fitted).mean(0, keepdim=True)                     # + the paper's bias correction
    everything = torch.ones_like(train)
    row["restricted_loss"] = ce(restricted, everything)
    row["excluded_loss"] = ce(numbers - fitted, train)
    row["gini_W_E"] = naive_gini(naive_component_norms(params["W_E"][:p], p))
    row["gini_W_L"] = naive_gini(naive_component_norms((params["W_out"] @ params["W_U"])[:, :p].T, p))
    row["sum_squared_weights"] = sum(float(v.double().pow(2).sum()) for v in params.values())
    return row


def test_progress_measures_match_a_naive_recomputation():
    """Every measure at every snapshot of two models with different splits and key frequencies."""
    config = SMALL.replace(n_epochs=60, checkpoint_every=30)
    run = train(config, seeds=(0, 1), progress=False)
    keys = [[1, 2], [4]]
    history = fourier.progress_measures(run, keys, chunk_models=3, progress=False)
    assert list(history["epoch"]) == [0, 30, 60]
    for c in range(3):
        for m in range(2):
            params = {name: value[c, m] for name, value in run.snapshots.items()}
            expected = naive_progress_row(params, run.data[m], keys[m])
            for name, value in expected.items():
                assert history[name][c, m] == pytest.approx(value, rel=2e-5, abs=1e-9), (c, m, name)
    # the measures depend on the key frequencies and the split, so a mix-up would show
    swapped = naive_progress_row({n: v[-1, 0] for n, v in run.snapshots.items()}, run.data[0], keys[1])
    assert abs(swapped["restricted_loss"] - history["restricted_loss"][-1, 0]) > 1e-3
    other_split = naive_progress_row({n: v[-1, 0] for n, v in run.snapshots.items()}, run.data[1], keys[0])
    assert abs(other_split["excluded_loss"] - history["excluded_loss"][-1, 0]) > 1e-3


def test_committed_history_final_row_matches_a_recomputation_from_the_committed_checkpoint():
    """The notebook (ci profile) asserts on helpers/data/grokking/history.npz; its last row is recomputed here
    from the committed final weights, naively and with progress_measures on a one-snapshot run."""
    from helpers.studies.grokking.training import DATA_DIR, TrainingRun

    model, metadata = load_checkpoint(DATA_DIR / "checkpoint.pt")
    history = load_history(DATA_DIR / "history.npz")
    assert int(history["epoch"][-1]) == metadata["epochs"] == model.config.n_epochs
    keys = list(metadata["key_frequencies"])
    data = make_dataset(model.config.p, model.config.frac_train, model.seeds[0])
    params = {name: value[0].detach() for name, value in model.params.items()}
    expected = naive_progress_row(params, data, keys)
    snapshot = TrainingRun(model.config, model, [data], np.zeros((0, 1)), np.array([model.config.n_epochs]),
                           {name: value[None].detach() for name, value in model.params.items()}, 0.0)
    recomputed = fourier.progress_measures(snapshot, [keys], progress=False)
    for name, value in expected.items():
        # float32 logits vs the float64 reference: tiny losses (1e-7) keep ~1e-4 relative precision
        assert recomputed[name][0, 0] == pytest.approx(value, rel=1e-3), name
        assert history[name][-1] == pytest.approx(value, rel=1e-3), name
    assert expected["test_accuracy"] == 1.0 and expected["excluded_loss"] > 1.0 > expected["restricted_loss"]


def test_progress_measures_refuse_a_model_without_key_frequencies():
    """No key frequency: an error, or NaN restricted/excluded losses on request — never a made-up frequency."""
    run = train(SMALL.replace(n_epochs=10, checkpoint_every=5), seeds=(0, 1), progress=False)
    with pytest.raises(ValueError, match=r"model\(s\) \[1\].*no key frequency"):
        fourier.progress_measures(run, [[1], []], progress=False)
    history = fourier.progress_measures(run, [[1], []], progress=False, without_key_frequencies="nan")
    for name in ("restricted_loss", "excluded_loss"):
        assert np.isfinite(history[name][:, 0]).all() and np.isnan(history[name][:, 1]).all(), name
    for name in ("train_loss", "test_loss", "gini_W_E", "gini_W_L", "sum_squared_weights"):
        assert np.isfinite(history[name]).all(), name
    with pytest.warns(RuntimeWarning, match="no key frequency found for seed"):
        result = fourier.measure_run(run, progress=False)
    assert result.key_frequencies == [[], []]
    assert np.isnan(result.history["restricted_loss"]).all() and np.isfinite(result.history["train_loss"]).all()
    with pytest.raises(ValueError, match="without_key_frequencies"):
        fourier.progress_measures(run, [[1], [2]], progress=False, without_key_frequencies="k=1")


def test_cos_terms_variance_explained_on_hand_built_logits():
    """logits(a, b, c) = 3 cos(w₃(a+b−c)) + 2 cos(w₅(a+b−c)) + sin(w₃(a+b−c)) + 7: the cos terms carry
    variance 9/2 and 4/2 of a total 14/2 (the sin term and the constant are not cos terms)."""
    p = 13
    a, b, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(p), indexing="ij")
    phase = 2 * math.pi * (a + b - c).double() / p
    logits = (3 * torch.cos(3 * phase) + 2 * torch.cos(5 * phase) + torch.sin(3 * phase) + 7).reshape(p * p, p)
    explained = lambda freqs: fourier.cos_terms_variance_explained(logits.float(), p, freqs)  # noqa: E731
    assert explained([3]) == pytest.approx(9 / 14, rel=1e-5)
    assert explained([5]) == pytest.approx(4 / 14, rel=1e-5)
    assert explained([3, 5]) == pytest.approx(13 / 14, rel=1e-5)
    assert explained([4]) == pytest.approx(0.0, abs=1e-6)
    # random logits: the fraction is the R² of a least-squares fit on the chosen cos directions
    noisy = logits + torch.randn(p * p, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    design = torch.stack([torch.cos(k * phase).flatten() for k in (2, 3, 6)], 1)
    centred = noisy.flatten() - noisy.mean()
    fit = design @ torch.linalg.lstsq(design, centred[:, None]).solution[:, 0]
    assert fourier.cos_terms_variance_explained(noisy, p, [2, 3, 6]) == pytest.approx(
        float(fit.pow(2).sum() / centred.pow(2).sum()), rel=1e-6)


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="distinct seeds"):
        train(SMALL, seeds=(1, 1), n_epochs=1, progress=False)
    with pytest.raises(ValueError, match="n_epochs"):
        train(SMALL, seeds=(0,), n_epochs=-1, progress=False)


def test_checkpoint_and_history_round_trip(tmp_path):
    model = GrokkingTransformer(SMALL, seeds=(5,))
    path = save_checkpoint(tmp_path / "c.pt", model, {"key_frequencies": [1, 4]})
    loaded, metadata = load_checkpoint(path)
    assert loaded.config == SMALL and loaded.seeds == (5,) and metadata["key_frequencies"] == [1, 4]
    assert all(torch.equal(loaded.params[k], model.params[k]) for k in model.params)
    history = {"epoch": np.arange(3), "test_loss": np.array([1.0, 0.5, 0.1])}
    back = load_history(save_history(tmp_path / "h.npz", history))
    assert np.array_equal(back["test_loss"], history["test_loss"])
    with pytest.raises(FileNotFoundError, match="train_grokking_checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_step_flops_counts_last_position_savings():
    config = GrokkingConfig()
    ours, full = step_flops(config, 3830), step_flops(config, 3830, last_position_only=False)
    # Per example: scores and values of one query over 3 keys, W_O, W_in, W_out, W_U; once per step:
    # the k/v tables (3 × 114 rows) and the q table (114 rows). 6 FLOPs per MAC with the backward.
    per_example = 2 * 3 * 128 + 128 * 128 + 2 * 128 * 512 + 128 * 114
    tables = 3 * 114 * 128 * 256 + 114 * 128 * 128
    assert ours == 6 * (3830 * per_example + tables)
    assert full > 3 * ours


# --------------------------------------------------------------------------------------------------
# Fourier analysis
# --------------------------------------------------------------------------------------------------


def test_fourier_basis_is_orthonormal_with_named_rows():
    basis, names = fourier.fourier_basis(13)
    assert torch.allclose(basis @ basis.T, torch.eye(13), atol=1e-6)
    assert names[:3] == ["const", "cos 1", "sin 1"] and names[-1] == "sin 6"
    with pytest.raises(ValueError, match="odd"):
        fourier.fourier_basis(12)


def test_component_norms_and_gini_find_a_sparse_embedding():
    p = 13
    x = torch.arange(p, dtype=torch.float32)
    embedding = torch.stack([torch.cos(2 * math.pi * 4 * x / p), torch.sin(2 * math.pi * 4 * x / p)], dim=1)
    basis, _ = fourier.fourier_basis(p)
    norms = fourier.fourier_component_norms(embedding, basis)
    freq = fourier.frequency_norms(norms)
    assert int(freq.argmax()) + 1 == 4 and freq[3] > 100 * freq[torch.arange(6) != 3].max()
    assert fourier.gini(torch.ones(10)).item() == pytest.approx(0.0, abs=1e-12)
    assert fourier.gini(torch.tensor([0.0] * 9 + [1.0])).item() == pytest.approx(0.9)
    assert fourier.gini(norms).item() > fourier.gini(fourier.fourier_component_norms(torch.randn(p, 2), basis)).item()


def test_neuron_clustering_finds_the_planted_frequencies():
    p = 23
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten().float(), b.flatten().float()
    neurons = []
    for k, count in ((3, 12), (7, 8)):
        for phase in torch.linspace(0, 2 * math.pi, count + 1)[:-1]:
            w = 2 * math.pi * k / p
            neurons.append(F.relu(torch.cos(w * a + phase) + torch.cos(w * b + phase)))
    neurons.append(torch.randn(p * p))  # a noise neuron
    activations = torch.stack(neurons, dim=1)
    clusters = fourier.cluster_neurons(activations, p, threshold=0.85)
    assert list(clusters.frequency[:12]) == [3] * 12 and list(clusters.frequency[12:20]) == [7] * 8
    assert clusters.explained[:20].all() and not clusters.explained[20]
    assert fourier.find_key_frequencies(clusters, min_share=0.2) == [3, 7]
    assert fourier.find_key_frequencies(clusters, min_share=0.4) == [3]
    assert clusters.counts([3, 7]) == {3: 12, 7: 8, "unexplained": 1}


def test_restricted_and_excluded_logits_split_the_key_terms():
    p = 17
    a = torch.arange(p, dtype=torch.float64)
    total = (a[:, None, None] + a[None, :, None] - a[None, None, :]).reshape(p * p, p)
    key = 5 * torch.cos(2 * math.pi * 3 * total / p)
    other = torch.cos(2 * math.pi * 6 * total / p)
    logits = key + other + 2.0  # the constant is restored by the bias correction
    directions = fourier.sum_directions(p, [3])
    assert torch.allclose(directions @ directions.T, torch.eye(2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(fourier.restricted_logits(logits, directions), key + 2.0, atol=1e-9)
    assert torch.allclose(fourier.excluded_logits(logits, directions), other + 2.0, atol=1e-9)
    coefficients = fourier.cos_difference_coefficients(logits, p)
    assert coefficients[2].item() == pytest.approx(5 * total.numel() ** 0.5 / math.sqrt(2), rel=1e-6)
    assert coefficients[5].item() == pytest.approx(total.numel() ** 0.5 / math.sqrt(2), rel=1e-6)
    assert coefficients[0].abs().item() < 1e-8
    with pytest.raises(ValueError, match="frequency 9"):
        fourier.sum_directions(p, [9])


def test_locate_phases_on_synthetic_curves():
    epochs = np.arange(0, 20_001, 100)
    train_loss = np.maximum(4.0 * np.exp(-epochs / 50.0), 1e-7)   # log10: 0.6 -> -7
    test_loss = np.where(epochs < 8000, 10.0, 10.0 * np.exp(-(epochs - 8000) / 500.0))
    test_loss = np.maximum(test_loss, 1e-7)
    accuracy = np.where(epochs >= 9000, 1.0, 0.1)
    phases = fourier.locate_phases(epochs, train_loss, test_loss, accuracy)
    # Train loss: 90% of its log drop (to 10^-6.24) at 50·ln(4 / 10^-6.24) ≈ 788 -> checkpoint 800.
    assert phases.memorisation_end == 800
    # log10 test loss falls from 1 to -7; 10% of the way (0.8 decades) is reached at
    # 8000 + 500·0.8·ln 10 ≈ 8921, 90% (7.2 decades) at 8000 + 500·7.2·ln 10 ≈ 16289.
    assert (phases.cleanup_start, phases.cleanup_end) == (9000, 16300)
    assert phases.grokking_epoch == 9000
    with pytest.raises(ValueError, match="did not grok"):
        fourier.locate_phases(epochs, train_loss, np.full(len(epochs), 5.0))


def test_ablation_summary_rows():
    model = GrokkingTransformer(SMALL, seeds=(0,))
    data = make_dataset(SMALL.p)
    rows = fourier.ablation_summary(model, data, [1, 2])
    assert [r["inputs"] for r in rows] == ["all"] * 3 + ["test"] * 3 + ["all"] * 2
    assert "§4.4" in rows[6]["intervention"] and "only" in rows[6]["intervention"] and "removed" in rows[7]["intervention"]
    with torch.no_grad():
        full = float(cross_entropy_float64(model(data.tokens)[0, :, : SMALL.p], data.labels))
    assert rows[0]["loss"] == pytest.approx(full)
    # Keeping every frequency leaves the embedding (and the loss) unchanged; removing all of them changes it.
    everything = fourier.ablate_embedding_frequencies(model.params, SMALL.p, range(1, 7), keep_only=True)
    assert torch.allclose(everything["W_E"], model.W_E, atol=1e-5)
    nothing = fourier.ablate_embedding_frequencies(model.params, SMALL.p, range(1, 7))
    assert torch.allclose(nothing["W_E"][0, : SMALL.p], model.W_E[0, : SMALL.p].mean(0, keepdim=True).expand(SMALL.p, -1), atol=1e-5)


def test_compare_histories_limits_to_early_epochs():
    epochs = np.array([0, 100, 200])
    reference = {"epoch": epochs, "train_loss": np.array([4.0, 2.0, 0.1]), "test_loss": np.array([4.0, 4.5, 5.0]),
                 "train_accuracy": np.array([0.01, 0.5, 1.0]), "test_accuracy": np.array([0.01, 0.01, 0.02]),
                 "train_loss_every_epoch": np.linspace(4.0, 0.1, 201)}
    drifted = {k: v.copy() for k, v in reference.items()}
    drifted["train_loss"][2] *= 1.1           # late drift: rounding amplified by training
    drifted["train_loss_every_epoch"][150:] *= 1.1
    everything = fourier.compare_histories(drifted, reference)
    assert everything["train_loss"] == pytest.approx(0.1) and everything["train_loss_every_epoch"] == pytest.approx(0.1)
    early = fourier.compare_histories(drifted, reference, max_epoch=50)
    assert max(early.values()) == 0.0
    changed = {k: v.copy() for k, v in reference.items()}
    changed["train_loss_every_epoch"][1] *= 1.01  # a code change shows from the first steps
    assert fourier.compare_histories(changed, reference, max_epoch=50)["train_loss_every_epoch"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="max_epoch"):
        fourier.compare_histories(drifted, reference, max_epoch=-1)


# --------------------------------------------------------------------------------------------------
# §4.2 logit approximation, §4.4 neuron-level ablations, phase changes
# --------------------------------------------------------------------------------------------------


def _trained_small_model():
    run = train(SMALL.replace(n_epochs=40), seeds=(0,), progress=False)
    return run.model, run.data[0]


def naive_neuron_ablation(model, data, frequencies, mode):
    """Per neuron, a least-squares fit on [1, cos(w_k(a+b)), sin(w_k(a+b))] over all inputs; the new
    activations go through W_out and W_U on top of the untouched rest of the residual stream."""
    p = data.p
    a = data.tokens[:, 0].double()
    b = data.tokens[:, 1].double()
    columns = [torch.ones(p * p, dtype=torch.float64)]
    for k in frequencies:
        columns += [torch.cos(2 * math.pi * k * (a + b) / p), torch.sin(2 * math.pi * k * (a + b) / p)]
    design = torch.stack(columns, 1)
    _, cache = model.run_with_cache(data.tokens)
    acts = cache["mlp_post"][0].double()
    new = torch.empty_like(acts)
    for n in range(acts.shape[1]):
        coefficients = torch.linalg.lstsq(design, acts[:, n:n + 1]).solution
        fit_key = design[:, 1:] @ coefficients[1:, 0]
        new[:, n] = coefficients[0, 0] + fit_key if mode == "keep" else acts[:, n] - fit_key
    prm = {k: v[0].detach().double() for k, v in model.params.items()}
    resid = cache["resid_mid"][0].double() + new @ prm["W_out"] + prm["b_out"]
    return (resid @ prm["W_U"])[:, :p]


@pytest.mark.parametrize("mode", ["keep", "remove"])
def test_neuron_ablation_matches_a_per_neuron_least_squares_fit(mode):
    model, data = _trained_small_model()
    got = fourier.neuron_ablation_logits(model, data, [2, 5], mode=mode)
    expected = naive_neuron_ablation(model, data, [2, 5], mode)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    # it really ablates something: the logits differ from the model's
    with torch.no_grad():
        full = model(data.tokens)[0, :, : data.p].double()
    assert (got - full).abs().max() > 1e-2


def test_neuron_ablation_of_the_whole_stream_is_the_logit_level_ablation():
    """Ablating the skip path the same way gives the restricted / excluded logits (projection over
    inputs commutes with the linear maps after the neurons); leaving it alone does not."""
    model, data = _trained_small_model()
    with torch.no_grad():
        full = model(data.tokens)[0, :, : data.p]
    directions = fourier.sum_directions(data.p, [1, 4])
    keep = fourier.neuron_ablation_logits(model, data, [1, 4], mode="keep", ablate_skip_path=True)
    remove = fourier.neuron_ablation_logits(model, data, [1, 4], mode="remove", ablate_skip_path=True)
    assert torch.allclose(keep, fourier.restricted_logits(full, directions), atol=1e-4)
    assert torch.allclose(remove, fourier.excluded_logits(full, directions), atol=1e-4)
    skip_kept = fourier.neuron_ablation_logits(model, data, [1, 4], mode="keep")
    assert not torch.allclose(skip_kept, keep, atol=1e-3)
    # keeping the cos/sin(w(a+b)) terms of *every* frequency still drops the neurons' other (a, b)
    # dependence (cos(w a), cos(w(a-b)), ...), so it is not the identity
    every = fourier.neuron_ablation_logits(model, data, range(1, data.p // 2 + 1), mode="keep")
    assert not torch.allclose(every, full.double(), atol=1e-3)
    with pytest.raises(ValueError, match="mode"):
        fourier.neuron_ablation_logits(model, data, [1], mode="restricted")
    with pytest.raises(ValueError, match="empty"):
        fourier.neuron_ablation_logits(model, data, [], mode="keep")


def test_cos_terms_logits_recover_hand_built_terms():
    p = 13
    a, b, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(p), indexing="ij")
    phase = 2 * math.pi * (a + b - c).double() / p
    wanted = 3 * torch.cos(3 * phase) + 2 * torch.cos(5 * phase)
    logits = (wanted + torch.sin(3 * phase) + 0.5 * torch.cos(4 * phase) + 7).reshape(p * p, p)
    fit = fourier.cos_terms_logits(logits, p, [3, 5])
    assert torch.allclose(fit, wanted.reshape(p * p, p), atol=1e-9)
    # its explained variance is cos_terms_variance_explained
    centred = logits - logits.mean()
    assert float(fit.pow(2).sum() / centred.pow(2).sum()) == pytest.approx(
        fourier.cos_terms_variance_explained(logits, p, [3, 5]), rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        fourier.cos_terms_logits(logits[:10], p, [3])
    with pytest.raises(ValueError, match="frequency"):
        fourier.cos_terms_logits(logits, p, [7])


def test_phase_changes_on_a_hand_built_curve():
    epochs = np.arange(0, 1001, 10)
    values = np.where(epochs < 200, 1.0, np.where(epochs < 600, 1.0 + (epochs - 200) / 400, 2.0 + (epochs - 600) * 0.01))
    phases = fourier.Phases(memorisation_end=200, cleanup_start=600, cleanup_end=800, grokking_epoch=None)
    out = fourier.phase_changes(epochs, values, phases)
    assert out["epochs"] == [0, 200, 600, 800]
    assert out["at"] == pytest.approx([1.0, 1.0, 2.0, 4.0])
    assert out["change"] == pytest.approx({"memorisation": 0.0, "circuit formation": 1.0, "cleanup": 2.0})
    assert out["rate"] == pytest.approx({"memorisation": 0.0, "circuit formation": 2.5, "cleanup": 10.0})
    with pytest.raises(ValueError, match="boundaries"):
        fourier.phase_changes(epochs, values, fourier.Phases(600, 200, 800, None))
    with pytest.raises(ValueError, match="one value per checkpoint"):
        fourier.phase_changes(epochs, values[:-1], phases)


def test_loading_the_committed_result_rechecks_the_final_row(tmp_path):
    """load_committed_result (the notebook's ci path) recomputes the history's final row: a stored measure that
    the code would not produce is refused, naming it."""
    import shutil

    from helpers.studies.grokking.training import DATA_DIR

    fourier.load_committed_result()  # the committed files are consistent
    for name in ("checkpoint.pt", "history.npz"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    history = dict(np.load(tmp_path / "history.npz"))
    history["gini_W_L"] = history["gini_W_L"].copy()
    history["gini_W_L"][-1] *= 1.01
    np.savez(tmp_path / "history.npz", **history)
    with pytest.raises(RuntimeError, match="gini_W_L"):
        fourier.load_committed_result(tmp_path)


def test_seed_summary_locates_each_seeds_phases_and_reports_a_seed_that_did_not_grok():
    from helpers.studies.grokking.training import DATA_DIR

    committed = load_history(DATA_DIR / "history.npz")  # seed 0's real 15k-epoch curves
    epochs = committed["epoch"]
    flat = np.full(len(epochs), 4.0)  # a second "seed" whose test loss never collapses
    history = {"epoch": epochs,
               "train_loss": np.stack([committed["train_loss"], committed["train_loss"]], 1),
               "test_loss": np.stack([committed["test_loss"], flat], 1),
               "test_accuracy": np.stack([committed["test_accuracy"], np.full(len(epochs), 0.01)], 1)}
    rows = fourier.seed_summary(history, seeds=(0, 7), key_frequencies=[[14, 35], []])
    expected = fourier.locate_phases(epochs, committed["train_loss"], committed["test_loss"],
                                     committed["test_accuracy"]).as_dict()
    assert rows[0] == {"seed": 0, "key_frequencies": [14, 35], "grokked": True, **expected,
                       "final_test_accuracy": float(committed["test_accuracy"][-1]),
                       "final_test_loss": float(committed["test_loss"][-1])}
    assert 0 < rows[0]["memorisation_end"] < rows[0]["cleanup_start"] < rows[0]["cleanup_end"]
    assert rows[1]["grokked"] is False and rows[1]["cleanup_start"] is None and rows[1]["final_test_loss"] == 4.0
    with pytest.raises(ValueError, match=r"history\['train_loss'\] has shape"):
        fourier.seed_summary({**history, "train_loss": committed["train_loss"]}, (0, 7), [[1], [2]])
