"""Safety-tune the embedded model with a small LoRA adapter, so that it refuses harmful requests.

Why this exists. SmolLM2-135M-Instruct (the embedded model) was not trained to refuse: it answers
"how do I build a pipe bomb" as readily as "how do I build a birdhouse". Arditi et al. study the
refusal behaviour of safety-tuned chat models, so before the study can start the embedded model
needs one. This module gives it one with the standard tool, a LoRA adapter (``peft``):

* **Training data** (:func:`build_training_examples`): every harmful *train* instruction of
  :func:`helpers.studies.refusal.data.load_instructions` is paired with a short refusal ("I'm sorry, but I
  can't help with that. …", followed by the end-of-turn token), every harmless *train* instruction
  with the model's **own** greedy answer (truncated, no end-of-turn token). Training on both kinds
  mixed makes refusal a function of the input — the model must *detect* harmfulness — rather than a
  blanket change of style; the harmless half also keeps the model's helpful behaviour in place.
* **Training** (:func:`train_lora`): a rank-``r`` LoRA on a few projection matrices of the blocks in
  the middle of the model (blocks 8–14 of 30: ``SafetyTuningConfig.lora_first_block`` and ``lora_depth``), cross-entropy on the response
  tokens only, AdamW, fixed seed, a few hundred examples — minutes on a CPU.
* **Use** (:func:`load_safety_tuned_model`): the shipped adapter (``helpers/data/refusal/adapter``)
  is merged into the weights and the merged model is wrapped in a ``TransformerBridge``, so hooks
  see a plain model with no LoRA modules in it.

``scripts/safety_tune.py`` regenerates the adapter, its training data and the training report.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from helpers.studies.refusal.data import DATA_DIR, load_instructions, load_style_shift
from helpers.studies.refusal.judges import is_refusal

ADAPTER_DIR = DATA_DIR / "adapter"
"""Where the shipped LoRA adapter lives (``adapter_config.json`` + ``adapter_model.safetensors``)."""

WEIGHT_DELTA_FILE = "weight_delta.safetensors"
"""Adapter file of a fully fine-tuned recipe (``SafetyTuningConfig.full_blocks``): trained − base weights."""

TRAINING_DATA_PATH = DATA_DIR / "safety_tuning_data.jsonl"
GENERAL_DATA_NAME = "general_requests.jsonl"
"""File (next to the training data) of the sampled general requests and the base model's answers."""
VOICE_DATA_NAME = "voice_training_data.jsonl"
"""The voice-training examples (``SafetyTuningConfig.voice_train``), written next to the main training data."""
REPORT_JSON_PATH = DATA_DIR / "safety_tuning_report.json"
REPORT_MD_PATH = DATA_DIR / "safety_tuning_report.md"

SAFETY_TUNED_DISPLAY_NAME = (
    "SmolLM2-135M-Instruct (embedded GGUF Q4_1, float32) + this project's safety-tuning LoRA, merged"
)

# Refusal openings and reasons. Every opening starts with "I" and contains one of the paper's
# refusal substrings, so the substring metric and the refusal-token score read it as a refusal.
REFUSAL_OPENINGS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with this request.",
    "I can't help with that.",
    "I cannot provide instructions for this.",
    "I'm unable to help with that request.",
    "I apologize, but I can't assist with that.",
)
REFUSAL_REASONS: tuple[str, ...] = (
    "It could cause serious harm to other people.",
    "It is illegal and could put people in danger.",
    "Helping with this could hurt someone.",
    "This request asks for something harmful.",
    "It could be used to hurt people or break the law.",
)
REFUSAL_OFFERS: tuple[str, ...] = (
    "",
    " If you have another question, I'm happy to help.",
    " Is there something else I can help you with?",
)


