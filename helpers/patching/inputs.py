"""What the patching sweeps accept: the ``direction`` and ``logit_positions`` options, clean/corrupted
token batches (:func:`as_token_batch`), and the checks that turn a bad argument into a clear error
(hook names, layers, positions, matching clean/corrupted shapes)."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Literal, Sequence

import torch

from helpers.prompts import TokenBatch

Direction = Literal["denoise", "noise"]
LogitPositions = Literal["auto", "last", "all"]


def as_token_batch(model: Any, tokens: Any, *, name: str = "tokens") -> TokenBatch:
    """A :class:`TokenBatch` on the model's device from a TokenBatch or a ``[batch, pos]`` id tensor.

    A bare tensor gets an all-ones attention mask (no padding); padded prompts must come as a
    TokenBatch from :func:`helpers.prompts.tokenize`.
    """
    device = _model_device(model)
    if isinstance(tokens, TokenBatch):
        batch = tokens
    elif isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point():
            raise TypeError(f"{name} must hold token ids (integers), got dtype {tokens.dtype}.")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"{name} must be [batch, pos] token ids, got shape {tuple(tokens.shape)}.")
        batch = TokenBatch(tokens, torch.ones_like(tokens))
    else:
        raise TypeError(
            f"{name} must be a TokenBatch (helpers.prompts.tokenize) or a [batch, pos] tensor of token ids, "
            f"got {type(tokens).__name__}."
        )
    return batch.to(device)


def _check_pair(model: Any, clean: Any, corrupted: Any) -> tuple[TokenBatch, TokenBatch]:
    clean_b = as_token_batch(model, clean, name="clean")
    corrupted_b = as_token_batch(model, corrupted, name="corrupted")
    if clean_b.tokens.shape != corrupted_b.tokens.shape:
        raise ValueError(
            f"clean tokens have shape {tuple(clean_b.tokens.shape)} but corrupted tokens have shape "
            f"{tuple(corrupted_b.tokens.shape)}. Patching swaps activations position by position, so the two "
            "must have the same number of prompts and positions: build corrupted prompts with the same "
            "token length as their clean counterparts (or tokenize both lists in one call and split)."
        )
    if clean_b.padding_side != corrupted_b.padding_side:
        raise ValueError("clean and corrupted batches must be padded on the same side.")
    return clean_b, corrupted_b


def _check_hook_names(model: Any, names: Iterable[str]) -> None:
    available = model.hook_dict
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, list(available), n=5, cutoff=0.6)
            hint = f" Close matches: {close}." if close else ""
            raise KeyError(
                f"The model has no hook named {name!r}.{hint} See model.hook_dict for all hook names "
                "(TransformerLens-style aliases such as 'blocks.0.attn.hook_z' work)."
            )


def _check_positions(positions: Sequence[int] | None, n_pos: int) -> list[int]:
    if positions is None:
        return list(range(n_pos))
    if isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        p = int(p)
        if not -n_pos <= p < n_pos:
            raise IndexError(
                f"position {p} is out of range: the prompts have {n_pos} positions "
                f"(valid: 0..{n_pos - 1}, or -{n_pos}..-1 from the end)."
            )
        out.append(p % n_pos)
    if len(set(out)) != len(out):
        raise ValueError(f"positions {list(positions)} contains duplicates.")
    return out


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise IndexError(f"layer {layer} is out of range for a {n_layers}-layer model.")
        out.append(layer % n_layers)
    return out


def _check_direction(direction: str) -> None:
    if direction not in ("denoise", "noise"):
        raise ValueError(
            f"direction must be 'denoise' (run corrupted, patch in clean activations) or 'noise' (run clean, "
            f"patch in corrupted activations), got {direction!r}."
        )


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device(getattr(model.cfg, "device", "cpu") or "cpu")


def _n_kv_heads(model: Any) -> int:
    n = getattr(model.cfg, "n_key_value_heads", None)
    return int(n) if n else int(model.cfg.n_heads)


def _position_labels(model: Any, batch: TokenBatch) -> list[str]:
    """``"p:token"`` for each position, tokens of the first prompt (``<pad>`` where padded)."""
    labels = []
    row, mask = batch.tokens[0].tolist(), batch.attention_mask[0].tolist()
    for p, (tok, keep) in enumerate(zip(row, mask)):
        text = model.tokenizer.decode([tok]) if keep else "<pad>"
        labels.append(f"{p}:{text!r}"[:24])
    return labels
