"""Scalar metrics on next-token logits, as used by patching, ablation and attribution.

Every function reads the logits of each prompt's **last real token** (the position whose
next-token prediction the studies look at). Logits come either as the model's full output
``[batch, pos, d_vocab]`` together with where each prompt ends (a :class:`~helpers.prompts.TokenBatch`
or a ``[batch]`` tensor of positions; with neither, position ``-1``, which is right for
left-padded batches), or already as ``[batch, d_vocab]`` last-token logits.

All metrics are differentiable torch functions (attribution patching back-propagates through
them). ``reduce="mean"`` (default) averages over prompts and returns a 0-d tensor,
``reduce="sum"`` sums, ``reduce="none"`` returns one value per prompt.

A *metric* in the sense of :mod:`helpers.patching` is any callable ``metric(logits) -> 0-d
tensor``; :func:`make_logit_diff_metric` builds the usual one (optionally normalised so that
0 = corrupted baseline and 1 = clean baseline).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from jaxtyping import Float, Int

Reduce = Literal["mean", "sum", "none"]
Positions = Any  # TokenBatch | Int[torch.Tensor, "batch"] | int | None

__all__ = [
    "last_token_logits",
    "logit_diff",
    "normalised",
    "answer_prob",
    "answer_logprob",
    "kl_divergence",
    "entropy",
    "make_logit_diff_metric",
    "Metric",
]

Metric = Callable[[torch.Tensor], torch.Tensor]
"""A patching metric: ``metric(logits [batch, pos, d_vocab]) -> 0-d tensor`` (differentiable)."""


# --------------------------------------------------------------------------------------------------
# Reading the last real token
# --------------------------------------------------------------------------------------------------


def _positions_tensor(positions: Positions, batch_size: int, n_pos: int, device: torch.device) -> torch.Tensor:
    """Turn ``batch=``/``positions=`` into a ``[batch]`` long tensor of valid positions."""
    if positions is None:
        return torch.full((batch_size,), n_pos - 1, dtype=torch.long, device=device)
    if hasattr(positions, "last_positions") and hasattr(positions, "tokens"):  # a TokenBatch
        if positions.tokens.shape[0] != batch_size:
            raise ValueError(
                f"The TokenBatch has {positions.tokens.shape[0]} prompts but the logits have batch size "
                f"{batch_size}. Pass the batch the logits were computed on."
            )
        if positions.tokens.shape[1] != n_pos:
            raise ValueError(
                f"The TokenBatch has {positions.tokens.shape[1]} positions but the logits have {n_pos}. "
                "Pass the batch the logits were computed on."
            )
        positions = positions.last_positions
    if isinstance(positions, int):
        positions = torch.full((batch_size,), positions, dtype=torch.long)
    positions = torch.as_tensor(positions, device=device).long()
    if positions.ndim == 0:
        positions = positions.expand(batch_size)
    if positions.shape != (batch_size,):
        raise ValueError(
            f"positions must be an int or a [batch] tensor ([{batch_size}]), got shape {tuple(positions.shape)}."
        )
    positions = torch.where(positions < 0, positions + n_pos, positions)
    if bool((positions < 0).any()) or bool((positions >= n_pos).any()):
        raise IndexError(
            f"positions {positions.tolist()} are out of range for logits with {n_pos} positions."
        )
    return positions


def last_token_logits(
    logits: Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch d_vocab"],
    batch: Positions = None,
) -> Float[torch.Tensor, "batch d_vocab"]:
    """The logits at each prompt's last real token.

    Args:
        logits: model output ``[batch, pos, d_vocab]``, or ``[batch, d_vocab]`` (returned as is).
        batch: a :class:`~helpers.prompts.TokenBatch` (its ``last_positions`` are used), a ``[batch]``
            tensor / int of positions, or ``None`` for position ``-1`` (correct for left padding).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
    if logits.ndim == 2:
        return logits
    if logits.ndim != 3:
        raise ValueError(
            f"logits must be [batch, pos, d_vocab] or [batch, d_vocab], got shape {tuple(logits.shape)}."
        )
    positions = _positions_tensor(batch, logits.shape[0], logits.shape[1], logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), positions]


def _reduce(values: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    if reduce == "mean":
        return values.mean()
    if reduce == "sum":
        return values.sum()
    if reduce == "none":
        return values
    raise ValueError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}.")