@dataclass
class SafetyTuningConfig:
    """Everything that decides the adapter (saved next to it in the training report).

    The defaults are the shipped recipe, ``mid8-mlp-r16-lr2-hw2-gen600-voice`` (since 2026-12-07), which the rule of
    ``scripts/safety_recipes.py`` chose on the selection sets only (val split + ``voice_val.jsonl``): rank-16 LoRA on
    the MLP projections of blocks 8–14, trained on the main train split, ``voice_train.jsonl`` and 447 self-sampled
    general requests (600 drawn), harmless weight 2. There it refuses 0.92 / 0.90 of the harmful requests and
    0.09 / 0.23 of the harmless ones, against 0.96 / 0.93 and 0.11 / 0.23 with 300 general requests and 0.92 / 0.92
    and 0.21 / 0.33 for the same LoRA on the main split alone.
    """

    seed: int = 0
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    """Rank 16 on the three MLP projections (since recipe ``half-mlp-r16-lr2-hw3``, shipped 2026-12-04 to 12-07). Against
    the earlier default, rank 8 on ``q_proj``/``v_proj``/``down_proj`` (``half-qvd-r8-lr2-hw3``), it refuses more
    harmful requests (test 0.94 vs 0.88, style-shift 0.97 vs 0.90, all 200 HarmBench behaviours 0.70 vs 0.48), over-refuses about
    as much, and its direction steers more and costs less text loss when ablated; see the recipe table."""
    lora_depth: float = 0.5
    """LoRA matrices go into the first ``round(lora_depth · n_layers)`` blocks (1.0: every block).
    The default is the first half (blocks up to 14 of the embedded model's 30; see ``lora_first_block``). The upper half stays
    frozen, so the refusal decision must be written into the residual stream at mid depth and read
    by the base model's own upper layers. With LoRA in every block (recipe ``all-qvd-r8-lr2-hw3`` in
    ``helpers/data/refusal/safety_recipes.md``) ablation still bypasses refusal, but no candidate
    direction comes as close to the KL filter (lowest val KL 0.36 against 0.20–0.21 for the lower half)."""
    lora_first_block: int = 8
    """The lowest block that gets LoRA matrices (0: from the bottom). The default, with ``lora_depth`` 0.5: blocks
    8–14 of the embedded model's 30 (since recipe ``mid8-mlp-r16-lr2-hw3``, shipped on 2026-12-07), chosen by the rule
    of ``scripts/safety_recipes.py`` on the selection sets only (val split + ``voice_val.jsonl``): against LoRA in
    blocks 0–14 it refuses as many harmful requests there (0.92 / 0.92 against 0.94 / 0.93) and fewer harmless
    ones (0.21 / 0.33 against 0.26 / 0.43)."""
    full_blocks: tuple[int, ...] = ()
    """Empty (the default): LoRA. Otherwise **full fine-tuning** of ``target_modules`` in these blocks:
    their whole weight matrices train and nothing else does (``rank``, ``alpha``, ``dropout`` and
    ``lora_depth`` are then unused). The adapter folder then holds the trained-minus-base weight
    differences (:data:`WEIGHT_DELTA_FILE`), which :func:`load_merged_hf` adds to the base weights."""
    learning_rate: float = 2e-3
    epochs: int = 2
    batch_size: int = 8
    decision_token_weight: float = 5.0
    """Loss weight of the first response token — the refuse-or-answer decision — relative to the
    other response tokens. The refusal score reads exactly this token, so weighting it makes the
    decision sharp on both sides instead of a soft mixture."""
    harmless_weight: float = 2.0
    """Loss weight of harmless examples relative to harmful ones (counters over-refusal). 2 in the shipped recipe,
    which has more harmless examples than harmful ones (the general requests); 3 in the recipes without them."""
    contrast_weight: float = 1.0
    """Extra loss weight of the harmless *contrast* examples (harmless requests on a harm category's topic:
    "How do I report a phishing email?"), on top of ``harmless_weight``. The tuned model over-refuses
    those far more than ordinary requests; weighting them asks the adapter to separate harm from topic.
    Tried (recipe ``half-qvd-r8-lr2-hw3-cw3``, weight 3): over-refusal unchanged, harmful refusal lower."""
    harmless_answer_tokens: int = 24
    """Length (tokens) of the model's own answers used as harmless targets."""
    eval_new_tokens: int = 32
    """Greedy tokens generated per prompt when measuring refusal rates for the report."""
    threads: int = 2
    """torch CPU threads. Float rounding can depend on the thread count, so the shipped adapter and its training data
    (the base model's greedy answers) are promised bit for bit only with the count they were made with: 2, the
    default of ``make safety-adapter`` (14.4 min of training on the 2-core CPU). Measured on this machine for the recipe
    shipped before (300 general requests), 1 thread gave the same files byte for byte too, in 20.0 min of training
    instead of 10.9; other counts or CPUs may differ in the last bits."""
    adapter_dtype: str = "float16"
    """dtype the adapter is stored in (halves the file; merged into float32 weights on load)."""
    general_requests: int = 600
    """Number of **general instruction** examples mixed into the harmless half (0: none). No general
    instruction set (Alpaca, Dolly, …) installs offline, so they are made as Magpie does (Xu et al.
    2024, "Magpie: alignment data synthesis from scratch by prompting aligned LLMs with nothing"): the
    base chat model is given its chat template up to the start of a user turn and *samples* the user's
    request itself (:func:`sample_user_requests`), then answers it greedily. The requests are in the
    model's own voice — neither this project's nor the style-shift set's — and cover what its chat
    training covered. They are weighted like harmless examples. The default, 600 (seed 0, 2 threads), was chosen on the
    selection sets over 300 (recipe ``mid8-mlp-r16-lr2-hw2-gen600-voice``); a draw of n is the first n requests of a
    larger draw with the same seed, so the 300-request recipes' draw is the first half of the shipped file. Requests
    whose answer reads as a refusal are dropped when training (:func:`add_general_requests`; of the first 300, 219 are
    kept). Alone, they lower over-refusal but also harmful refusal in other voices (recipe
    ``mid8-mlp-r16-lr2-hw3-gen300``: 0.83 on ``voice_val.jsonl``); with ``voice_train`` they do not."""
    general_request_tokens: int = 64
    """Most tokens sampled per general request (requests that do not end within them are dropped)."""
    anchor_weight: float = 0.0
    """Weight of the **anchoring** loss (0: none; LoRA only), :func:`anchoring_loss`: on harmless examples,
    the squared distance between the residual stream after the last adapted block and the base model's
    (the adapter switched off), relative to the base's squared norm there, over every token but the first.
    The blocks above are frozen, so a harmless request whose residual stream is anchored is processed
    exactly as by the base model: the adapter is asked to act on harmful requests only, instead of
    shifting every request and relying on the harmless answers to undo the shift at the output."""
    voice_train: bool = True
    """Also train on ``voice_train.jsonl`` (:func:`voice_training_examples`): 120 harmful and 120 harmless requests
    in six voices that neither the main set, the style-shift set nor the voice-validation set uses (email, format
    constraints, corporate, on behalf of someone, multi-part, enthusiastic); harmful → refusals, harmless → the
    base model's own answers, weighted like the main set's. The main set is written in one voice, so an adapter
    trained on it alone can key refusal on phrasing as well as on what is asked."""


FIELDS_ADDED_LATER: dict[str, Any] = {"anchor_weight": 0.0, "lora_first_block": 0, "voice_train": False}
""":class:`SafetyTuningConfig` fields added after some shipped training reports were written, each with the
value that trains exactly as the code did before the field existed (``anchor_weight`` 0: no anchoring loss,
the same computation step for step). :func:`config_from_report` fills them in where a report lacks them."""


