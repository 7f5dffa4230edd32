"""helpers.batching: one memory budget, scaled by the vocabulary, sets every default chunk size."""

from types import SimpleNamespace

import pytest
import torch

from helpers import batching
from helpers.ablation import Head, ablation_values
from helpers.metrics import make_logit_diff_metric
from helpers.patching import patch_residual
from helpers.prompts import TokenBatch


def _model(d_vocab, d_model=576, d_mlp=1536, d_vocab_out=-1):
    return SimpleNamespace(cfg=SimpleNamespace(d_vocab=d_vocab, d_vocab_out=d_vocab_out, d_model=d_model, d_mlp=d_mlp))


def test_a_larger_vocabulary_gets_proportionally_fewer_tokens():
    smol, gemma = _model(49_152), _model(262_144, d_model=640, d_mlp=2048)
    assert batching.bytes_per_token(smol) == 4 * (49_152 + 4 * 1536 + 8 * 576)
    assert batching.max_batch_tokens(smol) == batching.FORWARD_BUDGET_BYTES // batching.bytes_per_token(smol)
    assert batching.max_batch_tokens(gemma) < batching.max_batch_tokens(smol) / 4  # 262k vs 49k vocabulary
    assert batching.rows_per_forward(gemma, n_pos=100) == batching.max_batch_tokens(gemma) // 100
    assert batching.vocab_size(_model(10, d_vocab_out=7)) == 7


def test_the_budget_is_honoured_and_never_below_one_row():
    model = _model(1000, d_model=10, d_mlp=40)
    per_token = 4 * (1000 + 160 + 80)
    assert batching.max_batch_tokens(model, budget_bytes=10 * per_token) == 10
    assert batching.rows_per_forward(model, n_pos=3, budget_bytes=10 * per_token) == 3
    assert batching.rows_per_forward(model, n_pos=50, budget_bytes=10 * per_token) == 1
    assert batching.logit_rows(model, n_pos=2, budget_bytes=4 * 1000 * 2 * 5) == 5


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_bad_budget_says_what_is_expected(bad):
    with pytest.raises(ValueError, match="budget_bytes must be a positive int"):
        batching.max_batch_tokens(_model(100), budget_bytes=bad)


def test_bad_n_pos_is_refused():
    with pytest.raises(ValueError, match="n_pos must be a positive"):
        batching.rows_per_forward(_model(100), n_pos=0)


def _pair(model, n=3, pos=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(5, model.cfg.d_vocab, (n, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(5, model.cfg.d_vocab, (n,), generator=g)
    answers = torch.randint(5, model.cfg.d_vocab, (n, 2), generator=g)
    return clean, corrupted, answers


def test_default_budget_and_one_copy_per_forward_give_the_same_sweep(tiny_model):
    clean, corrupted, answers = _pair(tiny_model)
    metric = make_logit_diff_metric(answers)
    default = patch_residual(tiny_model, clean, corrupted, metric, progress=False)
    one_at_a_time = patch_residual(tiny_model, clean, corrupted, metric, max_batch_tokens=1, progress=False)
    torch.testing.assert_close(default.values, one_at_a_time.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_patching_refuses_a_bad_max_batch_tokens(tiny_llama, bad):
    clean, corrupted, answers = _pair(tiny_llama)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        patch_residual(tiny_llama, clean, corrupted, make_logit_diff_metric(answers), max_batch_tokens=bad, progress=False)


def test_mean_ablation_values_do_not_depend_on_the_chunking(tiny_model):
    tokens = torch.randint(5, tiny_model.cfg.d_vocab, (5, 7), generator=torch.Generator().manual_seed(1))
    reference = TokenBatch(tokens=tokens, attention_mask=torch.ones_like(tokens))
    heads = [Head(0, 0), Head(1, 1)]
    default = ablation_values(tiny_model, heads, "mean", reference)
    chunked = ablation_values(tiny_model, heads, "mean", reference, batch_size=2)
    for a, b in zip(default, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ablation_values(tiny_model, heads, "mean", reference, batch_size=0)