def _check_answer_tokens(answer_tokens: Any, batch_size: int, d_vocab: int, device: torch.device) -> torch.Tensor:
    """Validate ``answer_tokens`` and return it as ``[batch, n_pairs, 2]`` long on ``device``."""
    if isinstance(answer_tokens, (list, tuple)):
        try:
            answer_tokens = torch.tensor(answer_tokens)
        except (TypeError, ValueError) as err:
            raise ValueError(
                "answer_tokens must be token ids of single tokens, shaped [batch, 2] (correct, wrong) or "
                f"[batch, n_pairs, 2]; could not make a tensor of it ({err}). If you have strings, convert "
                "them with helpers.prompts.single_token_id, which fails clearly on multi-token answers."
            ) from None
    if not isinstance(answer_tokens, torch.Tensor):
        raise TypeError(f"answer_tokens must be a tensor of token ids, got {type(answer_tokens).__name__}.")
    if answer_tokens.is_floating_point() or answer_tokens.is_complex():
        raise TypeError(f"answer_tokens must hold integer token ids, got dtype {answer_tokens.dtype}.")
    if answer_tokens.ndim == 2:
        answer_tokens = answer_tokens[:, None, :]
    if answer_tokens.ndim != 3 or answer_tokens.shape[-1] != 2:
        raise ValueError(
            f"answer_tokens must be [batch, 2] (correct, wrong) or [batch, n_pairs, 2] with ONE token id per "
            f"answer, got shape {tuple(answer_tokens.shape)}. Multi-token answers are not supported: pick "
            "single-token answers (helpers.prompts.single_token_id checks this)."
        )
    if answer_tokens.shape[0] != batch_size:
        raise ValueError(
            f"answer_tokens has {answer_tokens.shape[0]} rows but the logits have batch size {batch_size}: "
            "give one (correct, wrong) pair per prompt."
        )
    if bool((answer_tokens < 0).any()) or bool((answer_tokens >= d_vocab).any()):
        raise ValueError(f"answer_tokens contains ids outside the vocabulary [0, {d_vocab}).")
    return answer_tokens.to(device).long()


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def logit_diff(
    logits: Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch d_vocab"],
    answer_tokens: Int[torch.Tensor, "batch 2"] | Int[torch.Tensor, "batch n_pairs 2"],
    *,
    batch: Positions = None,
    positions: Positions = None,
    reduce: Reduce = "mean",
) -> torch.Tensor:
    """Logit of the correct answer minus logit of the wrong answer, at each prompt's last token.

    Args:
        logits: ``[batch, pos, d_vocab]`` (or ``[batch, d_vocab]`` last-token logits).
        answer_tokens: ``[batch, 2]`` with columns (correct, wrong), or ``[batch, n_pairs, 2]``; with
            several pairs per prompt the prompt's value is the mean over its pairs.
        batch: the :class:`~helpers.prompts.TokenBatch` the logits come from (for its last positions).
        positions: alternatively, ``[batch]`` positions to read (``batch`` and ``positions`` are exclusive).
        reduce: ``"mean"`` / ``"sum"`` over prompts, or ``"none"`` for ``[batch]`` values.
    """
    if batch is not None and positions is not None:
        raise ValueError("Pass either batch= or positions= to logit_diff, not both.")
    last = last_token_logits(logits, batch if batch is not None else positions)
    answers = _check_answer_tokens(answer_tokens, last.shape[0], last.shape[-1], last.device)
    picked = torch.gather(last, 1, answers.flatten(1)).view(answers.shape)  # [batch, n_pairs, 2]
    per_prompt = (picked[..., 0] - picked[..., 1]).mean(-1)
    return _reduce(per_prompt, reduce)


def normalised(
    value: torch.Tensor | float,
    clean: torch.Tensor | float,
    corrupted: torch.Tensor | float,
) -> torch.Tensor | float:
    """Rescale a metric so that the corrupted baseline is 0 and the clean baseline is 1.

    ``(value - corrupted) / (clean - corrupted)``. Works elementwise on tensors (e.g. a whole
    patching sweep). Raises if the two baselines coincide (nothing to normalise by).
    """
    clean_f = float(clean) if not isinstance(clean, torch.Tensor) or clean.numel() == 1 else None
    corrupted_f = float(corrupted) if not isinstance(corrupted, torch.Tensor) or corrupted.numel() == 1 else None
    if clean_f is not None and corrupted_f is not None and abs(clean_f - corrupted_f) < 1e-12:
        raise ValueError(
            f"normalised: the clean ({clean_f:.6g}) and corrupted ({corrupted_f:.6g}) baselines are equal, so "
            "there is no difference to normalise by. Check that the corruption changes the metric."
        )
    return (value - corrupted) / (clean - corrupted)


def answer_logprob(
    logits: Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch d_vocab"],
    answer_tokens: Int[torch.Tensor, "batch"] | Int[torch.Tensor, "batch 2"] | Int[torch.Tensor, "batch n 2"],
    *,
    batch: Positions = None,
    reduce: Reduce = "mean",
) -> torch.Tensor:
    """Log-probability of the correct answer at each prompt's last token.

    ``answer_tokens`` is ``[batch]`` (the answers), or ``[batch, 2]`` / ``[batch, n_pairs, 2]`` as for
    :func:`logit_diff` (the correct column is used; with several pairs, their mean log-prob).
    """
    last = last_token_logits(logits, batch)
    if isinstance(answer_tokens, torch.Tensor) and answer_tokens.ndim == 1:
        answer_tokens = torch.stack([answer_tokens, answer_tokens], dim=-1)
    answers = _check_answer_tokens(answer_tokens, last.shape[0], last.shape[-1], last.device)
    logprobs = last.log_softmax(-1)
    correct = answers[..., 0]  # [batch, n_pairs]
    per_prompt = torch.gather(logprobs, 1, correct).mean(-1)
    return _reduce(per_prompt, reduce)


