"""Activation patching best practices (Zhang & Nanda 2024, "Towards Best Practices of Activation Patching").

The paper shows that the *design choices* of an activation-patching experiment — how the input is
corrupted, which metric is read, whether layers are patched one at a time or in windows, and in which
direction — change which components look important. This module holds what the study needs on top
of the shared toolkit (:mod:`helpers.patching`, :mod:`helpers.metrics`, :mod:`helpers.attribution`);
the patching loops themselves live in the toolkit.

API at a glance::

    from helpers.studies import patching_practices as pp
    checks = pp.check_facts(model, pp.load_facts())          # which facts does the model know?
    task = pp.make_factual_recall_task(model, 16, seed=0)      # clean / STR-corrupted prompts, answers, subject mask
    task = pp.make_ioi_task(model, 16, seed=0)                 # the same for IOI (STR = ABC names)
    str_ = pp.symmetric_token_replacement(task)                # Corruption: other tokens, no hooks
    gn = pp.gaussian_noising(model, task, scale=3.0, seed=0)   # Corruption: clean tokens + noise on key embeddings
    metrics = pp.patching_metrics(model, task, gn)             # normalised logit diff / probability / KL
    pp.rank_agreement(sweep_a, sweep_b, k=5, noise_floor=0.02) # how far two sweeps agree (above a noise floor)
    pp.make_ioi_task(model, 16, seed=0, corruption="s2")       # STR of S2 only ("s1_io": of IO and S1; refill_name_slots)
    pp.head_group_restoration(model, task, gn, heads, positions=end)  # patch several heads at once: LD restored

Corruptions
-----------
A :class:`Corruption` is *what the model reads in a corrupted run*: a token batch plus forward hooks
that are active during (and only during) runs on the corrupted input.

* **Symmetric token replacement (STR)** swaps the key tokens for similar in-distribution tokens
  (another country of the same token length; three other names for IOI). The corrupted prompt is an
  ordinary prompt with a different, well-defined answer; no hooks.
* **Gaussian noising (GN)** keeps the clean tokens and adds ``N(0, ν²)`` noise to the token
  embeddings of the key tokens (subject tokens; the names in IOI), with ``ν = scale × std(W_E)``
  (``scale = 3`` in the paper, following ROME's causal tracing). The noise is drawn once from a seeded
  generator, so every corrupted run of a sweep sees the same noisy input. It is a hook on
  ``hook_embed`` (the token embedding, before positional embeddings are added in GPT-2) that acts
  only in runs on the corruption's own (marked) token batch — see :func:`gaussian_noising`.

Patching with a hook-defined corrupted input: pass ``corruption.tokens`` as ``corrupted=`` to
:mod:`helpers.patching` with ``corruption.hooks`` active (:func:`corrupted_input`, or the sweep
wrappers :func:`layer_sweeps`, :func:`position_sweep`, :func:`head_sweep`, :func:`window_sweeps`).

Metrics
-------
All patching metrics here are put on one scale, **0 = corrupted run, 1 = clean run**, so that sweeps
under different metrics can be compared side by side: the logit difference
``logit(correct) − logit(wrong)``, the probability of the correct answer, and the KL divergence
from the clean next-token distribution (as ``1 − KL(clean‖patched) / KL(clean‖corrupted)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from helpers.batching import rows_per_forward
from helpers.effects import StopForward
from helpers.metrics import answer_prob, kl_divergence, logit_diff
from helpers.prompts import TokenBatch, tokenize

__all__ = [
    "Fact",
    "FactCheck",
    "load_facts",
    "check_facts",
    "facts_table",
    "PatchingTask",
    "make_factual_recall_task",
    "make_ioi_task",
    "Corruption",
    "symmetric_token_replacement",
    "gaussian_noising",
    "gaussian_noise_hooks",
    "embedding_noise_std",
    "run_logits",
    "Baselines",
    "baselines",
    "patching_metrics",
    "METRIC_NAMES",
    "baselines_table",
    "corrupted_input",
    "layer_sweeps",
    "position_sweep",
    "head_sweep",
    "window_sweeps",
    "timed",
    "Timed",
    "pearson",
    "spearman",
    "top_indices",
    "RankAgreement",
    "rank_agreement",
    "attention_to_key",
    "refill_name_slots",
    "IOI_CORRUPTION_SLOTS",
    "patch_head_group",
    "HeadGroupRestoration",
    "head_group_restoration",
    "WindowInflation",
    "window_inflation",
    "MetricBlindSpot",
    "most_negative_component",
    "restrict_layers",
]

FACTS_RESOURCE = "factual_recall.json"
EMBED_HOOK = "hook_embed"
EMBED_INPUT_HOOK = "embed.hook_in"


# --------------------------------------------------------------------------------------------------
# The factual-recall prompt set
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One fact: ``template.format(subject=subject)`` should be continued by ``" " + answer``."""

    relation: str
    template: str
    subject: str
    answer: str

    @property
    def prompt(self) -> str:
        return self.template.format(subject=self.subject)


def load_facts(relations: Sequence[str] | None = None) -> list[Fact]:
    """The project-written facts in ``helpers/data/factual_recall.json`` (all, or only ``relations``).

    Relations: ``capital``, ``official_language``, ``city_country``, ``landmark_city``,
    ``company_country``. Which of these a model knows is checked by :func:`check_facts`.
    """
    payload = json.loads(resources.files("helpers").joinpath("data", FACTS_RESOURCE).read_text(encoding="utf-8"))
    available = [r["name"] for r in payload["relations"]]
    if relations is not None:
        if isinstance(relations, str):
            relations = [relations]
        unknown = [r for r in relations if r not in available]
        if unknown:
            raise ValueError(f"Unknown relation(s) {unknown}; the prompt set has {available}.")
    facts = []
    for rel in payload["relations"]:
        if relations is not None and rel["name"] not in relations:
            continue
        for subject, answer in rel["facts"].items():
            facts.append(Fact(rel["name"], rel["template"], subject, answer))
    return facts


@dataclass(frozen=True)
class FactCheck:
    """What a model makes of one fact.

    Attributes:
        fact: the fact.
        answer_id: id of ``" " + answer`` if that is a single token, else ``None``.
        rank: rank of the answer's first token among the next-token logits (0 = top prediction).
        prob: probability the model gives the answer's first token.
        top_token: the model's top prediction (decoded).
        subject_span: ``(start, stop)`` of the subject's tokens in the unpadded prompt (BOS included
            when the model prepends one), or ``None`` if the subject merges with its neighbours.
        known: single-token answer, subject span found, and ``rank == 0``.
    """

    fact: Fact
    answer_id: int | None
    rank: int
    prob: float
    top_token: str
    subject_span: tuple[int, int] | None

    @property
    def known(self) -> bool:
        return self.answer_id is not None and self.subject_span is not None and self.rank == 0

    @property
    def n_subject_tokens(self) -> int:
        return 0 if self.subject_span is None else self.subject_span[1] - self.subject_span[0]


