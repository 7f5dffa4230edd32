"""How much one forward pass may hold: one memory budget, scaled by the model's sizes.

Every helper that runs prompts in chunks takes its default chunk size from here, so a model with a
larger vocabulary (Gemma-3's 262,144 tokens against SmolLM2's 49,152) gets smaller chunks instead of
a per-model constant. Pass an explicit size (``max_batch_tokens=``, ``batch_size=``) to override it,
or call these functions with another ``budget_bytes`` (more on a GPU, less on a small machine).

The estimate is deliberately simple: without gradients a forward pass holds, per token, its float32
logits (``d_vocab``) plus a few layers' worth of activations in flight (the MLP's hidden layer and
the residual-sized tensors around it). It is a budget for chunking, not a measurement; the
``benchmarks/`` scripts measure peak memory.

>>> max_batch_tokens(model)            # tokens (batch × positions) per forward pass
>>> rows_per_forward(model, n_pos=96)  # prompts of 96 tokens per forward pass
"""

from __future__ import annotations

from typing import Any

FORWARD_BUDGET_BYTES = 512 * 2**20
"""Default working-set budget of one forward pass (0.5 GiB): well inside a 24 GB machine or a T4."""

_FLOAT_BYTES = 4


def vocab_size(model: Any) -> int:
    """The width of the model's logits (``cfg.d_vocab_out`` when set, else ``cfg.d_vocab``)."""
    cfg = model.cfg
    out = int(getattr(cfg, "d_vocab_out", -1) or -1)
    return out if out > 0 else int(cfg.d_vocab)


def bytes_per_token(model: Any) -> int:
    """Estimated float32 bytes one token costs in a gradient-free forward pass: its logits plus the
    activations in flight (4 × ``d_mlp`` + 8 × ``d_model``)."""
    cfg = model.cfg
    d_mlp = int(getattr(cfg, "d_mlp", 0) or 4 * cfg.d_model)
    return _FLOAT_BYTES * (vocab_size(model) + 4 * d_mlp + 8 * int(cfg.d_model))


def _check_budget(budget_bytes: int) -> int:
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive int (bytes), got {budget_bytes!r}; "
                         f"the default is helpers.batching.FORWARD_BUDGET_BYTES = {FORWARD_BUDGET_BYTES}.")
    return budget_bytes


def max_batch_tokens(model: Any, budget_bytes: int = FORWARD_BUDGET_BYTES) -> int:
    """How many tokens (rows × positions) one forward pass may hold within ``budget_bytes`` (≥ 1)."""
    return max(1, _check_budget(budget_bytes) // bytes_per_token(model))


def rows_per_forward(model: Any, n_pos: int, budget_bytes: int = FORWARD_BUDGET_BYTES) -> int:
    """How many sequences of ``n_pos`` tokens one forward pass may hold within ``budget_bytes`` (≥ 1)."""
    if int(n_pos) <= 0:
        raise ValueError(f"n_pos must be a positive number of positions, got {n_pos!r}.")
    return max(1, max_batch_tokens(model, budget_bytes) // int(n_pos))


def logit_rows(model: Any, n_pos: int, budget_bytes: int = FORWARD_BUDGET_BYTES) -> int:
    """How many sequences' full ``[n_pos, d_vocab]`` float32 logits fit in ``budget_bytes`` (≥ 1):
    for code that keeps logits of every position (not just a metric of them)."""
    if int(n_pos) <= 0:
        raise ValueError(f"n_pos must be a positive number of positions, got {n_pos!r}.")
    return max(1, _check_budget(budget_bytes) // (int(n_pos) * vocab_size(model) * _FLOAT_BYTES))