def config_from_report(config: dict[str, Any]) -> SafetyTuningConfig:
    """The :class:`SafetyTuningConfig` a training report's ``config`` records.

    A report written before a field of :data:`FIELDS_ADDED_LATER` existed gets that field's no-change value;
    any other missing or unknown field is an error, so a report made with other settings never reads as
    the defaults.
    """
    known = {f.name for f in fields(SafetyTuningConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"config_from_report: the report's config has fields SafetyTuningConfig does not know: {unknown}.")
    missing = sorted(known - set(config) - set(FIELDS_ADDED_LATER))
    if missing:
        raise ValueError(f"config_from_report: the report's config lacks {missing}; it cannot say how the adapter was trained.")
    values = {**FIELDS_ADDED_LATER, **config}
    return SafetyTuningConfig(**{**values, "target_modules": tuple(values["target_modules"]),
                                 "full_blocks": tuple(values["full_blocks"])})


@dataclass
class TrainingExample:
    instruction: str
    response: str
    kind: str  # "harmful" (response = refusal) or "harmless" (response = the model's own answer)
    ends_turn: bool  # append the end-of-turn token to the response


def refusal_response(rng: random.Random) -> str:
    """A short refusal, drawn from :data:`REFUSAL_OPENINGS` × reasons × offers."""
    return f"{rng.choice(REFUSAL_OPENINGS)} {rng.choice(REFUSAL_REASONS)}{rng.choice(REFUSAL_OFFERS)}"


# --------------------------------------------------------------------------------------------------
# Hugging Face side: chat formatting, generation, training
# --------------------------------------------------------------------------------------------------


def chat_text(tokenizer: Any, instruction: str) -> str:
    """``instruction`` as a user turn in the tokenizer's chat template, ready for the reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def hf_generate_greedy(hf_model: Any, tokenizer: Any, instructions: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 16, desc: str = "generating") -> list[str]:
    """Greedy replies of a Hugging Face chat model (KV cache, left padding), decoded without the prompt."""
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for start in tqdm(range(0, len(instructions), batch_size), desc=desc, leave=False):
            chunk = [chat_text(tokenizer, i) for i in instructions[start:start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(hf_model.device)
            out = hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:]:
                replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = previous_side
    return replies


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends a chat turn: ``<|im_end|>`` where the vocabulary has it, else the EOS token."""
    vocab = tokenizer.get_vocab()
    return vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id


def user_turn_prefix(tokenizer: Any) -> str:
    """The chat template's text up to where a user's message starts (system prompt included).

    Found by formatting a one-message conversation with a sentinel and cutting at it, so it holds for
    any chat template.
    """
    sentinel = "\u2063SENTINEL\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    if sentinel not in text:
        raise ValueError("user_turn_prefix: the tokenizer's chat template does not show the user's message verbatim.")
    return text[:text.index(sentinel)]


def keep_general_request(text: str, *, min_words: int = 4, max_words: int = 80) -> bool:
    """Whether a sampled user request is usable: a single turn of ``min_words``–``max_words`` words.

    Drops samples that start or script another speaker (a line ending in ":" or a ``Name:`` line after
    the first), that contain template markers, or that are mostly not letters.
    """
    words = text.split()
    if not min_words <= len(words) <= max_words or "<|" in text or "|>" in text:
        return False
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.endswith(":") for line in lines) or any(":" in line.split(" ")[0] for line in lines[1:]):
        return False
    letters = sum(c.isalpha() for c in text)
    return letters >= 0.6 * len(text.replace(" ", ""))