def _subject_span(tokenizer: Any, fact: Fact, bos_offset: int) -> tuple[int, int] | None:
    """Token span of the subject inside the prompt, checked against the full prompt's tokenization."""
    prefix_text = fact.template.split("{subject}")[0]
    full = tokenizer(fact.prompt, add_special_tokens=False)["input_ids"]
    # The space before the subject belongs to the subject's first token (" France").
    stripped = prefix_text.rstrip(" ")
    prefix = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
    upto = tokenizer(prefix_text + fact.subject, add_special_tokens=False)["input_ids"]
    if full[: len(prefix)] != prefix or full[: len(upto)] != upto or len(upto) <= len(prefix):
        return None
    return bos_offset + len(prefix), bos_offset + len(upto)


@torch.no_grad()
def check_facts(model: Any, facts: Sequence[Fact], *, batch_size: int | None = None) -> list[FactCheck]:
    """Run every fact's prompt and record the answer's rank and probability at the last position.

    ``batch_size`` (prompts per forward pass) defaults to what :data:`helpers.batching.FORWARD_BUDGET_BYTES`
    allows for this model's vocabulary and the longest prompt.

    A fact counts as *known* (:attr:`FactCheck.known`) when its answer is one token (with the
    leading space), the subject's tokens can be located, and the answer is the model's top prediction.
    """
    if len(facts) == 0:
        raise ValueError("check_facts got no facts; load them with load_facts().")
    tokenizer = model.tokenizer
    if batch_size is None:
        longest = max(len(tokenizer(f.prompt)["input_ids"]) for f in facts) + 1  # + a BOS the tokenizer may not add
        batch_size = rows_per_forward(model, longest)
    elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int (prompts per forward pass) or None (from the memory "
                         f"budget), got {batch_size!r}.")
    checks: list[FactCheck] = []
    for start in range(0, len(facts), batch_size):
        chunk = list(facts[start : start + batch_size])
        batch = tokenize(model, [f.prompt for f in chunk])
        logits = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1].float()
        probs = logits.softmax(-1)
        for row, fact in enumerate(chunk):
            ids = tokenizer(" " + fact.answer, add_special_tokens=False)["input_ids"]
            first = ids[0]
            n_real = int(batch.lengths[row])
            bos_offset = n_real - len(tokenizer(fact.prompt, add_special_tokens=False)["input_ids"])
            checks.append(
                FactCheck(
                    fact=fact,
                    answer_id=first if len(ids) == 1 else None,
                    rank=int((logits[row] > logits[row, first]).sum()),
                    prob=float(probs[row, first]),
                    top_token=tokenizer.decode([int(logits[row].argmax())]),
                    subject_span=_subject_span(tokenizer, fact, bos_offset),
                )
            )
    return checks