def answer_prob(
    logits: Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch d_vocab"],
    answer_tokens: Int[torch.Tensor, "batch"] | Int[torch.Tensor, "batch 2"] | Int[torch.Tensor, "batch n 2"],
    *,
    batch: Positions = None,
    reduce: Reduce = "mean",
) -> torch.Tensor:
    """Probability of the correct answer at each prompt's last token (see :func:`answer_logprob`).

    With several pairs per prompt, the prompt's value is the mean of their probabilities.
    """
    last = last_token_logits(logits, batch)
    if isinstance(answer_tokens, torch.Tensor) and answer_tokens.ndim == 1:
        answer_tokens = torch.stack([answer_tokens, answer_tokens], dim=-1)
    answers = _check_answer_tokens(answer_tokens, last.shape[0], last.shape[-1], last.device)
    probs = last.softmax(-1)
    per_prompt = torch.gather(probs, 1, answers[..., 0]).mean(-1)
    return _reduce(per_prompt, reduce)


def kl_divergence(
    logits: Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch d_vocab"],
    reference_logits: Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch d_vocab"],
    *,
    batch: Positions = None,
    reduce: Reduce = "mean",
) -> torch.Tensor:
    """KL(reference ‖ model) of the next-token distributions at each prompt's last token.

    ``sum_v p_ref(v) (log p_ref(v) - log p(v))`` in nats, where ``p_ref`` comes from
    ``reference_logits`` (e.g. the clean run) and ``p`` from ``logits`` (e.g. a patched or ablated
    run). Zero when the two agree. ``reference_logits`` is treated as a constant (detached).
    """
    last = last_token_logits(logits, batch)
    reference = last_token_logits(reference_logits, batch).detach()
    if reference.shape != last.shape:
        raise ValueError(
            f"kl_divergence: logits give last-token shape {tuple(last.shape)} but reference_logits give "
            f"{tuple(reference.shape)}; they must come from the same prompts."
        )
    ref_logprobs = reference.log_softmax(-1)
    per_prompt = (ref_logprobs.exp() * (ref_logprobs - last.log_softmax(-1))).sum(-1)
    return _reduce(per_prompt, reduce)


def entropy(
    logits: Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch d_vocab"],
    *,
    batch: Positions = None,
    reduce: Reduce = "mean",
) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each prompt's last token."""
    logprobs = last_token_logits(logits, batch).log_softmax(-1)
    per_prompt = -(logprobs.exp() * logprobs).sum(-1)
    return _reduce(per_prompt, reduce)


# --------------------------------------------------------------------------------------------------
# Metric factories
# --------------------------------------------------------------------------------------------------


def make_logit_diff_metric(
    answer_tokens: Int[torch.Tensor, "batch 2"] | Int[torch.Tensor, "batch n_pairs 2"],
    batch: Positions = None,
    clean_value: float | torch.Tensor | None = None,
    corrupted_value: float | torch.Tensor | None = None,
) -> Metric:
    """A patching metric ``metric(logits) -> 0-d tensor``: the mean logit difference.

    With both ``clean_value`` and ``corrupted_value`` given (the mean logit differences of the clean
    and corrupted runs), it is normalised: 0 = corrupted baseline, 1 = clean baseline. Otherwise it
    returns the raw mean logit difference.

    Args:
        answer_tokens: ``[batch, 2]`` (correct, wrong) or ``[batch, n_pairs, 2]``.
        batch: the TokenBatch the logits will come from (or ``[batch]`` last positions; ``None`` = -1).
    """
    if (clean_value is None) != (corrupted_value is None):
        raise ValueError("make_logit_diff_metric: give both clean_value and corrupted_value (or neither).")
    if clean_value is not None:
        clean_f, corrupted_f = float(clean_value), float(corrupted_value)
        if abs(clean_f - corrupted_f) < 1e-12:
            raise ValueError(
                f"make_logit_diff_metric: clean_value == corrupted_value ({clean_f:.6g}); a normalised metric "
                "needs baselines that differ."
            )

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return (logit_diff(logits, answer_tokens, batch=batch) - corrupted_f) / (clean_f - corrupted_f)

        metric.__doc__ = f"Normalised logit difference (0 = corrupted {corrupted_f:.4g}, 1 = clean {clean_f:.4g})."
    else:

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logit_diff(logits, answer_tokens, batch=batch)

        metric.__doc__ = "Mean logit difference (correct − wrong) at each prompt's last token."
    return metric
