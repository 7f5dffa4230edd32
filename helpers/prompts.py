"""Turning text into model inputs the right way by default.

Pitfalls this module exists for (all seen with the embedded model):

* a padded token tensor gets **no attention mask** unless one is passed — left-padded IOI logit
  differences moved by up to 5 without it. :func:`tokenize` always returns the mask, and every
  ``helpers`` function takes ``attention_mask=`` next to ``tokens``;
* the pad token of the embedded model, ``<|im_end|>``, also occurs *inside* chat prompts, so a
  mask must never be rebuilt as ``tokens != pad_id``;
* ``generate`` samples unless told not to: :func:`generate_greedy` is greedy and decodes only the
  new tokens.

Padding is on the **left** by default, so position ``-1`` is every prompt's last real token (the
position whose next-token prediction the studies read off). The bridge derives position ids from
the mask, so left padding leaves the logits of real tokens unchanged (checked in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Int


@dataclass
class TokenBatch:
    """Token ids plus the attention mask that must travel with them.

    Attributes:
        tokens: ``[batch, pos]`` token ids, padded on ``padding_side``.
        attention_mask: ``[batch, pos]``, 1 for real tokens and 0 for padding.
        padding_side: ``"left"`` or ``"right"``.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    padding_side: Literal["left", "right"] = "left"

    @property
    def lengths(self) -> Int[torch.Tensor, "batch"]:
        """Number of real tokens per prompt."""
        return self.attention_mask.sum(-1)

    @property
    def last_positions(self) -> Int[torch.Tensor, "batch"]:
        """Index of each prompt's last real token."""
        if self.padding_side == "left":
            return torch.full_like(self.lengths, self.tokens.shape[1] - 1)
        return self.lengths - 1

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.attention_mask.to(device), self.padding_side)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: Any) -> "TokenBatch":
        return TokenBatch(self.tokens[index], self.attention_mask[index], self.padding_side)


def tokenize(
    model: Any,
    prompts: str | Sequence[str],
    *,
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> TokenBatch:
    """Tokenize one or several prompts for ``model``, with the attention mask.

    Args:
        model: a bridge from :func:`helpers.models.load_model`.
        prompts: a string or a list of strings (of any lengths).
        prepend_bos: prepend the BOS token. ``None`` follows the model's default
            (``model.cfg.default_prepend_bos``). Pass ``False`` for text that already went through a
            chat template (:func:`chat_prompt`), which starts with its own special token.
        padding_side: ``"left"`` (default: position -1 is every prompt's last token) or ``"right"``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
        raise ValueError("tokenize(prompts=...) expects a non-empty string or list of strings.")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    tokenizer = model.tokenizer
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if prepend_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"{type(tokenizer).__name__} has no BOS token; call tokenize(..., prepend_bos=False).")
        encoded = [[bos, *ids] for ids in encoded]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("tokenize got an empty prompt and prepend_bos=False: nothing to run the model on.")
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokens = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        tokens[row, span] = torch.tensor(ids, dtype=torch.long)
        mask[row, span] = 1
    device = getattr(model.cfg, "device", None) or "cpu"
    return TokenBatch(tokens.to(device), mask.to(device), padding_side)


def chat_prompt(model: Any, instruction: str, *, system: str | None = None) -> str:
    """``instruction`` as a user turn in the model's chat template, ready for the assistant's reply.

    Uses the tokenizer's own chat template (for the embedded model: the one in the GGUF). Tokenize
    the result with ``prepend_bos=False``.
    """
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model.cfg.model_name} has no chat template; use a chat/instruct model for chat prompts.")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": instruction}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def single_token_id(model: Any, text: str) -> int:
    """The id of ``text`` if it is exactly one token, else a clear error saying what it splits into."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"{text!r} is {len(ids)} tokens for this tokenizer ({pieces}), expected exactly one. "
            "Answer tokens must be single tokens: pick another word, or check the leading space."
        )
    return ids[0]


@torch.no_grad()
def generate_greedy(
    model: Any,
    batch: TokenBatch,
    *,
    max_new_tokens: int = 32,
    fwd_hooks: Sequence[tuple[Any, Any]] = (),
) -> list[str]:
    """Greedy continuations of a left-padded batch, decoded without the prompt.

    Args:
        model: the bridge.
        batch: from :func:`tokenize` with ``padding_side="left"``.
        max_new_tokens: tokens to generate per prompt.
        fwd_hooks: ``(hook_name, fn)`` pairs active during every forward pass of generation (e.g. a
            direction ablation).

    Generation stops early once every prompt has emitted the end-of-turn token.
    """
    if batch.padding_side != "left":
        raise ValueError("generate_greedy needs a left-padded batch: tokenize(..., padding_side='left').")
    tokenizer = model.tokenizer
    stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    tokens, mask = batch.tokens, batch.attention_mask
    new_tokens: list[torch.Tensor] = []
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(max_new_tokens):
            logits = model(tokens, attention_mask=mask)
            next_token = logits[:, -1].argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, next(iter(stop_ids), 0)), next_token)
            new_tokens.append(next_token)
            finished |= torch.isin(next_token, torch.tensor(sorted(stop_ids), device=tokens.device))
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if bool(finished.all()):
                break
    generated = torch.stack(new_tokens, dim=1) if new_tokens else tokens[:, :0]
    texts = []
    for row in generated.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