def facts_table(checks: Sequence[FactCheck]) -> Any:
    """The checks as a pandas DataFrame (one row per fact), for display in a notebook."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "relation": c.fact.relation,
                "subject": c.fact.subject,
                "answer": c.fact.answer,
                "single-token answer": c.answer_id is not None,
                "rank": c.rank,
                "p(answer)": round(c.prob, 3),
                "top prediction": c.top_token,
                "subject tokens": c.n_subject_tokens,
                "known": c.known,
            }
            for c in checks
        ]
    )


# --------------------------------------------------------------------------------------------------
# Patching tasks: clean prompts, STR counterparts, answers, key-token positions
# --------------------------------------------------------------------------------------------------


@dataclass
class PatchingTask:
    """Clean prompts with their symmetric-token-replacement counterparts, for one patching study.

    Attributes:
        name: ``"factual recall"`` or ``"IOI"``.
        clean: the clean prompts (left padded, with attention mask).
        corrupted: their STR counterparts, token-for-token aligned with ``clean`` (same shape and
            same attention mask: only the key tokens differ).
        answer_tokens: ``[batch, 2]`` ids of (clean answer, corrupted answer), read at the last token.
        key_mask: ``[batch, pos]`` True at the key tokens of the clean prompts (the subject in factual
            recall; the IO, S1 and S2 names in IOI): where STR swaps tokens and GN adds noise.
        clean_prompts, corrupted_prompts: the prompt strings.
        answers: (clean answer, corrupted answer) strings per prompt.
        position_labels: one label per token position (e.g. ``"subject"``) when all prompts share one
            layout, else ``None``.
    """

    name: str
    clean: TokenBatch
    corrupted: TokenBatch
    answer_tokens: Int[torch.Tensor, "batch 2"]
    key_mask: Bool[torch.Tensor, "batch pos"]
    clean_prompts: list[str]
    corrupted_prompts: list[str]
    answers: list[tuple[str, str]]
    position_labels: list[str] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.clean.tokens.shape != self.corrupted.tokens.shape:
            raise ValueError(
                f"clean {tuple(self.clean.tokens.shape)} and corrupted {tuple(self.corrupted.tokens.shape)} "
                "token batches must have the same shape for position-wise patching."
            )
        if not torch.equal(self.clean.attention_mask, self.corrupted.attention_mask):
            raise ValueError("clean and corrupted prompts must have the same attention mask (same token lengths).")
        if self.key_mask.shape != self.clean.tokens.shape:
            raise ValueError(f"key_mask must be [batch, pos] = {tuple(self.clean.tokens.shape)}, got {tuple(self.key_mask.shape)}.")
        if self.answer_tokens.shape != (len(self.clean), 2):
            raise ValueError(f"answer_tokens must be [batch, 2], got {tuple(self.answer_tokens.shape)}.")

    def __len__(self) -> int:
        return len(self.clean)


def _pair_within_groups(
    groups: dict[Any, list[FactCheck]], rng: random.Random, attempts: int = 200
) -> list[tuple[FactCheck, FactCheck]]:
    """Pair every fact with another of its group that has a different answer (a seeded derangement).

    Within a group the facts are shuffled and each is paired with the next one (cyclically); the
    shuffle is redrawn until all neighbours have different answers, else pairs with equal answers
    are dropped.
    """
    pairs = []
    for key in sorted(groups, key=str):
        members = list(groups[key])
        if len(members) < 2 or len({m.fact.answer for m in members}) < 2:
            continue
        best: list[tuple[FactCheck, FactCheck]] = []
        for _ in range(attempts):
            rng.shuffle(members)
            candidate = [
                (members[i], members[(i + 1) % len(members)])
                for i in range(len(members))
                if members[i].fact.answer != members[(i + 1) % len(members)].fact.answer
            ]
            if len(candidate) > len(best):
                best = candidate
            if len(best) == len(members):
                break
        pairs.extend(best)
    return pairs


def make_factual_recall_task(
    model: Any,
    n_prompts: int,
    *,
    relations: Sequence[str] = ("capital",),
    seed: int = 0,
    checks: Sequence[FactCheck] | None = None,
) -> PatchingTask:
    """Factual-recall prompts the model gets right, each paired with an STR counterpart.

    The counterpart of "The capital of France is the city of" is the same template with another
    known subject of the same relation and the same number of subject tokens, whose answer differs
    ("The capital of Poland is the city of" → " Warsaw"). The logit difference is
    ``logit(clean answer) − logit(counterpart's answer)``. Clean and corrupted prompts have identical
    token lengths, so they are aligned position by position.

    Args:
        model: the bridge.
        n_prompts: how many (clean, corrupted) pairs; fewer available raises an error that says how many.
        relations: relations of the prompt set to draw from (see :func:`load_facts`).
        seed: seeds the pairing and the sample.
        checks: precomputed :func:`check_facts` results (saves a forward pass over the prompt set).
    """
    if not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}.")
    if checks is None:
        checks = check_facts(model, load_facts(relations))
    known = [c for c in checks if c.known and c.fact.relation in relations]
    groups: dict[tuple[str, int], list[FactCheck]] = {}
    for c in known:
        groups.setdefault((c.fact.relation, c.n_subject_tokens), []).append(c)
    rng = random.Random(seed)
    pairs = _pair_within_groups(groups, rng)
    if len(pairs) < n_prompts:
        raise ValueError(
            f"Only {len(pairs)} STR pairs can be built from the {len(known)} facts the model knows in "
            f"relations {list(relations)}; asked for n_prompts={n_prompts}. Lower n_prompts or add relations "
            "(see load_facts() for the list)."
        )
    pairs = rng.sample(pairs, n_prompts)
    clean = tokenize(model, [a.fact.prompt for a, _ in pairs])
    corrupted = tokenize(model, [b.fact.prompt for _, b in pairs])
    key_mask = torch.zeros_like(clean.tokens, dtype=torch.bool)
    pad = (clean.tokens.shape[1] - clean.lengths).tolist()
    for row, (a, _) in enumerate(pairs):
        start, stop = a.subject_span  # type: ignore[misc]
        key_mask[row, pad[row] + start : pad[row] + stop] = True
    answer_tokens = torch.tensor([[a.answer_id, b.answer_id] for a, b in pairs], dtype=torch.long, device=clean.tokens.device)
    labels = None
    if len({a.fact.template for a, _ in pairs}) == 1 and bool((clean.lengths == clean.lengths[0]).all()):
        labels = _position_labels(model, clean.tokens[0], key_mask[0], "subject")
    return PatchingTask(
        name="factual recall",
        clean=clean,
        corrupted=corrupted,
        answer_tokens=answer_tokens,
        key_mask=key_mask,
        clean_prompts=[a.fact.prompt for a, _ in pairs],
        corrupted_prompts=[b.fact.prompt for _, b in pairs],
        answers=[(a.fact.answer, b.fact.answer) for a, b in pairs],
        position_labels=labels,
        details={"n_known": len(known), "n_checked": len(checks), "relations": list(relations)},
    )


def _position_labels(model: Any, tokens: torch.Tensor, key: torch.Tensor, key_name: str) -> list[str]:
    """``"<pos> <token>"`` labels, with key positions marked as ``key_name``."""
    labels = []
    for pos, (tok, is_key) in enumerate(zip(tokens.tolist(), key.tolist())):
        text = model.tokenizer.decode([tok]).replace("\n", "\\n")
        labels.append(f"{pos} {key_name}" if is_key else f"{pos} {text.strip() or repr(text)}")
    return labels


IOI_SLOTS = ("IO", "S1", "S2")
IOI_CORRUPTION_SLOTS: dict[str, tuple[str, ...]] = {
    "abc": IOI_SLOTS, "swap": IOI_SLOTS, "s2": ("S2",), "s1_io": ("IO", "S1"),
}


def refill_name_slots(data: Any, slots: Sequence[str], *, seed: int = 0) -> Any:
    """The IOI prompts of ``data`` with the name ``slots`` (a subset of ``"IO"``, ``"S1"``, ``"S2"``)
    refilled by fresh names, the other slots kept: a symmetric token replacement of only those names.

    Per prompt, the fresh names are distinct and differ from the prompt's IO and S (drawn from
    ``data.name_pool`` with ``random.Random(seed)``), so e.g. ``slots=("S2",)`` turns "Then, Mary and
    John went to the store. John gave a drink to" into "... Kate gave a drink to" (nothing repeated), and
    ``("IO", "S1")`` into "Then, Tom and Amy went to the store. John gave a drink to". All three slots is
    the ABC distribution. Token positions stay aligned with ``data`` (checked by the dataset). Returns an
    :class:`helpers.studies.ioi.IOIDataset` whose ``io_names``/``s_names``/``s2_names`` are the names now in
    the slots; keep using ``data.answer_tokens`` in metrics.
    """
    slots = tuple(slots)
    unknown = [s for s in slots if s not in IOI_SLOTS]
    if not slots or unknown or len(set(slots)) != len(slots):
        raise ValueError(f"slots must be distinct names among {IOI_SLOTS}, got {slots!r}.")
    rng = random.Random(seed)
    names = {"IO": list(data.io_names), "S1": list(data.s_names), "S2": list(data.s2_names)}
    for row, (io, s) in enumerate(zip(data.io_names, data.s_names)):
        pool = [n for n in data.name_pool if n not in (io, s)]
        if len(pool) < len(slots):
            raise ValueError(f"the name pool has {len(pool)} names besides IO and S; {len(slots)} are needed.")
        for slot, fresh in zip(slots, rng.sample(pool, len(slots))):
            names[slot][row] = fresh
    kind = "STR of " + "+".join(slots)
    return data._refill(names["IO"], names["S1"], names["S2"], kind)  # the dataset's own aligned rebuild


def make_ioi_task(
    model: Any,
    n_prompts: int,
    *,
    seed: int = 0,
    corruption: Literal["abc", "swap", "s2", "s1_io"] = "abc",
    templates: Any = "BABA",
) -> PatchingTask:
    """IOI prompts (:func:`helpers.studies.ioi.make_ioi_dataset`) with their STR counterpart.

    ``corruption="abc"``: the three name slots refilled with three fresh names (Wang et al.'s ABC
    distribution); ``"swap"``: IO and S exchanged (the logit difference flips sign); ``"s2"``: only
    the second subject replaced by a fresh name (no name is repeated any more: the S-inhibition
    signal is gone, IO and S are still in the prompt); ``"s1_io"``: IO and the first subject replaced
    by two fresh names, S2 kept (:func:`refill_name_slots`). The same ``seed`` gives the same clean
    prompts for every corruption. The answers are ``(IO, S)`` of the clean prompt; the key tokens are
    the replaced slots (all three names for ``"abc"`` and ``"swap"``).
    """
    from helpers.studies.ioi import make_ioi_dataset

    slots = IOI_CORRUPTION_SLOTS.get(corruption)
    if slots is None:
        raise ValueError(f"corruption must be one of {sorted(IOI_CORRUPTION_SLOTS)}, got {corruption!r}.")
    data = make_ioi_dataset(model, n_prompts, seed=seed, templates=templates)
    if corruption == "abc":
        other = data.abc()
    elif corruption == "swap":
        other = data.swap_names()
    else:
        other = refill_name_slots(data, slots, seed=seed + 1)
    key_mask = torch.zeros_like(data.batch.tokens, dtype=torch.bool)
    rows = torch.arange(len(data), device=key_mask.device)
    for role in slots:
        key_mask[rows, data.word_positions[role].to(key_mask.device)] = True
    labels = None
    if len(set(data.template_groups.tolist())) == 1:
        labels = []
        roles = {int(data.word_positions[r][0]): r for r in ("IO", "S1", "S2", "END")}
        for pos, tok in enumerate(data.batch.tokens[0].tolist()):
            labels.append(f"{pos} {roles[pos]}" if pos in roles else f"{pos} {model.tokenizer.decode([tok]).strip()}")
    return PatchingTask(
        name="IOI",
        clean=data.batch,
        corrupted=other.batch,
        answer_tokens=data.answer_tokens,
        key_mask=key_mask,
        clean_prompts=list(data.prompts),
        corrupted_prompts=list(other.prompts),
        answers=list(zip(data.io_names, data.s_names)),
        position_labels=labels,
        details={"dataset": data, "corrupted_dataset": other, "corruption": corruption},
    )


# --------------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------------

Hook = tuple[str, Callable[..., Any]]


@dataclass
class Corruption:
    """What the model reads in a corrupted run: ``tokens`` with ``hooks`` active.

    Attributes:
        name: ``"STR"`` or ``"GN"`` (used in plot titles and tables).
        tokens: the corrupted input tokens (for GN: the clean tokens).
        hooks: ``(hook_name, fn)`` forward hooks that belong to the corrupted input (for GN: the noise
            on ``hook_embed``); empty for STR. They must be active in every run on the corrupted input
            and in no run on the clean input.
        description: one line for the notebook.
    """

    name: str
    tokens: TokenBatch
    hooks: list[Hook] = field(default_factory=list)
    description: str = ""


def symmetric_token_replacement(task: PatchingTask) -> Corruption:
    """STR: the corrupted input is the task's counterpart prompts (key tokens swapped), no hooks."""
    return Corruption(
        name="STR",
        tokens=task.corrupted,
        hooks=[],
        description=f"symmetric token replacement ({task.name}: key tokens swapped for same-type tokens)",
    )