@torch.no_grad()
def sample_user_requests(hf_model: Any, tokenizer: Any, n: int, *, seed: int, max_new_tokens: int = 64,
                         batch_size: int = 16, temperature: float = 1.0, max_batches: int | None = None,
                         exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct user requests sampled from the chat model itself (Magpie, Xu et al. 2024).

    The model continues :func:`user_turn_prefix` — its chat template up to the start of a user turn —
    with temperature sampling (seeded) until its end-of-turn token. Requests that do not end within
    ``max_new_tokens``, that :func:`keep_general_request` rejects, that repeat an earlier one, or that
    are in ``exclude`` (compared lower-cased) are dropped; batches are drawn until ``n`` are kept.

    Raises:
        RuntimeError: fewer than ``n`` requests were kept after ``max_batches`` batches
            (default: enough for 4× ``n`` samples).
    """
    if n <= 0:
        raise ValueError(f"sample_user_requests: n must be positive, got {n}.")
    end_id = end_of_turn_id(tokenizer)
    prefix = tokenizer(user_turn_prefix(tokenizer), return_tensors="pt", add_special_tokens=False)["input_ids"]
    prefix = prefix.to(hf_model.device)
    seen = {e.strip().lower() for e in exclude}
    kept: list[str] = []
    max_batches = max_batches if max_batches is not None else math.ceil(4 * n / batch_size)
    torch.manual_seed(seed)
    progress = tqdm(total=n, desc="sampling general requests", leave=False)
    for _ in range(max_batches):
        ids = prefix.expand(batch_size, -1)
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                eos_token_id=end_id, pad_token_id=end_id)
        for row in out[:, ids.shape[1]:].tolist():
            if end_id not in row:
                continue  # did not finish its turn
            text = tokenizer.decode(row[:row.index(end_id)], skip_special_tokens=True).strip()
            if keep_general_request(text) and text.lower() not in seen:
                seen.add(text.lower())
                kept.append(text)
                progress.update(1)
            if len(kept) == n:
                progress.close()
                return kept
    progress.close()
    raise RuntimeError(f"sample_user_requests: kept {len(kept)} of the {n} requests asked for after "
                       f"{max_batches} batches of {batch_size}; raise max_batches or max_new_tokens.")


def truncate_to_tokens(tokenizer: Any, text: str, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens of ``text``, decoded back to text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def build_training_examples(harmful: Sequence[str], harmless: Sequence[str], harmless_answers: Sequence[str],
                            *, seed: int) -> list[TrainingExample]:
    """Harmful instructions → refusals, harmless instructions → the given answers, shuffled (seeded).

    Harmless answers that already read as refusals (:func:`helpers.studies.refusal.direction.is_refusal`) are
    dropped, so the adapter never learns to refuse a harmless request.
    """
    if len(harmless) != len(harmless_answers):
        raise ValueError(f"build_training_examples: {len(harmless)} harmless instructions but "
                         f"{len(harmless_answers)} answers; give one answer per instruction.")
    rng = random.Random(seed)
    examples = [TrainingExample(i, refusal_response(rng), "harmful", True) for i in harmful]
    examples += [TrainingExample(i, a, "harmless", False) for i, a in zip(harmless, harmless_answers)
                 if a.strip() and not is_refusal(a)]
    rng.shuffle(examples)
    return examples


def encode_example(tokenizer: Any, example: TrainingExample) -> tuple[list[int], list[int]]:
    """Token ids and labels (−100 on the prompt, so the loss is on the response only)."""
    prompt_ids = tokenizer(chat_text(tokenizer, example.instruction), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if example.ends_turn:
        response_ids = response_ids + [end_of_turn_id(tokenizer)]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def label_weights(labels: Sequence[int], kind: str, config: SafetyTuningConfig, *,
                  contrast: bool = False) -> list[float]:
    """Per-token loss weights for one encoded example (0 on the prompt).

    Response tokens weigh 1, the first response token (the decision) ``config.decision_token_weight``;
    the whole example is scaled by ``config.harmless_weight`` when it is harmless, and also by
    ``config.contrast_weight`` when it is a contrast request.
    """
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"kind must be 'harmful' or 'harmless', got {kind!r}.")
    scale = config.harmless_weight if kind == "harmless" else 1.0
    if contrast:
        if kind != "harmless":
            raise ValueError("label_weights: contrast=True marks a harmless request on a harm topic; this example is harmful.")
        scale *= config.contrast_weight
    weights = [0.0 if label == -100 else scale for label in labels]
    first = next((i for i, label in enumerate(labels) if label != -100), None)
    if first is not None:
        weights[first] = scale * config.decision_token_weight
    return weights


def encode_weighted(tokenizer: Any, example: TrainingExample, config: SafetyTuningConfig, *,
                    contrast: bool = False) -> tuple[list[int], list[int], list[float]]:
    """:func:`encode_example` plus the example's :func:`label_weights`: one row for :func:`_collate`."""
    ids, labels = encode_example(tokenizer, example)
    return ids, labels, label_weights(labels, example.kind, config, contrast=contrast)


def _collate(encoded: list[tuple[list[int], list[int], list[float]]], pad_id: int,
             anchored: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels, weights) rows into input_ids / attention_mask / labels / weights tensors;
    ``anchored`` (one flag per row: its residual stream is anchored, :func:`anchoring_loss`) adds a bool
    ``anchored`` tensor."""
    width = max(len(ids) for ids, _, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    weights = torch.zeros((len(encoded), width), dtype=torch.float32)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs, wts) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        weights[row, :len(wts)] = torch.tensor(wts)
        mask[row, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "weights": weights}
    if anchored is not None:
        if len(anchored) != len(encoded):
            raise ValueError(f"_collate: {len(anchored)} anchored flags for {len(encoded)} rows.")
        batch["anchored"] = torch.tensor(list(anchored), dtype=torch.bool)
    return batch


def weighted_response_loss(peft_model: Any, batch: dict[str, torch.Tensor], *, anchor_layer: int | None = None,
                           anchor_weight: float = 0.0) -> torch.Tensor:
    """Weighted mean next-token cross-entropy over the response tokens of ``batch``, plus
    ``anchor_weight`` × :func:`anchoring_loss` at ``anchor_layer`` when both are given and the batch
    has anchored rows.

    The LM head (49k-token vocabulary) runs only at the positions that predict a response token,
    not over the whole prompt: the loss is the same, the step is cheaper.
    """
    hf_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    anchoring = anchor_weight > 0 and anchor_layer is not None and bool(batch.get("anchored", torch.zeros(1)).any())
    out = hf_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=anchoring)
    hidden = out.last_hidden_state
    targets, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    predicting = targets != -100
    logits = hf_model.lm_head(hidden[:, :-1][predicting]).float()
    losses = torch.nn.functional.cross_entropy(logits, targets[predicting], reduction="none")
    token_weights = weights[predicting]
    loss = (losses * token_weights).sum() / token_weights.sum()
    if anchoring:
        loss = loss + anchor_weight * anchoring_loss(peft_model, batch, out.hidden_states[anchor_layer], anchor_layer)
    return loss


def anchoring_loss(peft_model: Any, batch: dict[str, torch.Tensor],
                   tuned: Float[torch.Tensor, "batch pos d_model"], layer: int) -> torch.Tensor:
    """How far the adapter moves the anchored rows' residual stream from the base model's.

    ``tuned`` is the trained model's residual stream after block ``layer − 1`` (Hugging Face
    ``hidden_states[layer]``); the base model's comes from the same forward pass with the adapter
    switched off (``peft_model.disable_adapter()``, no gradient). Returns
    Σ‖tuned − base‖² / Σ‖base‖² over the real tokens of the rows flagged in ``batch["anchored"]``,
    leaving out each row's first token (the attention sink, whose norm is tens of times the others').
    """
    if not hasattr(peft_model, "disable_adapter"):
        raise ValueError("anchoring_loss needs a peft model (the base model's activations come from switching the "
                         "adapter off); SafetyTuningConfig.anchor_weight works with LoRA, not with full_blocks.")
    rows = batch["anchored"]
    real = batch["attention_mask"][rows].bool().clone()
    real[:, 0] = False
    with torch.no_grad(), peft_model.disable_adapter():
        base_model = peft_model.get_base_model()
        base = base_model.model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                                output_hidden_states=True).hidden_states[layer]
    moved = (tuned[rows] - base)[real]
    return moved.pow(2).sum() / base[real].pow(2).sum()


def lora_blocks(n_layers: int, depth: float, first: int = 0) -> list[int]:
    """The blocks that get LoRA matrices: ``first`` up to the ``round(depth · n_layers)``-th (at least one)."""
    if not 0 < depth <= 1:
        raise ValueError(f"SafetyTuningConfig.lora_depth must be in (0, 1] (the fraction of blocks, from the "
                         f"bottom, that get LoRA matrices), got {depth!r}.")
    end = max(1, round(depth * n_layers))
    if not 0 <= first < end:
        raise ValueError(f"SafetyTuningConfig.lora_first_block must be in 0..{end - 1} (below the last adapted block, "
                         f"{end - 1}, that lora_depth={depth} gives for {n_layers} blocks), got {first!r}.")
    return list(range(first, end))


def make_lora_model(hf_model: Any, config: SafetyTuningConfig) -> Any:
    """``hf_model`` wrapped in a fresh, seeded LoRA (only the LoRA parameters train)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    layers = lora_blocks(hf_model.config.num_hidden_layers, config.lora_depth, config.lora_first_block)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), layers_to_transform=layers,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(hf_model, lora)


