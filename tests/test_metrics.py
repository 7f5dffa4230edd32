"""Tests of helpers.metrics on hand-made logits (no model needed) and one padded tiny-model batch."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import metrics
from helpers.prompts import TokenBatch


def _logits(batch: int = 3, pos: int = 4, vocab: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, pos, vocab, generator=generator)


def test_logit_diff_reads_last_position_by_default():
    logits = _logits()
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])
    expected = torch.stack([logits[i, -1, a] - logits[i, -1, b] for i, (a, b) in enumerate(answers.tolist())])
    per_prompt = metrics.logit_diff(logits, answers, reduce="none")
    torch.testing.assert_close(per_prompt, expected)
    torch.testing.assert_close(metrics.logit_diff(logits, answers), expected.mean())
    torch.testing.assert_close(metrics.logit_diff(logits, answers, reduce="sum"), expected.sum())


def test_logit_diff_uses_last_real_token_of_right_padded_batch():
    logits = _logits()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    batch = TokenBatch(torch.zeros(3, 4, dtype=torch.long), mask, padding_side="right")
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])
    last = [1, 3, 0]
    expected = torch.stack([logits[i, last[i], a] - logits[i, last[i], b] for i, (a, b) in enumerate(answers.tolist())])
    torch.testing.assert_close(metrics.logit_diff(logits, answers, batch=batch, reduce="none"), expected)
    torch.testing.assert_close(
        metrics.logit_diff(logits, answers, positions=torch.tensor(last), reduce="none"), expected
    )


def test_logit_diff_with_several_pairs_is_mean_over_pairs():
    logits = _logits()
    answers = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 0], [1, 2]]])
    single = [metrics.logit_diff(logits, answers[:, k], reduce="none") for k in range(2)]
    torch.testing.assert_close(metrics.logit_diff(logits, answers, reduce="none"), (single[0] + single[1]) / 2)


def test_logit_diff_accepts_last_token_logits_and_is_differentiable():
    last = torch.randn(2, 7, requires_grad=True)
    value = metrics.logit_diff(last, torch.tensor([[0, 1], [2, 3]]))
    value.backward()
    assert last.grad is not None
    assert last.grad[0, 0] == pytest.approx(0.5) and last.grad[0, 1] == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "answers, message",
    [
        (torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]]), "ONE token id"),  # not (correct, wrong) pairs
        (torch.tensor([[[1, 2, 3], [4, 5, 6]]] * 3), "ONE token id"),  # multi-token answers
        (torch.tensor([[1, 2], [3, 4]]), "2 rows"),  # wrong batch size
        (torch.tensor([[1.0, 2.0]] * 3), "integer"),
        (torch.tensor([[1, 99]] * 3), "vocabulary"),
        ([["Mary", "John"]] * 3, "single_token_id"),
    ],
)
def test_logit_diff_rejects_bad_answer_tokens(answers, message):
    with pytest.raises((ValueError, TypeError), match=message):
        metrics.logit_diff(_logits(), answers)


def test_positions_out_of_range_fail_clearly():
    with pytest.raises(IndexError, match="out of range"):
        metrics.logit_diff(_logits(), torch.tensor([[1, 2]] * 3), positions=torch.tensor([0, 1, 9]))


def test_batch_of_wrong_size_fails_clearly():
    batch = TokenBatch(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="2 prompts"):
        metrics.logit_diff(_logits(), torch.tensor([[1, 2]] * 3), batch=batch)


def test_normalised_maps_baselines_to_zero_and_one():
    assert metrics.normalised(3.0, clean=3.0, corrupted=-1.0) == pytest.approx(1.0)
    assert metrics.normalised(-1.0, clean=3.0, corrupted=-1.0) == pytest.approx(0.0)
    sweep = torch.tensor([[1.0, -1.0], [3.0, 5.0]])
    torch.testing.assert_close(
        metrics.normalised(sweep, torch.tensor(3.0), torch.tensor(-1.0)), torch.tensor([[0.5, 0.0], [1.0, 1.5]])
    )
    with pytest.raises(ValueError, match="equal"):
        metrics.normalised(1.0, clean=2.0, corrupted=2.0)


def test_answer_prob_and_logprob():
    logits = _logits()
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])
    probs = logits[:, -1].softmax(-1)
    expected = torch.stack([probs[0, 1], probs[1, 3], probs[2, 5]])
    torch.testing.assert_close(metrics.answer_prob(logits, answers, reduce="none"), expected)
    torch.testing.assert_close(metrics.answer_prob(logits, answers[:, 0], reduce="none"), expected)
    torch.testing.assert_close(metrics.answer_logprob(logits, answers, reduce="none"), expected.log())


def test_kl_divergence_is_zero_for_same_logits_and_matches_formula():
    logits, other = _logits(seed=0), _logits(seed=1)
    assert metrics.kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    p = other[:, -1].softmax(-1)
    q = logits[:, -1].softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(metrics.kl_divergence(logits, other, reduce="none"), expected)
    assert bool((expected > 0).all())
    with pytest.raises(ValueError, match="same prompts"):
        metrics.kl_divergence(logits, _logits(batch=2))


def test_entropy_uniform_and_peaked():
    uniform = torch.zeros(2, 3, 16)
    torch.testing.assert_close(metrics.entropy(uniform, reduce="none"), torch.full((2,), math.log(16)))
    peaked = torch.full((1, 1, 16), -1e4)
    peaked[0, 0, 3] = 0.0
    assert metrics.entropy(peaked).item() == pytest.approx(0.0, abs=1e-5)


def test_make_logit_diff_metric_raw_and_normalised():
    logits = _logits()
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])
    raw = metrics.make_logit_diff_metric(answers)
    value = raw(logits)
    torch.testing.assert_close(value, metrics.logit_diff(logits, answers))
    norm = metrics.make_logit_diff_metric(answers, clean_value=value.item(), corrupted_value=value.item() - 2.0)
    assert norm(logits).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="both"):
        metrics.make_logit_diff_metric(answers, clean_value=1.0)
    with pytest.raises(ValueError, match="differ"):
        metrics.make_logit_diff_metric(answers, clean_value=1.0, corrupted_value=1.0)


def test_left_padded_tiny_model_logit_diff_matches_unpadded():
    """On a real (tiny) model: reading the padded batch's last token gives the unpadded prompt's value."""
    from helpers.models import load_model
    from helpers.prompts import tokenize

    model = load_model("tiny-llama", device="cpu")
    prompts = ["When Mary and John went to the store, John gave a drink to", "Hello there"]
    batch = tokenize(model, prompts)
    answers = torch.tensor([[11, 12], [13, 14]])
    with torch.no_grad():
        padded = metrics.logit_diff(model(batch.tokens, attention_mask=batch.attention_mask), answers, batch=batch,
                                    reduce="none")
        for i, prompt in enumerate(prompts):
            single = tokenize(model, prompt)
            alone = metrics.logit_diff(model(single.tokens, attention_mask=single.attention_mask), answers[i : i + 1],
                                       batch=single)
            assert padded[i].item() == pytest.approx(alone.item(), abs=1e-4)