@torch.no_grad()
def embedding_noise_std(model: Any, scale: float = 3.0, chunk: int = 16384) -> float:
    """``scale ×`` the empirical standard deviation of the token embeddings *as they enter the model*:
    the output of ``hook_embed`` (where :func:`gaussian_noise_hooks` adds the noise), over every token
    of the vocabulary (all entries).

    For GPT-2 and SmolLM2 that is ``std(W_E)``. Gemma multiplies the looked-up embedding by
    ``√d_model`` before it enters the residual stream (25.3 for Gemma-3-270M); noise sized on ``W_E``
    would be that many times too small to corrupt anything.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}.")
    device = model.W_E.device
    total, total_sq, count = 0.0, 0.0, 0
    captured: list[torch.Tensor] = []

    def grab(activation: torch.Tensor, hook: Any) -> None:
        captured.append(activation.detach().double())
        raise StopForward  # nothing after the embedding is needed

    for start in range(0, int(model.cfg.d_vocab), chunk):
        # one token per row (a [chunk, 1] batch): no long sequence, and the forward stops at the embedding
        ids = torch.arange(start, min(start + chunk, int(model.cfg.d_vocab)), device=device)[:, None]
        captured.clear()
        try:
            model.run_with_hooks(ids, fwd_hooks=[(EMBED_HOOK, grab)])
        except StopForward:
            pass
        values = captured[0]
        total += float(values.sum())
        total_sq += float(values.pow(2).sum())
        count += values.numel()
    mean = total / count
    return float(scale * math.sqrt(max(total_sq / count - mean * mean, 0.0) * count / (count - 1)))


def gaussian_noise_hooks(
    model: Any,
    key_mask: Bool[torch.Tensor, "batch pos"],
    *,
    std: float | None = None,
    scale: float = 3.0,
    seed: int = 0,
) -> list[Hook]:
    """A forward hook on ``hook_embed`` that adds fixed Gaussian noise to the key tokens' embeddings.

    The noise ``ε ~ N(0, std²)`` (``std = scale × std(W_E)`` unless given) is drawn once, as a
    ``[batch, pos, d_model]`` tensor from ``torch.Generator().manual_seed(seed)``, and zeroed outside
    ``key_mask``; every call of the hook adds the same noise, so all runs of a sweep share one
    corrupted input. The hook refuses inputs of another shape. It acts in *every* run it is attached
    to; :func:`gaussian_noising` wraps it into a corruption that acts only on its own input.
    """
    if key_mask.dtype != torch.bool or key_mask.ndim != 2:
        raise ValueError(f"key_mask must be a bool [batch, pos] tensor, got {key_mask.dtype} {tuple(key_mask.shape)}.")
    if not bool(key_mask.any()):
        raise ValueError("key_mask selects no position: Gaussian noising would leave the input clean.")
    sigma = embedding_noise_std(model, scale) if std is None else float(std)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    d_model = model.cfg.d_model
    noise = torch.randn((*key_mask.shape, d_model), generator=generator) * sigma
    noise = noise * key_mask.cpu()[..., None]

    def add_noise(embed: Float[torch.Tensor, "batch pos d_model"], hook: Any = None) -> torch.Tensor:
        if embed.shape != noise.shape:
            raise RuntimeError(
                f"Gaussian-noise hook was built for inputs of shape {tuple(noise.shape[:2])} but the model ran on "
                f"{tuple(embed.shape[:2])}: it must only be active in runs on the task's own (clean) tokens."
            )
        return embed + noise.to(device=embed.device, dtype=embed.dtype)

    add_noise.noise = noise  # type: ignore[attr-defined]  # kept for inspection and tests
    add_noise.std = sigma  # type: ignore[attr-defined]
    return [(EMBED_HOOK, add_noise)]


def gaussian_noising(model: Any, task: PatchingTask, *, scale: float = 3.0, seed: int = 0) -> Corruption:
    """GN: the clean tokens with ``N(0, (scale·std(W_E))²)`` noise added to the key tokens' embeddings.

    How the corrupted input is represented: ``tokens`` are the clean tokens with every key token
    replaced by a *marker* id (another token), and ``hooks`` are

    1. on ``embed.hook_in`` (the token ids entering the embedding): if the ids are exactly the
       marked batch, put the clean tokens back and note that this run is the corrupted one;
    2. on ``hook_embed``: in that run only, add the fixed noise (:func:`gaussian_noise_hooks`).

    So the model reads "clean tokens + noise on the key embeddings", and the hooks can stay active in
    every run: runs on any other input (the clean prompts, patched runs that start from cached
    residual streams) are untouched. The marker ids also tell :mod:`helpers.patching` where the
    corrupted input differs from the clean one, which its shared-prefix optimisation relies on
    (positions before the first key token are identical in both runs).
    """
    noise_hooks = gaussian_noise_hooks(model, task.key_mask, scale=scale, seed=seed)
    (noise_name, add_noise), = noise_hooks
    clean_tokens = task.clean.tokens
    d_vocab = int(model.cfg.d_vocab)
    marked = torch.where(task.key_mask.to(clean_tokens.device), (clean_tokens + 1) % d_vocab, clean_tokens)
    state = {"corrupted": False}

    def restore_clean_tokens(tokens: torch.Tensor, hook: Any = None) -> torch.Tensor:
        state["corrupted"] = tokens.shape == marked.shape and bool(torch.equal(tokens, marked.to(tokens.device)))
        return clean_tokens.to(tokens.device) if state["corrupted"] else tokens

    def noise_if_corrupted(embed: torch.Tensor, hook: Any = None) -> torch.Tensor:
        return add_noise(embed, hook) if state["corrupted"] else embed

    noise_if_corrupted.noise = add_noise.noise  # type: ignore[attr-defined]
    noise_if_corrupted.std = add_noise.std  # type: ignore[attr-defined]
    return Corruption(
        name="GN",
        tokens=TokenBatch(marked, task.clean.attention_mask, task.clean.padding_side),
        hooks=[(EMBED_INPUT_HOOK, restore_clean_tokens), (noise_name, noise_if_corrupted)],
        description=(
            f"Gaussian noising ({task.name}: noise of {scale:g}×std(W_E) = {add_noise.std:.3f} on the key tokens' "
            f"embeddings, seed {seed})"
        ),
    )


def run_logits(model: Any, tokens: TokenBatch, hooks: Iterable[Hook] = ()) -> Float[torch.Tensor, "batch pos d_vocab"]:
    """Logits of ``tokens`` (with their attention mask) with ``hooks`` active; no gradients."""
    with torch.no_grad():
        return model.run_with_hooks(tokens.tokens, attention_mask=tokens.attention_mask, fwd_hooks=list(hooks))


# --------------------------------------------------------------------------------------------------
# Metrics on a common scale (0 = corrupted, 1 = clean)
# --------------------------------------------------------------------------------------------------

METRIC_NAMES = ("logit_diff", "prob", "kl")


@dataclass
class Baselines:
    """The three raw metrics on the clean and on the corrupted run.

    ``logit_diff``: mean ``logit(clean answer) − logit(corrupted answer)``; ``prob``: mean probability
    of the clean answer; ``kl``: mean KL(clean ‖ run) of the last-token distributions (0 on clean).
    """

    clean: dict[str, float]
    corrupted: dict[str, float]
    clean_logits: torch.Tensor = field(repr=False)


def baselines(model: Any, task: PatchingTask, corruption: Corruption) -> Baselines:
    """Run clean and corrupted inputs once and record logit difference, probability and KL on each."""
    clean_logits = run_logits(model, task.clean)
    corrupted_logits = run_logits(model, corruption.tokens, corruption.hooks)
    values = {}
    for label, logits in (("clean", clean_logits), ("corrupted", corrupted_logits)):
        values[label] = {
            "logit_diff": float(logit_diff(logits, task.answer_tokens, batch=task.clean)),
            "prob": float(answer_prob(logits, task.answer_tokens, batch=task.clean)),
            "kl": float(kl_divergence(logits, clean_logits, batch=task.clean)),
        }
    return Baselines(values["clean"], values["corrupted"], clean_logits[:, -1].detach())


def patching_metrics(
    model: Any, task: PatchingTask, corruption: Corruption, *, base: Baselines | None = None
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Patching metrics ``metric(logits) -> 0-d tensor``, each 0 on the corrupted and 1 on the clean run.

    * ``"logit_diff"``: ``(LD − LD_corrupted) / (LD_clean − LD_corrupted)``;
    * ``"prob"``: the same normalisation of the clean answer's probability;
    * ``"kl"``: ``1 − KL(clean‖patched) / KL(clean‖corrupted)``.

    All are differentiable (attribution patching back-propagates through them).
    """
    base = base if base is not None else baselines(model, task, corruption)
    clean_last = base.clean_logits
    answers, batch = task.answer_tokens, task.clean
    c, k = base.clean, base.corrupted
    for name in ("logit_diff", "prob"):
        if abs(c[name] - k[name]) < 1e-9:
            raise ValueError(f"The corruption {corruption.name} does not change the {name} metric; nothing to normalise by.")
    if k["kl"] < 1e-9:
        raise ValueError(f"The corruption {corruption.name} leaves the next-token distribution unchanged (KL = 0).")

    def ld_metric(logits: torch.Tensor) -> torch.Tensor:
        return (logit_diff(logits, answers, batch=batch) - k["logit_diff"]) / (c["logit_diff"] - k["logit_diff"])

    def prob_metric(logits: torch.Tensor) -> torch.Tensor:
        return (answer_prob(logits, answers, batch=batch) - k["prob"]) / (c["prob"] - k["prob"])

    def kl_metric(logits: torch.Tensor) -> torch.Tensor:
        return 1 - kl_divergence(logits, clean_last.to(logits.device), batch=batch) / k["kl"]

    ld_metric.__doc__ = "Normalised logit difference (0 = corrupted, 1 = clean)."
    prob_metric.__doc__ = "Normalised probability of the clean answer (0 = corrupted, 1 = clean)."
    kl_metric.__doc__ = "1 − KL(clean‖patched)/KL(clean‖corrupted) (0 = corrupted, 1 = clean)."
    return {"logit_diff": ld_metric, "prob": prob_metric, "kl": kl_metric}