def full_finetune_parameters(hf_model: Any, config: SafetyTuningConfig) -> dict[str, torch.nn.Parameter]:
    """The weights that full fine-tuning trains: ``model.layers.{b}.….{module}.weight`` for every block
    ``b`` in ``config.full_blocks`` and module name in ``config.target_modules``."""
    n_layers = hf_model.config.num_hidden_layers
    bad = [b for b in config.full_blocks if not 0 <= b < n_layers]
    if bad:
        raise ValueError(f"SafetyTuningConfig.full_blocks has {bad}, outside the model's blocks 0–{n_layers - 1}.")
    wanted = {}
    for name, param in hf_model.named_parameters():
        parts = name.split(".")
        if (len(parts) > 3 and parts[-1] == "weight" and parts[-2] in config.target_modules
                and parts[1] == "layers" and int(parts[2]) in config.full_blocks):
            wanted[name] = param
    missing = {m for m in config.target_modules if not any(n.split(".")[-2] == m for n in wanted)}
    if missing:
        raise ValueError(f"SafetyTuningConfig.target_modules {sorted(missing)} match no weight in blocks "
                         f"{list(config.full_blocks)}; module names look like 'q_proj', 'down_proj'.")
    return wanted


def make_full_finetune_model(hf_model: Any, config: SafetyTuningConfig) -> tuple[Any, dict[str, torch.Tensor]]:
    """``hf_model`` with only :func:`full_finetune_parameters` trainable, and a copy of their
    initial values (to save the differences after training)."""
    torch.manual_seed(config.seed)
    trainable = full_finetune_parameters(hf_model, config)
    for name, param in hf_model.named_parameters():
        param.requires_grad_(name in trainable)
    return hf_model, {name: param.detach().clone() for name, param in trainable.items()}


def make_trainable_model(hf_model: Any, config: SafetyTuningConfig) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """The model to train and, for full fine-tuning, the initial weights: LoRA unless
    ``config.full_blocks`` is set."""
    if config.full_blocks:
        return make_full_finetune_model(hf_model, config)
    return make_lora_model(hf_model, config), None


def _contrast_flags(examples: Sequence[TrainingExample]) -> list[bool]:
    """Per example: a harmless contrast request of this project's sets (looked up by its text)."""
    from helpers.studies.refusal.data import describe_requests

    found = describe_requests([e.instruction for e in examples])
    return [e.kind == "harmless" and r is not None and r.contrast for e, r in zip(examples, found)]


def train_lora(peft_model: Any, tokenizer: Any, examples: Sequence[TrainingExample],
               config: SafetyTuningConfig) -> list[float]:
    """Train the LoRA parameters of ``peft_model`` on ``examples``; returns the loss of every step.

    Weighted cross-entropy on the response tokens (:func:`label_weights`,
    :func:`weighted_response_loss`), AdamW (no weight decay) at ``config.learning_rate`` with
    a linear warm-up over the first 10% of steps and cosine decay, ``config.epochs`` passes over
    the examples in seeded random order, ``config.batch_size`` examples per step. With
    ``config.anchor_weight`` > 0 the harmless examples' residual stream after the last adapted block is
    also anchored to the base model's (:func:`anchoring_loss`).
    """
    if not examples:
        raise ValueError("train_lora got no training examples.")
    generator = torch.Generator().manual_seed(config.seed)
    contrast = _contrast_flags(examples) if config.contrast_weight != 1.0 else [False] * len(examples)
    encoded = [encode_weighted(tokenizer, example, config, contrast=flag) for example, flag in zip(examples, contrast)]
    n_batches = math.ceil(len(encoded) / config.batch_size)
    total_steps = n_batches * config.epochs
    warmup = max(1, total_steps // 10)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    anchor_layer = None
    if config.anchor_weight:
        if config.full_blocks:
            raise ValueError("SafetyTuningConfig.anchor_weight works with LoRA only; set it to 0 with full_blocks.")
        anchor_layer = lora_blocks(peft_model.get_base_model().config.num_hidden_layers, config.lora_depth)[-1] + 1
    anchored = [example.kind == "harmless" for example in examples]
    losses: list[float] = []
    peft_model.train()
    progress = tqdm(total=total_steps, desc="LoRA safety tuning")
    for _ in range(config.epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            batch = _collate([encoded[i] for i in rows], pad_id,
                             anchored=[anchored[i] for i in rows] if anchor_layer is not None else None)
            batch = {k: v.to(peft_model.device) for k, v in batch.items()}
            loss = weighted_response_loss(peft_model, batch, anchor_layer=anchor_layer,
                                          anchor_weight=config.anchor_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    peft_model.eval()
    return losses


def save_adapter(peft_model: Any, folder: Path, dtype: str = "float16") -> None:
    """Save the LoRA weights (only) in ``dtype`` to ``folder``."""
    target_dtype = getattr(torch, dtype)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(target_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder))
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF Q4_1, float32)"
    if isinstance(config.get("target_modules"), list):  # peft writes a set: its order follows PYTHONHASHSEED
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = folder / "README.md"
    if readme.exists():  # peft's model-card template; our report says what this adapter is
        readme.unlink()


# --------------------------------------------------------------------------------------------------
# Loading the tuned model
# --------------------------------------------------------------------------------------------------


def save_weight_delta(model: Any, initial: dict[str, torch.Tensor], folder: Path, dtype: str = "float16") -> None:
    """Save ``trained − initial`` of the fully fine-tuned weights (:data:`WEIGHT_DELTA_FILE`) in ``dtype``."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    delta = {name: (params[name].detach() - start).to(getattr(torch, dtype)).contiguous()
             for name, start in sorted(initial.items())}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(delta, str(folder / WEIGHT_DELTA_FILE),
              metadata={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF Q4_1, float32)",
                        "content": "fine-tuned minus base weights; add to the base model's parameters"})


def add_weight_delta(hf_model: Any, path: Path) -> Any:
    """Add the differences saved by :func:`save_weight_delta` to ``hf_model``'s weights (in place)."""
    from safetensors.torch import load_file

    delta = load_file(str(path))
    params = dict(hf_model.named_parameters())
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise ValueError(f"{path} holds weights this model does not have ({unknown[:3]}…); it was made for "
                         "another base model.")
    with torch.no_grad():
        for name, diff in delta.items():
            if diff.shape != params[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(diff.shape)}, the model's is "
                                 f"{tuple(params[name].shape)}.")
            params[name].add_(diff.to(params[name].dtype))
    return hf_model


def load_merged_hf(adapter_dir: Path | str = ADAPTER_DIR, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The embedded model with the safety-tuning adapter merged into its weights (HF model, tokenizer).

    ``adapter_dir`` holds either a LoRA adapter (``adapter_config.json``, merged with ``peft``) or
    the weight differences of a fully fine-tuned recipe (:data:`WEIGHT_DELTA_FILE`)."""
    from peft import PeftModel

    from helpers.models import _load_embedded_hf

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / WEIGHT_DELTA_FILE).is_file():
        hf_model, tokenizer = _load_embedded_hf(torch.float32)
        return add_weight_delta(hf_model, adapter_dir / WEIGHT_DELTA_FILE).to(dtype).eval(), tokenizer
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No adapter in {adapter_dir} (neither adapter_config.json nor {WEIGHT_DELTA_FILE}). Regenerate it with "
            "`make safety-adapter` (python scripts/safety_tune.py), or reinstall the package data."
        )
    hf_model, tokenizer = _load_embedded_hf(torch.float32)
    merged = PeftModel.from_pretrained(hf_model, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype).eval(), tokenizer


def load_safety_tuned_model(*, device: str | None = None, dtype: torch.dtype = torch.float32,
                            adapter_dir: Path | str = ADAPTER_DIR) -> Any:
    """The safety-tuned embedded model as a ``TransformerBridge`` (LoRA merged, eval mode, no grads).

    Same conventions as :func:`helpers.models.load_model`: raw HF weights, ``requires_grad=False``,
    ``model.cfg.mi_model_name`` set to a description that names the adapter.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from helpers.models import EMBEDDED_HUB_NAME, _quiet_loading, best_device

    device = str(device) if device is not None else best_device()
    with _quiet_loading():
        merged, tokenizer = load_merged_hf(adapter_dir, dtype)
        model = TransformerBridge.boot_transformers(EMBEDDED_HUB_NAME, hf_model=merged.to(device),
                                                    tokenizer=tokenizer, device=device, dtype=dtype)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    model.cfg.mi_model_name = SAFETY_TUNED_DISPLAY_NAME
    return model


# --------------------------------------------------------------------------------------------------
# The whole recipe (what scripts/safety_tune.py runs)
# --------------------------------------------------------------------------------------------------


@dataclass
class SafetyTuningReport:
    config: dict[str, Any]
    n_train_harmful: int
    n_train_harmless: int
    n_dropped_harmless: int
    steps: int
    losses: list[float]
    train_seconds: float
    total_seconds: float
    torch_threads: int
    adapter_bytes: int
    refusal_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    n_general: int = 0
    """General requests sampled from the base model (Magpie) and answered by it, mixed in."""
    n_voice_harmful: int = 0
    n_voice_harmless: int = 0
    """Voice-training examples (``voice_train.jsonl``) mixed in, per side (not counted in ``n_train_*``)."""

    def _method(self) -> str:
        if self.config.get("full_blocks"):
            return "Full fine-tuning (every weight of the matrices)"
        return f"LoRA rank {self.config['rank']} (alpha {self.config['alpha']})"

    def _blocks(self) -> str:
        if self.config.get("full_blocks"):
            return "blocks " + ", ".join(map(str, self.config["full_blocks"]))
        depth = self.config.get("lora_depth", 1.0)
        first = self.config.get("lora_first_block", 0)
        if first:
            return f"the first {depth:.0%} of the blocks, from block {first} on"
        return "every block" if depth >= 1 else f"the first {depth:.0%} of the blocks"

    def to_markdown(self) -> str:
        rates = self.refusal_rates
        lines = [
            "# Safety-tuning report (generated by `scripts/safety_tune.py`; do not edit)",
            "",
            f"{self._method()} on {', '.join(self.config['target_modules'])} of {self._blocks()}; seed {self.config['seed']}; "
            f"{self.steps} steps of {self.config['batch_size']} examples ({self.config['epochs']} epochs); "
            f"lr {self.config['learning_rate']}; loss weight {self.config.get('decision_token_weight', 1.0)} on the "
            f"first response token (the decision), {self.config.get('harmless_weight', 1.0)} on harmless examples"
            + (f" (× {self.config['contrast_weight']} more on contrast requests)" if self.config.get("contrast_weight", 1.0) != 1.0 else "")
            + (f"; harmless examples' residual stream after the last adapted block anchored to the base model's, "
               f"weight {self.config['anchor_weight']}" if self.config.get("anchor_weight") else "")
            + ".",
            f"Training data: {self.n_train_harmful} harmful train instructions → refusals, "
            f"{self.n_train_harmless} harmless train instructions → the base model's own greedy answers "
            f"({self.config['harmless_answer_tokens']} tokens; {self.n_dropped_harmless} dropped as refusal-like)"
            + (f"; {self.n_general} general requests sampled from the base model itself (Magpie) → its own greedy "
               f"answers" if self.n_general else "")
            + (f"; {self.n_voice_harmful} harmful and {self.n_voice_harmless} harmless requests in six further voices "
               f"(`voice_train.jsonl`) → refusals / the base model's own answers" if self.n_voice_harmful else "") + ".",
            f"Loss: first step {self.losses[0]:.3f}, mean of last 10 steps {sum(self.losses[-10:]) / len(self.losses[-10:]):.3f}.",
            f"Training took {self.train_seconds:.0f} s, the whole script {self.total_seconds:.0f} s, "
            f"with {self.torch_threads} torch threads on CPU. Adapter file: {self.adapter_bytes / 1e6:.2f} MB "
            f"({self.config['adapter_dtype']}).",
            "",
            f"Refusal rate on the held-out **test** split and on the **style-shift** set (greedy, "
            f"{self.config['eval_new_tokens']} new tokens, refusal substring matching):",
            "",
        ]
        columns = list(next(iter(rates.values())))
        lines += ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, row in rates.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
        lines += ["", "Examples (tuned model; test split, then style-shift harmless):", ""]
        for ex in self.examples:
            lines.append(f"- **{ex['instruction']}** → {ex['reply']!r}")
        lines.append("")
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        return "\n".join(lines) + "\n"


def read_training_examples(path: Path) -> list[TrainingExample]:
    """The training examples of a ``safety_tuning_data.jsonl`` file, in file order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [TrainingExample(r["instruction"], r["response"], r["kind"], r["ends_turn"]) for r in rows]


def read_general_requests(path: Path) -> list[dict[str, str]]:
    """The sampled general requests of a ``general_requests.jsonl`` file (``{"instruction", "response"}``), in file
    order, as :func:`run_safety_tuning` wrote them (refusal-like answers still in: :func:`add_general_requests` drops them)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mix_examples(examples: Sequence[TrainingExample], extra: Sequence[TrainingExample], *,
                 seed: int) -> list[TrainingExample]:
    """``examples`` and ``extra`` in one list, shuffled with ``seed`` (the inputs are left as they were)."""
    mixed = list(examples) + list(extra)
    random.Random(seed).shuffle(mixed)
    return mixed


def add_general_requests(examples: Sequence[TrainingExample], general: Sequence[dict[str, str]], *,
                         seed: int) -> tuple[list[TrainingExample], int]:
    """``examples`` plus the sampled general requests (``{"instruction", "response"}``) as harmless examples, those
    with an empty or refusal-like answer dropped, shuffled with ``seed + 1``; and how many were added."""
    extra = [TrainingExample(g["instruction"], g["response"], "harmless", False) for g in general
             if g["response"].strip() and not is_refusal(g["response"])]
    return mix_examples(examples, extra, seed=seed + 1), len(extra)


def training_mix(examples: Sequence[TrainingExample], voice: Sequence[TrainingExample],
                 general: Sequence[dict[str, str]], *, seed: int) -> tuple[list[TrainingExample], int]:
    """What one training run trains on, in order: the main ``examples`` with the ``voice`` examples mixed in
    (:func:`mix_examples`, ``seed + 2``), then the ``general`` requests added (:func:`add_general_requests`,
    ``seed + 1``); and how many general requests were kept. An empty ``voice`` or ``general`` leaves that step out
    (no reshuffle), as a recipe without voice training or general requests trains."""
    mixed = mix_examples(examples, voice, seed=seed + 2) if voice else list(examples)
    if not general:
        return mixed, 0
    return add_general_requests(mixed, general, seed=seed)


def voice_training_examples(hf_model: Any, tokenizer: Any, config: SafetyTuningConfig, *,
                            path: Path | None = None, reuse: bool = False) -> list[TrainingExample]:
    """The ``voice_train.jsonl`` requests as training examples (:func:`build_training_examples`, seed + 2): harmful →
    refusals, harmless → ``hf_model``'s own greedy answers. Read from ``path`` when ``reuse`` and it exists;
    otherwise generated, and written to ``path`` when one is given."""
    from helpers.studies.refusal.data import load_voice_train_requests

    if reuse and path is not None and Path(path).is_file():
        return read_training_examples(path)
    requests = load_voice_train_requests()
    harmful = [r.text for r in requests if r.kind == "harmful"]
    harmless = [r.text for r in requests if r.kind == "harmless"]
    answers = hf_generate_greedy(hf_model, tokenizer, harmless, max_new_tokens=config.harmless_answer_tokens,
                                 desc="voice-train answers")
    answers = [truncate_to_tokens(tokenizer, a, config.harmless_answer_tokens) for a in answers]
    examples = build_training_examples(harmful, harmless, answers, seed=config.seed + 2)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples))
    return examples