# --------------------------------------------------------------------------------------------------
# Comparing sweeps
# --------------------------------------------------------------------------------------------------


def _values(x: Any) -> torch.Tensor:
    """The plain tensor of a :class:`helpers.labelled_tensor.LabelledTensor` (or of a tensor/array)."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu()
    values = getattr(x, "values", x)
    if callable(values):  # e.g. a dict's .values(): not a sweep
        raise TypeError(f"expected a tensor or LabelledTensor, got {type(x).__name__}.")
    return torch.as_tensor(values).detach().float().cpu()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (as in Spearman's rho)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two equally shaped sweeps (flattened)."""
    x, y = _values(a).flatten(), _values(b).flatten()
    if x.shape != y.shape:
        raise ValueError(f"sweeps must have the same shape, got {tuple(_values(a).shape)} and {tuple(_values(b).shape)}.")
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two equally shaped sweeps (flattened)."""
    x, y = _values(a).flatten(), _values(b).flatten()
    if x.shape != y.shape:
        raise ValueError(f"sweeps must have the same shape, got {tuple(_values(a).shape)} and {tuple(_values(b).shape)}.")
    return pearson(_ranks(x), _ranks(y))


def top_indices(sweep: Any, k: int, *, by: Literal["value", "abs", "-value"] = "value") -> list[tuple[int, ...]]:
    """Indices (as tuples, e.g. ``(layer, head)``) of the ``k`` largest entries of a sweep.

    ``by="value"``: most positive; ``"-value"``: most negative; ``"abs"``: largest magnitude.
    """
    values = _values(sweep)
    if not 1 <= k <= values.numel():
        raise ValueError(f"k must be between 1 and the sweep's size {values.numel()}, got {k}.")
    key = {"value": values, "-value": -values, "abs": values.abs()}[by].flatten()
    flat = torch.argsort(key, descending=True, stable=True)[:k]
    return [tuple(int(i) for i in np.unravel_index(int(f), tuple(values.shape))) for f in flat]


@dataclass(frozen=True)
class RankAgreement:
    """How far two sweeps of the same components agree.

    Attributes:
        spearman: rank correlation over all components.
        pearson: linear correlation over all components.
        top_k_overlap: fraction of the ``k`` most important components (by ``by``) shared by both.
        only_in_a, only_in_b: the top-``k`` components that the other sweep does not rank top-``k``.
    """

    spearman: float
    pearson: float
    k: int
    top_k_overlap: float
    only_in_a: list[tuple[int, ...]]
    only_in_b: list[tuple[int, ...]]
    n_compared: int = -1
    noise_floor: float = 0.0

    @property
    def top_sets_differ(self) -> bool:
        """Whether the two sweeps' top-``k`` components are not the same set."""
        return self.top_k_overlap < 1