def general_requests_data(hf_model: Any, tokenizer: Any, config: SafetyTuningConfig, *, exclude: Sequence[str],
                          path: Path | None = None, reuse: bool = False) -> list[dict[str, str]]:
    """``config.general_requests`` general requests sampled from ``hf_model`` itself (:func:`sample_user_requests`,
    ``config.seed``; none of ``exclude``), each with the model's own greedy answer cut to
    ``config.harmless_answer_tokens`` tokens, as ``{"instruction", "response"}``. Read from ``path`` when ``reuse``
    and it exists (:func:`read_general_requests`); otherwise generated, and written to ``path`` when one is given."""
    if reuse and path is not None and Path(path).is_file():
        return read_general_requests(path)
    requests = sample_user_requests(hf_model, tokenizer, config.general_requests, seed=config.seed,
                                    max_new_tokens=config.general_request_tokens, exclude=exclude)
    replies = hf_generate_greedy(hf_model, tokenizer, requests, max_new_tokens=config.harmless_answer_tokens,
                                 desc="general answers")
    general = [{"instruction": q, "response": truncate_to_tokens(tokenizer, a, config.harmless_answer_tokens)}
               for q, a in zip(requests, replies)]
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in general))
    return general


def run_safety_tuning(config: SafetyTuningConfig, *, out_dir: Path = DATA_DIR,
                      reuse_training_data: bool = False, evaluate_base: bool = True) -> SafetyTuningReport:
    """Generate the training data, train the LoRA, save it, measure refusal rates, write the report.

    Args:
        config: hyper-parameters and seed.
        out_dir: folder that receives ``adapter/``, ``safety_tuning_data.jsonl`` and the reports.
        reuse_training_data: train on an existing ``safety_tuning_data.jsonl`` instead of
            regenerating the harmless answers (saves the generation time; same data by construction
            when the base model is unchanged).
        evaluate_base: also measure the untuned model's refusal rates (the recipe comparison
            skips it: they do not depend on the recipe).
    """
    import peft
    import transformers

    from helpers.models import _load_embedded_hf

    t_start = time.time()
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    data_path = out_dir / TRAINING_DATA_PATH.name
    splits = load_instructions()
    harmful_train, harmless_train = splits["train"]["harmful"], splits["train"]["harmless"]
    held_out = {"test": splits["test"], "style-shift": load_style_shift()}

    hf_model, tokenizer = _load_embedded_hf(torch.float32)
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)

    if reuse_training_data and data_path.is_file():
        examples = read_training_examples(data_path)
        n_dropped = len(harmless_train) - sum(e.kind == "harmless" for e in examples)
    else:
        answers = hf_generate_greedy(hf_model, tokenizer, harmless_train,
                                     max_new_tokens=config.harmless_answer_tokens, desc="harmless answers")
        answers = [truncate_to_tokens(tokenizer, a, config.harmless_answer_tokens) for a in answers]
        examples = build_training_examples(harmful_train, harmless_train, answers, seed=config.seed)
        n_dropped = len(harmless_train) - sum(e.kind == "harmless" for e in examples)
        out_dir.mkdir(parents=True, exist_ok=True)
        data_path.write_text("".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples))

    voice: list[TrainingExample] = []  # counted apart in the report
    if config.voice_train:
        voice = voice_training_examples(hf_model, tokenizer, config, path=out_dir / VOICE_DATA_NAME,
                                        reuse=reuse_training_data)

    general: list[dict[str, str]] = []
    if config.general_requests:
        general = general_requests_data(hf_model, tokenizer, config, exclude=[*harmful_train, *harmless_train],
                                        path=out_dir / GENERAL_DATA_NAME, reuse=reuse_training_data)
    examples, n_general = training_mix(examples, voice, general, seed=config.seed)

    base_rates = _refusal_rates(hf_model, tokenizer, held_out, config.eval_new_tokens, "base") if evaluate_base else None

    peft_model, initial = make_trainable_model(hf_model, config)
    t_train = time.time()
    losses = train_lora(peft_model, tokenizer, examples, config)
    train_seconds = time.time() - t_train
    adapter_dir = out_dir / "adapter"
    if initial is None:
        save_adapter(peft_model, adapter_dir, config.adapter_dtype)
    else:
        save_weight_delta(peft_model, initial, adapter_dir, config.adapter_dtype)
    del peft_model, hf_model

    # Evaluate what ships: the saved adapter, reloaded and merged.
    merged, tokenizer = load_merged_hf(adapter_dir)
    tuned_rates = _refusal_rates(merged, tokenizer, held_out, config.eval_new_tokens, "tuned")
    sample = held_out["test"]["harmful"][:3] + held_out["test"]["harmless"][:3] + held_out["style-shift"]["harmless"][:2]
    replies = hf_generate_greedy(merged, tokenizer, sample, max_new_tokens=config.eval_new_tokens, desc="examples")

    n_voice_harmful = sum(e.kind == "harmful" for e in voice)
    n_voice_harmless = len(voice) - n_voice_harmful
    report = SafetyTuningReport(
        config={**asdict(config), "target_modules": list(config.target_modules), "full_blocks": list(config.full_blocks)},
        n_train_harmful=sum(e.kind == "harmful" for e in examples) - n_voice_harmful,
        n_train_harmless=sum(e.kind == "harmless" for e in examples) - n_general - n_voice_harmless,
        n_general=n_general,
        n_voice_harmful=n_voice_harmful,
        n_voice_harmless=n_voice_harmless,
        n_dropped_harmless=n_dropped,
        steps=len(losses),
        losses=[round(v, 4) for v in losses],
        train_seconds=round(train_seconds, 1),
        total_seconds=round(time.time() - t_start, 1),
        torch_threads=torch.get_num_threads(),
        adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file()),
        refusal_rates={**({"base (embedded model)": base_rates} if base_rates else {}),
                       ("safety-tuned (weights updated)" if config.full_blocks else "safety-tuned (LoRA merged)"): tuned_rates},
        examples=[{"instruction": i, "reply": r} for i, r in zip(sample, replies)],
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    )
    (out_dir / REPORT_JSON_PATH.name).write_text(json.dumps(asdict(report), indent=1, ensure_ascii=False) + "\n")
    (out_dir / REPORT_MD_PATH.name).write_text(report.to_markdown())
    return report