def rank_agreement(
    a: Any, b: Any, *, k: int = 5, by: Literal["value", "abs", "-value"] = "value", noise_floor: float = 0.0
) -> RankAgreement:
    """Spearman/Pearson correlation and top-``k`` overlap of two sweeps of the same components.

    ``noise_floor > 0``: the correlations are computed only over the components whose effect exceeds
    it in absolute value in *either* sweep (``n_compared`` of them). Most heads of a head sweep have
    effects near zero, whose ranks are noise: a correlation over all of them mostly measures that
    noise. The top-``k`` sets are always taken over all components.
    """
    x, y = _values(a).flatten(), _values(b).flatten()
    if x.shape != y.shape:
        raise ValueError(f"sweeps must have the same shape, got {tuple(_values(a).shape)} and {tuple(_values(b).shape)}.")
    if not noise_floor >= 0:
        raise ValueError(f"noise_floor must be >= 0 (an absolute effect size), got {noise_floor}.")
    keep = (x.abs() > noise_floor) | (y.abs() > noise_floor) if noise_floor > 0 else torch.ones_like(x, dtype=torch.bool)
    top_a, top_b = top_indices(a, k, by=by), top_indices(b, k, by=by)
    n = int(keep.sum())
    return RankAgreement(
        spearman=spearman(x[keep], y[keep]) if n >= 3 else float("nan"),
        pearson=pearson(x[keep], y[keep]) if n >= 3 else float("nan"),
        k=k,
        top_k_overlap=len(set(top_a) & set(top_b)) / k,
        only_in_a=[i for i in top_a if i not in top_b],
        only_in_b=[i for i in top_b if i not in top_a],
        n_compared=n,
        noise_floor=float(noise_floor),
    )


# --------------------------------------------------------------------------------------------------
# Name-mover attention under a corruption
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_to_key(
    model: Any,
    tokens: TokenBatch,
    heads: Sequence[tuple[int, int]],
    *,
    query_positions: Int[torch.Tensor, "batch"],
    key_positions: Int[torch.Tensor, "batch"],
    hooks: Iterable[Hook] = (),
) -> Float[torch.Tensor, "n_heads"]:
    """Mean attention probability from ``query_positions`` to ``key_positions`` of each head in ``heads``.

    Runs ``tokens`` with ``hooks`` active (e.g. a GN corruption's tokens and hooks) and reads ``blocks.L.attn.hook_pattern``
    (``[batch, head, query, key]``). Used to check whether a corruption disrupts the attention of name
    movers (END → IO in IOI).
    """
    if not heads:
        raise ValueError("heads is empty: pass (layer, head) pairs.")
    layers = sorted({layer for layer, _ in heads})
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    with model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(tokens.tokens, attention_mask=tokens.attention_mask, names_filter=lambda n: n in names)
    rows = torch.arange(len(tokens))
    out = []
    for layer, head in heads:
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, head]  # [batch, query, key]
        rows = rows.to(pattern.device)
        out.append(pattern[rows, query_positions.to(pattern.device), key_positions.to(pattern.device)].float().mean().cpu())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# ADAPTER: patching with a hook-defined corrupted input
# --------------------------------------------------------------------------------------------------
# helpers.patching runs the corrupted prompts with `model.run_with_cache(corrupted.tokens, ...)` and
# has no option (yet) for hooks that belong to the corrupted input (requested: `corrupted_hooks=`).
# Because a GN corruption's hooks only act on runs whose token ids are its own marked batch (see
# `gaussian_noising`), they can simply be active around the toolkit's call; the patching loops
# themselves stay the toolkit's.


@contextlib.contextmanager
def corrupted_input(model: Any, corruption: Corruption) -> Iterator[TokenBatch]:
    """Context manager yielding the token batch to pass as ``corrupted=`` to :mod:`helpers.patching`
    (and :mod:`helpers.attribution`), with ``corruption.hooks`` active for its duration::

        with corrupted_input(model, gn) as corrupted:
            sweep = patching.patch_layer_outputs(model, task.clean, corrupted, metric, component="mlp")

    For a corruption without hooks (STR) it just yields ``corruption.tokens``.
    """
    if not corruption.hooks:
        yield corruption.tokens
        return
    with model.hooks(fwd_hooks=list(corruption.hooks)):
        yield corruption.tokens


# --------------------------------------------------------------------------------------------------
# Sweeps under a corruption (thin wrappers over helpers.patching)
# --------------------------------------------------------------------------------------------------


@dataclass
class Timed:
    """A result with the wall-clock seconds it took."""

    value: Any
    seconds: float


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Timed:
    """Call ``fn(*args, **kwargs)`` and time it (``time.perf_counter``)."""
    import time

    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return Timed(value, time.perf_counter() - start)


def layer_sweeps(
    model: Any,
    task: PatchingTask,
    corruption: Corruption,
    metric: Callable[[torch.Tensor], torch.Tensor],
    *,
    components: Sequence[str] = ("attn", "mlp"),
    direction: Literal["denoise", "noise"] = "denoise",
    progress: bool = False,
) -> dict[str, Any]:
    """Patch each layer's attention / MLP output at all positions → ``{component: LabelledTensor [layer]}``.

    :func:`helpers.patching.patch_layer_outputs` under ``corruption`` (``"denoise"``: the clean
    layer output into the corrupted run; ``"noise"``: the corrupted output into the clean run).
    """
    from helpers import patching

    with corrupted_input(model, corruption) as corrupted:
        return {
            component: patching.patch_layer_outputs(
                model, task.clean, corrupted, metric, component=component, direction=direction, progress=progress
            )
            for component in components
        }


def position_sweep(
    model: Any,
    task: PatchingTask,
    corruption: Corruption,
    metric: Callable[[torch.Tensor], torch.Tensor],
    *,
    component: Literal["attn", "mlp"] = "mlp",
    direction: Literal["denoise", "noise"] = "denoise",
    progress: bool = True,
) -> Any:
    """Patch one layer's attention / MLP output at one position at a time → ``[layer, pos]``
    (:func:`helpers.patching.patch_mlp_out` / ``patch_attn_out`` under ``corruption``)."""
    from helpers import patching

    sweep = patching.patch_mlp_out if component == "mlp" else patching.patch_attn_out
    with corrupted_input(model, corruption) as corrupted:
        result = sweep(model, task.clean, corrupted, metric, direction=direction, progress=progress)
    if task.position_labels is not None:
        result.labels["pos"] = list(task.position_labels)
    return result


def head_sweep(
    model: Any,
    task: PatchingTask,
    corruption: Corruption,
    metric: Callable[[torch.Tensor], torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    direction: Literal["denoise", "noise"] = "denoise",
    progress: bool = True,
) -> Any:
    """Patch each attention head's output (``hook_z``, all positions) → ``[layer, head]``
    (:func:`helpers.patching.patch_heads` under ``corruption``); ``layers`` restricts the sweep."""
    from helpers import patching

    with corrupted_input(model, corruption) as corrupted:
        return patching.patch_heads(
            model, task.clean, corrupted, metric, activation="z", direction=direction, layers=layers, progress=progress
        )


@torch.no_grad()
def patch_head_group(
    model: Any,
    task: PatchingTask,
    corruption: Corruption,
    metric: Callable[[torch.Tensor], torch.Tensor],
    heads: Sequence[tuple[int, int]],
    *,
    positions: Int[torch.Tensor, "batch"] | None = None,
) -> float:
    """Denoise a *group* of heads at once: the corrupted run (``corruption``) with the outputs
    (``hook_z``) of all ``heads`` taken from the clean run, at ``positions`` → ``metric``.

    ``positions``: one token position per prompt (e.g. END), or ``None`` for all positions. The
    toolkit's :func:`helpers.patching.patch_heads` patches one head per run; this is the one run that
    patches several together (e.g. the S-inhibition heads at END, as Zhang & Nanda do to compare
    corruptions). With one head and all positions it equals that sweep's entry (tested).
    """
    heads = [(int(layer), int(head)) for layer, head in heads]
    if not heads:
        raise ValueError("heads is empty: pass (layer, head) pairs to patch together.")
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    bad = [h for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(f"heads {bad} are outside the model's {n_layers} layers × {n_heads} heads.")
    batch = len(task)
    if positions is not None:
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.shape != (batch,):
            raise ValueError(f"positions must be one position per prompt, shape ({batch},), got {tuple(positions.shape)}.")
        width = task.clean.tokens.shape[1]
        if bool(((positions < 0) | (positions >= width)).any()):
            raise ValueError(f"positions must lie in 0..{width - 1}, got {positions.tolist()}.")
    names = {f"blocks.{layer}.attn.hook_z" for layer, _ in heads}
    _, cache = model.run_with_cache(task.clean.tokens, attention_mask=task.clean.attention_mask,
                                    names_filter=lambda n: n in names)

    def patcher(name: str, layer_heads: list[int]) -> Callable[..., torch.Tensor]:
        # bound per hook name: the bridge calls the hook with its canonical name, not the hook_z alias
        def patch(z: Float[torch.Tensor, "batch pos head d_head"], hook: Any = None) -> torch.Tensor:
            clean_z = cache[name].to(z.device)
            z = z.clone()
            if positions is None:
                z[:, :, layer_heads] = clean_z[:, :, layer_heads]
            else:
                rows, pos = torch.arange(batch, device=z.device), positions.to(z.device)
                for h in layer_heads:
                    z[rows, pos, h] = clean_z[rows, pos, h]
            return z

        return patch

    hooks = [*corruption.hooks, *[(name, patcher(name, [h for layer, h in heads if f"blocks.{layer}.attn.hook_z" == name]))
                                  for name in sorted(names)]]
    return float(metric(run_logits(model, corruption.tokens, hooks)))


@dataclass(frozen=True)
class HeadGroupRestoration:
    """A group of heads patched from the clean into the corrupted run: the logit difference it restores.

    Attributes:
        corrupted, patched, clean: raw logit difference on the corrupted run, the patched run and the
            clean run.
        restored: ``patched − corrupted`` (raw logit-difference units).
        fraction: ``restored / (clean − corrupted)`` (1 = the whole gap).
    """

    corrupted: float
    patched: float
    clean: float

    @property
    def restored(self) -> float:
        return self.patched - self.corrupted

    @property
    def fraction(self) -> float:
        gap = self.clean - self.corrupted
        return self.restored / gap if abs(gap) > 1e-9 else float("nan")


def head_group_restoration(
    model: Any,
    task: PatchingTask,
    corruption: Corruption,
    heads: Sequence[tuple[int, int]],
    *,
    positions: Int[torch.Tensor, "batch"] | None = None,
    base: Baselines | None = None,
) -> HeadGroupRestoration:
    """:func:`patch_head_group` read with the raw logit difference, with the clean and corrupted runs'."""
    base = base if base is not None else baselines(model, task, corruption)
    answers, batch = task.answer_tokens, task.clean

    def raw_logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, answers, batch=batch)

    patched = patch_head_group(model, task, corruption, raw_logit_diff, heads, positions=positions)
    return HeadGroupRestoration(base.corrupted["logit_diff"], patched, base.clean["logit_diff"])


def window_sweeps(
    model: Any,
    task: PatchingTask,
    corruption: Corruption,
    metric: Callable[[torch.Tensor], torch.Tensor],
    windows: Sequence[int],
    *,
    component: Literal["attn", "mlp"] = "mlp",
    progress: bool = False,
) -> dict[int, Any]:
    """Sliding-window patching (:func:`helpers.patching.patch_layer_window`, windows centred on each
    layer, all positions, denoising) for each window size → ``{window: LabelledTensor [layer]}``."""
    from helpers import patching

    with corrupted_input(model, corruption) as corrupted:
        return {
            int(w): patching.patch_layer_window(
                model, task.clean, corrupted, metric, component=component, window=int(w), progress=progress
            )
            for w in windows
        }


# --------------------------------------------------------------------------------------------------
# Sliding windows vs single layers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowInflation:
    """How a sliding window's effect compares with its layers' single-layer effects.

    Attributes:
        window: the window size.
        peak_layers: the layers of the window with the largest effect.
        window_effect: that window's patching effect.
        summed_single: the sum of the single-layer effects of the same layers.
        ratio: ``window_effect / summed_single`` — the peak window against the sum of *its own*
            layers (> 1: super-additive). Not the paper's 1.40 / 1.75 / 1.59, which compare the two
            sweeps' peaks (:func:`window_peak_ratio`).
        largest_single: the largest single-layer effect among the window's layers.
        ratio_to_largest_single: ``window_effect / largest_single`` — how much more important the
            region looks when patched as a window than any of its layers does alone.
    """

    window: int
    peak_layers: tuple[int, ...]
    window_effect: float
    summed_single: float
    ratio: float
    largest_single: float
    ratio_to_largest_single: float


def window_inflation(window_sweep: Any, single_sweep: Any, *, exclude_layers: Sequence[int] = ()) -> WindowInflation:
    """Compare the peak window of a :func:`helpers.patching.patch_layer_window` sweep with the
    single-layer effects (a ``window=1`` sweep / :func:`patch_layer_outputs`) of the same layers.

    Effects are the normalised metric (0 = corrupted, 1 = clean), so the corrupted baseline is 0 and
    single-layer effects can be summed. Windows containing any of ``exclude_layers`` are skipped
    (e.g. a layer that alone restores everything, which saturates every window around it).
    """
    windows = window_sweep.meta.get("windows")
    if windows is None:
        raise ValueError("window_sweep has no meta['windows']: pass the result of helpers.patching.patch_layer_window.")
    single = _values(single_sweep)
    layer_labels = [int(x) for x in single_sweep.labels[single_sweep.dims[0]]]
    if single.ndim != 1 or layer_labels != list(range(len(layer_labels))):
        raise ValueError("single_sweep must be a [layer] sweep over all layers (patch_layer_outputs).")
    values = _values(window_sweep)
    excluded = {int(x) for x in exclude_layers}
    allowed = [i for i, w in enumerate(windows) if not excluded & set(w)]
    if not allowed:
        raise ValueError(f"every window contains one of exclude_layers={sorted(excluded)}.")
    peak = max(allowed, key=lambda i: float(values[i]))
    layers = tuple(windows[peak])
    summed = float(single[list(layers)].sum())
    largest = float(single[list(layers)].max())
    effect = float(values[peak])
    return WindowInflation(
        window=max(len(w) for w in windows),
        peak_layers=layers,
        window_effect=effect,
        summed_single=summed,
        ratio=effect / summed if abs(summed) > 1e-9 else float("nan"),
        largest_single=largest,
        ratio_to_largest_single=effect / largest if abs(largest) > 1e-9 else float("nan"),
    )


@dataclass(frozen=True)
class WindowPeakRatio:
    """The paper's window-inflation measure (Zhang & Nanda 2024, sliding windows vs. single layers):
    the peak of the sliding-window sweep over the peak of the *summed* single-layer sweep, where the
    summed sweep's entry for each window centre is the sum of the single-layer effects of the same
    layers. The two peaks may sit at different centres. The paper reports 1.40 / 1.75 / 1.59 for windows
    3 / 5 / 10 (GPT-2 XL factual recall, MLP layers): > 1 means window patching inflates the effect.

    Attributes:
        window: the window size.
        window_peak: the largest window effect; ``window_peak_layers`` its layers.
        summed_peak: the largest sum of single-layer effects over a window; ``summed_peak_layers`` its layers.
        ratio: ``window_peak / summed_peak`` (NaN when the summed peak is 0).
    """

    window: int
    window_peak: float
    window_peak_layers: tuple[int, ...]
    summed_peak: float
    summed_peak_layers: tuple[int, ...]
    ratio: float


def summed_single_layer_sweep(single_sweep: Any, windows: Sequence[Sequence[int]]) -> Float[torch.Tensor, "window"]:
    """For each window (a list of layers), the sum of the single-layer effects of its layers."""
    single = _values(single_sweep)
    if single.ndim != 1:
        raise ValueError(f"single_sweep must be a [layer] sweep, got shape {tuple(single.shape)}.")
    bad = [w for w in windows if not w or min(w) < 0 or max(w) >= len(single)]
    if bad:
        raise ValueError(f"windows must be non-empty lists of layers in 0..{len(single) - 1}, got {bad[:3]}.")
    return torch.stack([single[list(w)].sum() for w in windows])


def window_peak_ratio(window_sweep: Any, single_sweep: Any, *, exclude_layers: Sequence[int] = ()) -> WindowPeakRatio:
    """The paper's ratio for one :func:`helpers.patching.patch_layer_window` sweep and the single-layer
    sweep of the same component (:class:`WindowPeakRatio`). Windows containing one of
    ``exclude_layers`` are left out of both peaks (the paper excludes none)."""
    windows = window_sweep.meta.get("windows")
    if windows is None:
        raise ValueError("window_sweep has no meta['windows']: pass the result of helpers.patching.patch_layer_window.")
    layer_labels = [int(x) for x in single_sweep.labels[single_sweep.dims[0]]]
    if layer_labels != list(range(len(layer_labels))):
        raise ValueError("single_sweep must be a [layer] sweep over all layers (patch_layer_outputs).")
    values = _values(window_sweep)
    summed = summed_single_layer_sweep(single_sweep, windows)
    excluded = {int(x) for x in exclude_layers}
    allowed = [i for i, w in enumerate(windows) if not excluded & set(w)]
    if not allowed:
        raise ValueError(f"every window contains one of exclude_layers={sorted(excluded)}.")
    top_window = max(allowed, key=lambda i: float(values[i]))
    top_summed = max(allowed, key=lambda i: float(summed[i]))
    window_peak, summed_peak = float(values[top_window]), float(summed[top_summed])
    return WindowPeakRatio(
        window=max(len(w) for w in windows),
        window_peak=window_peak,
        window_peak_layers=tuple(windows[top_window]),
        summed_peak=summed_peak,
        summed_peak_layers=tuple(windows[top_summed]),
        ratio=window_peak / summed_peak if abs(summed_peak) > 1e-9 else float("nan"),
    )


# --------------------------------------------------------------------------------------------------
# What a metric misses
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricBlindSpot:
    """The component with the most negative effect under metric A, and its effect under metric B."""

    index: tuple[int, ...]
    effect_a: float
    effect_b: float

    @property
    def ratio(self) -> float:
        """``|effect_b| / |effect_a|`` (near 0: metric B barely sees what metric A calls harmful)."""
        return abs(self.effect_b) / abs(self.effect_a) if self.effect_a != 0 else float("nan")


def most_negative_component(sweep_a: Any, sweep_b: Any) -> MetricBlindSpot:
    """The most negative entry of ``sweep_a`` (e.g. a negative name mover under the logit difference)
    and the same component's entry in ``sweep_b`` (e.g. under the probability metric).

    Both sweeps must cover the same components (same shape and labels)."""
    a, b = _values(sweep_a), _values(sweep_b)
    if a.shape != b.shape:
        raise ValueError(f"the sweeps cover different components: shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    (index,) = top_indices(a, 1, by="-value")
    return MetricBlindSpot(index=index, effect_a=float(a[index]), effect_b=float(b[index]))


def restrict_layers(sweep: Any, layers: Sequence[int]) -> Any:
    """The rows of a ``[layer, ...]`` LabelledTensor for ``layers`` (by layer label)."""
    from helpers.labelled_tensor import LabelledTensor

    labels = [int(x) for x in sweep.labels["layer"]]
    rows = [labels.index(int(layer)) for layer in layers]
    new_labels = {**sweep.labels, "layer": [sweep.labels["layer"][r] for r in rows]}
    return LabelledTensor(sweep.values[rows], sweep.dims, new_labels, dict(sweep.meta))


def baselines_table(rows: dict[tuple[str, str], Baselines]) -> Any:
    """A DataFrame of clean/corrupted baselines, one row per ``(task, corruption)`` key."""
    import pandas as pd

    records = []
    for (task_name, corruption_name), base in rows.items():
        records.append(
            {
                "task": task_name,
                "corruption": corruption_name,
                "logit diff (clean)": round(base.clean["logit_diff"], 3),
                "logit diff (corrupted)": round(base.corrupted["logit_diff"], 3),
                "p(answer) (clean)": round(base.clean["prob"], 4),
                "p(answer) (corrupted)": round(base.corrupted["prob"], 4),
                "KL(clean‖corrupted)": round(base.corrupted["kl"], 3),
            }
        )
    return pd.DataFrame(records)