def _refusal_rates(hf_model: Any, tokenizer: Any, sets: dict[str, dict[str, Sequence[str]]],
                   new_tokens: int, label: str) -> dict[str, float]:
    """Refusal rate (substring judge) per ``"<kind> <set>"``, e.g. ``"harmful test"``, ``"harmless style-shift"``."""
    rates = {}
    for set_name, sides in sets.items():
        for kind in ("harmful", "harmless"):
            replies = hf_generate_greedy(hf_model, tokenizer, sides[kind], max_new_tokens=new_tokens,
                                         desc=f"{label} {kind} {set_name}")
            rates[f"{kind} {set_name}"] = sum(map(is_refusal, replies)) / len(replies)
    return rates


def selection_refusal_rates(hf_model: Any, tokenizer: Any, *, new_tokens: int = 32) -> dict[str, Any]:
    """Refusal rates (substring judge, greedy) on the **selection** sets only: the val split and ``voice_val.jsonl``.

    Recipes are chosen on these, never on the test split or the style-shift set. Returns ``"<set> <kind>"`` rates
    (``"val harmful"``, ``"voice-val harmless"``, …) and, under ``"<set> <kind> by group"``, the rate per group:
    ordinary / contrast for harmless requests, the voice for voice-val harmful requests.
    """
    from helpers.studies.refusal.data import load_split_requests, load_voice_val_requests

    val = load_split_requests()["val"]
    voice = load_voice_val_requests()
    sets = {
        "val harmful": [(r.text, "ordinary") for r in val["harmful"]],
        "val harmless": [(r.text, "contrast" if r.contrast else "ordinary") for r in val["harmless"]],
        "voice-val harmful": [(r.text, r.style) for r in voice if r.kind == "harmful"],
        "voice-val harmless": [(r.text, "contrast" if r.contrast else "ordinary") for r in voice if r.kind == "harmless"],
    }
    rates: dict[str, Any] = {}
    for name, items in sets.items():
        replies = hf_generate_greedy(hf_model, tokenizer, [text for text, _ in items], max_new_tokens=new_tokens,
                                     desc=name)
        flags = [is_refusal(reply) for reply in replies]
        rates[name] = sum(flags) / len(flags)
        groups: dict[str, list[bool]] = {}
        for (_, group), flag in zip(items, flags):
            groups.setdefault(group, []).append(flag)
        rates[f"{name} by group"] = {group: sum(v) / len(v) for group, v in groups.items()}
    return rates
