"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild"): data and analysis.

API at a glance::

    from helpers.studies.ioi import make_ioi_dataset
    data = make_ioi_dataset(model, 64, seed=0, templates="mixed")   # "BABA" | "ABBA" | "mixed" | [str, ...]
    data.prompts[0]          # 'Then, Kevin and Laura went to the store. Kevin gave a ring to'
    data.batch               # TokenBatch (left padded, with attention mask): pass data.batch.attention_mask!
    data.answer_tokens       # [batch, 2] ids of (IO, S) with the leading space, read at the last position
    data.io_names, data.s_names
    data.word_positions["IO"|"S1"|"S2"|"S1+1"|"END"]   # [batch] indices into data.batch.tokens
    corrupted = data.abc()   # the ABC distribution: same templates/places/objects, three fresh names
    swapped = data.swap_names()  # IO and S exchanged everywhere (logit diff flips sign)
    data.template_groups     # [batch] id of (template, order): prompts of a group are position-aligned

The generator
-------------
A prompt is one of the paper's 15 templates with the answer (the indirect object, IO) removed from
the end. In the **BABA** order the subject S comes first ("Then, [S] and [IO] went to the [PLACE].
[S] gave a [OBJECT] to"); **ABBA** swaps the first two names ("Then, [IO] and [S] ..."). The model
should continue with `` IO``. Names, places and objects are drawn with a seeded ``random.Random``.

Names are kept only if they are **one token** of the model's tokenizer in the form they take in the
prompt: with the leading space (" Mary") wherever the template puts a space before the slot, and
without it ("Mary") where a name opens the prompt (custom templates may do that; the paper's do not).
Places and objects are filtered the same way, so every prompt of one template has the same length:
after left padding, prompts of one template are aligned position by position, which is what
per-template mean ablation needs. Every name position is checked after tokenization (the name's
token must sit where the template says); a tokenizer that merges a name with its neighbours raises a
clear error instead of silently shifting positions.

Answers: ``answer_tokens[:, 0]`` is `` IO`` and ``answer_tokens[:, 1]`` is `` S`` (with the leading
space, as the model would emit them after "to"). :func:`helpers.metrics.logit_diff` reads them at
each prompt's last position.

Analysis (the notebook ``02_ioi_circuit`` uses these; patching sweeps themselves come from
:mod:`helpers.patching`, direct logit attribution from :mod:`helpers.attribution`)::

    ioi_baseline(model, data)                    # logit diff, fraction IO > S, P(IO), P(S)
    attention_scores(model, data)                # [layer, head] END->IO, END->S2, S2->S1+1, S2->S1, prev token
    copy_scores(model, heads, names)             # the paper's copy score (negative=True for negative movers)
    in_context_copy_scores(model, heads, data)   # the same on the residual the head reads at IO
    direct_effect_classes / s_inhibition_heads / pattern_classes   # head classes from explicit HeadClassRules
    circuit = circuit_from_classes(classes)      # head -> word positions where it is kept
    faithfulness(model, data, data.abc(), circuit)          # F(M), F(C), F(C)/F(M)
    minimality_scores(...), completeness_scores(...)        # the paper's Section 4 checks
    backup = backup_name_movers(model, data, data.abc(), name_movers)  # §3.4 / App. F: knock out, who takes over
    backup.ld_after, backup.naive_expected_drop, backup.compensation, backup.risers(8), backup.plot()
    add_name_sentence(data, "IO")                # §4.4: "... Mary had a good day. John gave a drink to"
    name_sentence_effect(model, data).summary()  # Figure 8: plain / + S sentence / + IO sentence

Mean ablation here is the paper's: each head's output ``z`` is replaced by its mean over the ABC
prompts **of the same template, at the same position** (:func:`template_mean_z`,
:func:`mean_ablation_hooks`). :mod:`helpers.ablation` averages over all tokens of a reference batch,
which is not the same intervention, hence the IOI-specific hooks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float, Int

from helpers.prompts import TokenBatch, tokenize

# --------------------------------------------------------------------------------------------------
# Templates, names, places, objects
# --------------------------------------------------------------------------------------------------

#: The paper's 15 templates in the BABA order (Wang et al. 2022, Figure 14 / Appendix E):
#: ``[B]`` is the subject S (repeated), ``[A]`` the indirect object IO. The prompt ends where the
#: answer `` [A]`` would follow.
BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)


def _to_abba(template: str) -> str:
    """Swap the first ``[B]`` and the first ``[A]`` (the first clause): BABA -> ABBA."""
    first_b, first_a = template.index("[B]"), template.index("[A]")
    if not first_b < first_a:
        raise ValueError(f"not a BABA template (first [B] must precede first [A]): {template!r}")
    return template[:first_b] + "[A]" + template[first_b + 3 : first_a] + "[B]" + template[first_a + 3 :]


#: The same templates in the ABBA order (IO first, then S, then S again).
ABBA_TEMPLATES: tuple[str, ...] = tuple(_to_abba(t) for t in BABA_TEMPLATES)

#: The paper's 8 places and 8 objects.
PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

#: Candidate first names (common English names, a superset of what survives the one-token filter).
CANDIDATE_NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amanda", "Amy", "Andrew", "Andy", "Angela", "Anna",
    "Anne", "Anthony", "Arthur", "Ben", "Beth", "Bill", "Bob", "Brian", "Carl", "Carol", "Charles",
    "Charlie", "Chris", "Christina", "Claire", "Daniel", "Dan", "David", "Dean", "Diana", "Edward",
    "Elizabeth", "Emily", "Emma", "Eric", "Frank", "Fred", "Gary", "George", "Grace", "Greg", "Harry",
    "Helen", "Henry", "Jack", "Jacob", "James", "Jane", "Jason", "Jeff", "Jennifer", "Jessica", "Jim",
    "Joe", "John", "Jonathan", "Joseph", "Josh", "Julia", "Justin", "Karen", "Kate", "Kelly", "Kevin",
    "Kim", "Laura", "Leo", "Linda", "Lisa", "Louis", "Lucy", "Luke", "Maria", "Mark", "Martin", "Mary",
    "Matt", "Max", "Michael", "Michelle", "Mike", "Nancy", "Nick", "Oliver", "Paul", "Peter", "Rachel",
    "Richard", "Robert", "Ryan", "Sam", "Sarah", "Scott", "Sean", "Simon", "Sophie", "Stephen", "Steve",
    "Susan", "Thomas", "Tim", "Tom", "Tony", "Victoria", "William",
)

TemplateOrder = Literal["BABA", "ABBA", "mixed"]
_NAME_SLOTS = ("[A]", "[B]", "[C]")
#: Positions reported in :attr:`IOIDataset.word_positions`.
WORD_POSITION_KEYS = ("IO", "S1", "S2", "S1+1", "END")


#: The slot of the extra name occurrence that :func:`add_name_sentence` inserts (not a template slot).
_EXTRA_SLOT = "[X]"


def _slot_layout(template: str, slots: Sequence[str] = _NAME_SLOTS) -> list[tuple[str, bool]]:
    """The name slots of ``template`` in reading order, each with "is preceded by a space"."""
    layout = []
    index = 0
    while True:
        hits = [(template.find(slot, index), slot) for slot in slots if template.find(slot, index) >= 0]
        if not hits:
            return layout
        start, slot = min(hits)
        layout.append((slot, start > 0 and template[start - 1] == " "))
        index = start + len(slot)


def _validate_template(template: str) -> None:
    layout = [slot for slot, _ in _slot_layout(template)]
    if layout.count("[A]") != 1 or layout.count("[B]") != 2 or "[C]" in layout:
        raise ValueError(
            f"An IOI template needs exactly one [A] (the indirect object) and two [B] (the subject), got "
            f"{template!r}. Leave the final answer out: the prompt ends where ' [A]' would follow."
        )
    for slot, spaced in _slot_layout(template):
        start = template.index(slot)
        if start > 0 and not spaced:
            raise ValueError(f"In {template!r} a name slot follows {template[start - 1]!r}; put a space before it.")


def _single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def single_token_words(tokenizer: Any, words: Sequence[str], *, with_space: bool = True, without_space: bool = False) -> list[str]:
    """The ``words`` that are one token in each required form (``" word"`` and/or ``"word"``)."""
    kept = []
    for word in words:
        if with_space and _single_token(tokenizer, " " + word) is None:
            continue
        if without_space and _single_token(tokenizer, word) is None:
            continue
        kept.append(word)
    return kept


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class IOIDataset:
    """A batch of IOI prompts with answers and the token positions of every name.

    Attributes:
        prompts: the prompt strings (no trailing answer).
        batch: their tokens and attention mask, left padded (:func:`helpers.prompts.tokenize`).
        answer_tokens: ``[batch, 2]`` ids of `` IO`` and `` S`` (the names in the IO and first S
            slot; for :meth:`abc` data these are the names that happen to sit in those slots).
        io_names, s_names: the IO and subject names (``s2_names`` is the name in the second subject
            slot: equal to ``s_names`` for IOI prompts, a third name for ABC prompts).
        orders: ``"BABA"`` or ``"ABBA"`` per prompt.
        template_ids: index of the template in :data:`BABA_TEMPLATES`/:data:`ABBA_TEMPLATES` (or in the
            custom template list).
        templates: the template string of each prompt.
        places, objects: the filled-in place and object of each prompt.
        word_positions: ``{"IO", "S1", "S2", "S1+1", "END"}`` → ``[batch]`` indices into
            ``batch.tokens`` (they include the left padding and the BOS token).
        template_groups: ``[batch]`` id of each prompt's (order, template): prompts with the same id
            have the same length and hence identical positions.
        name_pool: the names the dataset draws from (one token each for this tokenizer).
        seed: the seed it was drawn with.
        kind: ``"IOI"``, ``"ABC"`` or ``"IOI (names swapped)"``.
    """

    prompts: list[str]
    batch: TokenBatch
    answer_tokens: Int[torch.Tensor, "batch 2"]
    io_names: list[str]
    s_names: list[str]
    s2_names: list[str]
    orders: list[str]
    template_ids: list[int]
    templates: list[str]
    places: list[str]
    objects: list[str]
    word_positions: dict[str, Int[torch.Tensor, "batch"]]
    template_groups: Int[torch.Tensor, "batch"]
    name_pool: list[str]
    seed: int
    kind: str = "IOI"
    model: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def tokens(self) -> Int[torch.Tensor, "batch pos"]:
        return self.batch.tokens

    @property
    def attention_mask(self) -> Int[torch.Tensor, "batch pos"]:
        return self.batch.attention_mask

    @property
    def io_tokens(self) -> Int[torch.Tensor, "batch"]:
        return self.answer_tokens[:, 0]

    @property
    def s_tokens(self) -> Int[torch.Tensor, "batch"]:
        return self.answer_tokens[:, 1]

    def abc(self, *, seed: int | None = None) -> "IOIDataset":
        """The ABC corruption: each prompt with its three name slots filled by three fresh names.

        Same template, order, place and object per prompt; the IO, S1 and S2 slots get three
        distinct names, none equal to that prompt's IO or S ("Then, Kevin and Laura went to the
        store. Kevin gave a ring to" -> "Then, Tom and Amy went to the store. Paul gave a ring to").
        Every token position is the same as in ``self`` (checked), so position-wise patching between
        the two is aligned. The result's ``io_names``/``s_names``/``s2_names`` are the names in the
        IO, S1 and S2 slots; keep using ``self.answer_tokens`` in metrics.
        """
        rng = random.Random(self.seed + 1 if seed is None else seed)
        fills = []
        for io, s in zip(self.io_names, self.s_names):
            pool = [n for n in self.name_pool if n not in (io, s)]
            fills.append(tuple(rng.sample(pool, 3)))
        return self._refill([f[0] for f in fills], [f[1] for f in fills], [f[2] for f in fills], "ABC")

    def swap_names(self) -> "IOIDataset":
        """IO and S exchanged in every prompt (the "flipped" corruption: the right answer becomes S)."""
        return self._refill(self.s_names, self.io_names, self.io_names, "IOI (names swapped)")

    def _refill(self, io_names: list[str], s1_names: list[str], s2_names: list[str], kind: str) -> "IOIDataset":
        if any(_EXTRA_SLOT in t for t in self.templates):
            raise ValueError(
                f"abc()/swap_names() are not defined for prompts with an inserted name sentence ({self.kind!r}); "
                "corrupt the original dataset and call add_name_sentence on that instead."
            )
        prompts = [
            _fill(t, io, s1, s2, place, obj)
            for t, io, s1, s2, place, obj in zip(self.templates, io_names, s1_names, s2_names, self.places, self.objects)
        ]
        other = _build(self.model, prompts, io_names, s1_names, s2_names, self.templates)
        if other.batch.tokens.shape != self.batch.tokens.shape or any(
            not torch.equal(other.word_positions[k], self.word_positions[k]) for k in WORD_POSITION_KEYS
        ):
            raise RuntimeError("the refilled prompts are not position-aligned with the originals (tokenizer merges names?)")
        return replace(
            self, prompts=prompts, batch=other.batch, answer_tokens=other.answer_tokens, io_names=list(io_names),
            s_names=list(s1_names), s2_names=list(s2_names), kind=kind,
        )

    def __getitem__(self, index: slice | Sequence[int] | torch.Tensor) -> "IOIDataset":
        """A sub-dataset (``data[:8]``, ``data[[0, 3]]``). Padding columns are kept as they are."""
        if isinstance(index, int):
            index = [index]
        rows = list(range(len(self)))[index] if isinstance(index, slice) else [int(i) for i in index]
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.batch.tokens.device)
        return replace(
            self, prompts=pick(self.prompts), batch=self.batch[rows_t], answer_tokens=self.answer_tokens[rows_t],
            io_names=pick(self.io_names), s_names=pick(self.s_names), s2_names=pick(self.s2_names),
            orders=pick(self.orders), template_ids=pick(self.template_ids), templates=pick(self.templates),
            places=pick(self.places), objects=pick(self.objects),
            word_positions={k: v[rows_t.to(v.device)] for k, v in self.word_positions.items()},
            template_groups=self.template_groups[rows_t.to(self.template_groups.device)],
        )


def _fill(template: str, io: str, s1: str, s2: str, place: str, obj: str) -> str:
    """Fill a template; the first ``[B]`` gets ``s1`` and the second ``s2``."""
    text = template.replace("[PLACE]", place).replace("[OBJECT]", obj).replace("[A]", io)
    first = text.index("[B]")
    text = text[:first] + s1 + text[first + 3 :]
    return text.replace("[B]", s2)


def _build(
    model: Any, prompts: list[str], io_names: list[str], s1_names: list[str], s2_names: list[str], templates: list[str],
    extra_names: list[str] | None = None,
) -> "_Built":
    """Tokenize, read off answers and locate each name's token (checked against the template).

    With ``extra_names``, each template also has one ``[X]`` slot (an extra occurrence of a name,
    :func:`add_name_sentence`), located as ``word_positions["extra"]``."""
    tokenizer = model.tokenizer
    batch = tokenize(model, prompts)
    width = batch.tokens.shape[1]
    pad = (width - batch.lengths).tolist()
    keys = WORD_POSITION_KEYS + (("extra",) if extra_names is not None else ())
    slots = _NAME_SLOTS + ((_EXTRA_SLOT,) if extra_names is not None else ())
    extras = extra_names if extra_names is not None else [None] * len(prompts)
    positions: dict[str, list[int]] = {k: [] for k in keys}
    answers = []
    for row, (template, io, s1, s2, extra) in enumerate(zip(templates, io_names, s1_names, s2_names, extras)):
        expected = []
        b_seen = 0
        for slot, spaced in _slot_layout(template, slots):
            if slot == _EXTRA_SLOT:
                name, role = extra, "extra"
            elif slot == "[A]":
                name, role = io, "IO"
            else:
                name, role = (s1, "S1") if b_seen == 0 else (s2, "S2")
                b_seen += 1
            token = _single_token(tokenizer, (" " if spaced else "") + name)
            if token is None:
                raise ValueError(
                    f"{name!r} is not one token {'with' if spaced else 'without'} a leading space for this tokenizer; "
                    "use names from single_token_words(...)."
                )
            expected.append((role, token))
        row_ids = batch.tokens[row, pad[row]:].tolist()
        found = _locate(row_ids, expected)
        if found is None:
            raise ValueError(
                f"Could not find the name tokens of {prompts[row]!r} where the template puts them "
                f"({[tokenizer.decode([t]) for _, t in expected]} in {[tokenizer.decode([t]) for t in row_ids]}). "
                "The tokenizer merges a name with its neighbour; choose other names or templates."
            )
        for role, index in found.items():
            positions[role].append(pad[row] + index)
        positions["S1+1"].append(pad[row] + found["S1"] + 1)
        positions["END"].append(width - 1)
        answers.append([_single_token(tokenizer, " " + io), _single_token(tokenizer, " " + s1)])
        if None in answers[-1]:
            raise ValueError(f"the answers ' {io}' / ' {s1}' must be single tokens (with the leading space).")
    device = batch.tokens.device
    return _Built(
        batch,
        torch.tensor(answers, dtype=torch.long, device=device),
        {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in positions.items()},
    )


@dataclass
class _Built:
    batch: TokenBatch
    answer_tokens: torch.Tensor
    word_positions: dict[str, torch.Tensor]


def _locate(ids: list[int], expected: list[tuple[str, int]]) -> dict[str, int] | None:
    """Match the expected name tokens, in order, to positions in ``ids`` (each name token must occur
    as often as the template has slots for that name, so the match is unambiguous)."""
    wanted = {token for _, token in expected}
    hits = [i for i, t in enumerate(ids) if t in wanted]
    if len(hits) != len(expected) or any(ids[i] != token for i, (_, token) in zip(hits, expected)):
        return None
    return {role: i for i, (role, _) in zip(hits, expected)}


def make_ioi_dataset(
    model: Any,
    n_prompts: int,
    *,
    seed: int = 0,
    templates: TemplateOrder | Sequence[str] = "mixed",
    names: Sequence[str] | None = None,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
) -> IOIDataset:
    """Draw ``n_prompts`` IOI prompts for ``model`` (seeded) with answers and name positions.

    Args:
        model: the bridge (its tokenizer filters the words and tokenizes the prompts).
        n_prompts: how many prompts (>= 1).
        seed: seeds template, name, place and object choice (``random.Random(seed)``).
        templates: ``"BABA"`` (S first: the paper's main distribution), ``"ABBA"``, ``"mixed"``
            (half of each, in a seeded random order), or your own list of BABA-style templates
            (one ``[A]``, two ``[B]``, optional ``[PLACE]``/``[OBJECT]``, no trailing answer).
        names: candidate names (default :data:`CANDIDATE_NAMES`); those that are not one token in
            the form the templates need are dropped.
        places, objects: candidate fillers, filtered to one token with a leading space.

    Returns:
        An :class:`IOIDataset`; ``.abc()`` gives its ABC corruption.
    """
    if not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}.")
    if isinstance(templates, str):
        if templates not in ("BABA", "ABBA", "mixed"):
            raise ValueError(f"templates must be 'BABA', 'ABBA', 'mixed' or a list of templates, got {templates!r}.")
        order_choice = templates
        baba = list(BABA_TEMPLATES)
    else:
        baba = list(templates)
        if not baba:
            raise ValueError("templates=[] is empty: pass at least one template.")
        order_choice = "BABA"
    for t in baba:
        _validate_template(t)
    abba = [_to_abba(t) for t in baba]
    tokenizer = model.tokenizer

    needs_bare = any(not spaced for t in baba + abba for _, spaced in _slot_layout(t))
    pool = single_token_words(tokenizer, CANDIDATE_NAMES if names is None else names, with_space=True, without_space=needs_bare)
    if len(pool) < 5:
        raise ValueError(
            f"Only {len(pool)} of the candidate names are single tokens for this tokenizer ({pool}); need >= 5 "
            "(3 for ABC prompts + the 2 names of the prompt). Pass names=[...] with common first names."
        )
    place_pool = single_token_words(tokenizer, places)
    object_pool = single_token_words(tokenizer, objects)
    uses = lambda key: any(key in t for t in baba)  # noqa: E731
    if uses("[PLACE]") and not place_pool:
        raise ValueError(f"none of places={list(places)} is one token (with a leading space) for this tokenizer.")
    if uses("[OBJECT]") and not object_pool:
        raise ValueError(f"none of objects={list(objects)} is one token (with a leading space) for this tokenizer.")

    rng = random.Random(seed)
    if order_choice == "mixed":
        orders = ["BABA"] * ((n_prompts + 1) // 2) + ["ABBA"] * (n_prompts // 2)
        rng.shuffle(orders)
    else:
        orders = [order_choice] * n_prompts
    prompts, ios, ss, tids, tpls, pls, objs = [], [], [], [], [], [], []
    for order in orders:
        tid = rng.randrange(len(baba))
        template = (baba if order == "BABA" else abba)[tid]
        io, s = rng.sample(pool, 2)
        place = rng.choice(place_pool) if place_pool else ""
        obj = rng.choice(object_pool) if object_pool else ""
        prompts.append(_fill(template, io, s, s, place, obj))
        ios.append(io), ss.append(s), tids.append(tid), tpls.append(template), pls.append(place), objs.append(obj)
    built = _build(model, prompts, ios, ss, ss, tpls)
    group_keys = sorted(set(zip(orders, tids)))
    groups = torch.tensor([group_keys.index(k) for k in zip(orders, tids)], dtype=torch.long, device=built.batch.tokens.device)
    return IOIDataset(
        prompts=prompts, batch=built.batch, answer_tokens=built.answer_tokens, io_names=ios, s_names=ss,
        s2_names=list(ss), orders=orders, template_ids=tids, templates=tpls, places=pls, objects=objs,
        word_positions=built.word_positions, template_groups=groups, name_pool=pool, seed=seed, model=model,
    )


# --------------------------------------------------------------------------------------------------
# Adversarial prompts: an extra occurrence of a name (the paper's Section 4.4 and Appendix L)
# --------------------------------------------------------------------------------------------------

#: The paper's natural sentences (Appendix L, Figure 21) that add one more occurrence of a name,
#: "chosen to be independent of the context". ``[A]`` is the name that gets repeated.
NAME_SENTENCES: tuple[str, ...] = (
    "[A] had a good day.",
    "[A] was enjoying the situation.",
    "[A] was tired.",
    "[A] enjoyed being with a friend.",
    "[A] was an enthusiast person.",
)


def _sentence_insertion_point(template: str) -> int | None:
    """Where :func:`add_name_sentence` inserts its sentence: just after the last ``". "`` before the
    second subject slot (the start of the sentence that repeats S), or ``None`` if there is none."""
    s2 = template.rfind("[B]")
    end = template.rfind(". ", 0, s2)
    return None if end < 0 else end + 2


def accepts_name_sentence(template: str) -> bool:
    """Whether :func:`add_name_sentence` can insert a sentence into prompts of ``template``: the
    subject's second occurrence must open a new sentence ("... went to the store. [B] gave ..."). Of
    the paper's 15 templates, 9 qualify; the others continue the first clause with a comma."""
    return _sentence_insertion_point(template) is not None


def add_name_sentence(
    data: "IOIDataset", who: Literal["IO", "S"] = "IO", *, sentences: Sequence[str] = NAME_SENTENCES,
    seed: int | None = None,
) -> "IOIDataset":
    """The paper's adversarial prompts (§4.4): one more occurrence of IO, as a sentence of its own.

    Each prompt gets one of ``sentences`` (seeded choice, ``[A]`` filled with the prompt's IO name
    for ``who="IO"``, or with S for the paper's control, ``who="S"``), inserted right before the
    sentence that repeats the subject: "Then, John and Mary went to the store. **Mary had a good
    day.** John gave a drink to" (the paper's example, Appendix L). With ``who="IO"`` both names are
    now duplicated, so the duplicate-token / S-inhibition signal no longer singles out S; the paper
    reports the logit difference falling from 3.55 to 1.23 and S beating IO in 23.4% of prompts
    (0.7% on the plain prompts). With ``who="S"`` (S three times, IO once) it rises to 3.64 (S > IO in 0.4%).

    The answers stay (`` IO``, `` S``). The result is a full :class:`IOIDataset` (same names, places,
    objects, orders and ``template_ids``), with the name positions re-located after tokenization,
    ``word_positions["extra"]`` the inserted name, ``templates`` the new templates (with an ``[X]``
    slot) and ``template_groups`` recomputed (prompts of one template group are aligned again).
    ``abc()`` / ``swap_names()`` are not defined on it (corrupt the original instead), and it is not
    a valid ``data`` for :func:`mean_ablation_hooks` with a reference built from the original.

    Raises ``ValueError`` for prompts whose template has no sentence break before the repeated
    subject (:func:`accepts_name_sentence`); select the others first, e.g.
    ``data[[i for i, t in enumerate(data.templates) if accepts_name_sentence(t)]]``.
    """
    data = _check_dataset(data)
    if who not in ("IO", "S"):
        raise ValueError(f"who must be 'IO' (the adversarial prompts) or 'S' (the control), got {who!r}.")
    if _EXTRA_SLOT in "".join(data.templates):
        raise ValueError("data already has an inserted name sentence; pass the original dataset.")
    sentences = list(sentences)
    if not sentences or any(s.count("[A]") != 1 or any(k in s for k in ("[B]", "[C]", _EXTRA_SLOT)) for s in sentences):
        raise ValueError(f"each sentence needs exactly one [A] (the repeated name) and no other slot, got {sentences!r}.")
    bad = sorted({t for t in data.templates if not accepts_name_sentence(t)})
    if bad:
        raise ValueError(
            f"{len(bad)} template(s) of data have no sentence break before the repeated subject, e.g. {bad[0]!r}. "
            "Select the prompts whose template accepts_name_sentence(...) first."
        )
    rng = random.Random(data.seed + 2 if seed is None else seed)
    choices = [rng.randrange(len(sentences)) for _ in range(len(data))]
    templates = []
    for template, choice in zip(data.templates, choices):
        at = _sentence_insertion_point(template)
        templates.append(template[:at] + sentences[choice].replace("[A]", _EXTRA_SLOT) + " " + template[at:])
    extra = list(data.io_names if who == "IO" else data.s_names)
    prompts = [
        _fill(t, io, s1, s2, place, obj).replace(_EXTRA_SLOT, x)
        for t, io, s1, s2, place, obj, x in zip(templates, data.io_names, data.s_names, data.s2_names, data.places,
                                                 data.objects, extra)
    ]
    built = _build(data.model, prompts, data.io_names, data.s_names, data.s2_names, templates, extra_names=extra)
    keys = sorted(set(zip(data.orders, templates)))
    groups = torch.tensor([keys.index(k) for k in zip(data.orders, templates)], dtype=torch.long,
                          device=built.batch.tokens.device)
    return replace(
        data, prompts=prompts, batch=built.batch, answer_tokens=built.answer_tokens, templates=templates,
        word_positions=built.word_positions, template_groups=groups, kind=f"IOI + sentence repeating {who}",
    )


#: The three distributions :func:`name_sentence_effect` compares (the rows of the paper's Figure 8).
NAME_SENTENCE_DISTRIBUTIONS = ("IOI", "+ sentence repeating S", "+ sentence repeating IO")


@dataclass
class NameSentenceEffect:
    """Per-prompt logit differences on the plain prompts and on their two sentence-inserted variants.

    ``logit_diffs[d]`` is ``[batch]`` logit(IO) − logit(S) for ``d`` in
    :data:`NAME_SENTENCE_DISTRIBUTIONS`, the same prompts in the same order in each, so differences
    are paired. ``p_io[d]`` is the mean probability of IO.
    """

    logit_diffs: dict[str, Float[torch.Tensor, "batch"]]
    p_io: dict[str, float]

    def paired_difference(self, a: str, b: str) -> tuple[float, float]:
        """Mean over prompts of ``LD_a − LD_b`` and its standard error."""
        diff = (self.logit_diffs[a] - self.logit_diffs[b]).double()
        n = diff.numel()
        se = float(diff.std(unbiased=True) / n**0.5) if n > 1 else float("nan")
        return float(diff.mean()), se

    def summary(self) -> "pandas.DataFrame":  # noqa: F821
        """One row per distribution: mean logit difference (± s.e.), P(IO), fraction of prompts with S above IO."""
        import pandas as pd

        rows = []
        for name, ld in self.logit_diffs.items():
            rows.append({"distribution": name, "prompts": ld.numel(), "logit difference": float(ld.mean()),
                         "s.e.": float(ld.double().std() / ld.numel() ** 0.5) if ld.numel() > 1 else float("nan"),
                         "P(IO)": self.p_io[name], "fraction S > IO": float((ld < 0).double().mean())})
        return pd.DataFrame(rows)


@torch.no_grad()
def name_sentence_effect(model: Any, data: "IOIDataset", *, seed: int | None = None) -> NameSentenceEffect:
    """The paper's Figure 8 on ``data``: the plain prompts, the control with a sentence repeating S, and the
    adversarial prompts with a sentence repeating IO (:func:`add_name_sentence`, same ``seed`` so both
    variants get the same sentence). Prompts whose template takes no sentence are dropped first
    (:func:`accepts_name_sentence`); three forward passes."""
    from helpers.metrics import answer_prob, logit_diff

    data = _check_dataset(data)
    keep = [i for i, t in enumerate(data.templates) if accepts_name_sentence(t)]
    if not keep:
        raise ValueError("none of data's templates has a sentence break before the repeated subject (accepts_name_sentence).")
    plain = data[keep]
    sets = dict(zip(NAME_SENTENCE_DISTRIBUTIONS,
                    (plain, add_name_sentence(plain, "S", seed=seed), add_name_sentence(plain, "IO", seed=seed))))
    lds, p_io = {}, {}
    for name, d in sets.items():
        logits = model(d.batch.tokens, attention_mask=d.batch.attention_mask)
        lds[name] = logit_diff(logits, d.answer_tokens, batch=d.batch, reduce="none").detach().float().cpu()
        p_io[name] = answer_prob(logits, d.answer_tokens, batch=d.batch).item()
    return NameSentenceEffect(lds, p_io)


# ==================================================================================================
# Analysis: baseline, attention scores, copy scores
# ==================================================================================================

HeadIndex = tuple[int, int]


def _check_dataset(data: Any, argument: str = "data") -> "IOIDataset":
    if not isinstance(data, IOIDataset):
        raise TypeError(f"{argument} must be an IOIDataset from make_ioi_dataset(...), got {type(data).__name__}.")
    return data


@torch.no_grad()
def ioi_baseline(model: Any, data: IOIDataset, *, answer_tokens: torch.Tensor | None = None) -> dict[str, float]:
    """The model's IOI performance on ``data`` (the paper's Section 3 numbers).

    Returns ``{"logit_diff": mean logit(IO) - logit(S), "frac_io_above_s": fraction of prompts
    with logit(IO) > logit(S), "p_io": mean P(IO), "p_s": mean P(S)}`` at each prompt's last token.
    ``answer_tokens`` overrides ``data.answer_tokens`` (e.g. the clean answers on ABC prompts, the
    corrupted baseline of patching).
    """
    from helpers.metrics import answer_prob, logit_diff

    data = _check_dataset(data)
    answers = data.answer_tokens if answer_tokens is None else answer_tokens
    logits = model(data.batch.tokens, attention_mask=data.batch.attention_mask)
    per_prompt = logit_diff(logits, answers, batch=data.batch, reduce="none")
    return {
        "logit_diff": per_prompt.mean().item(),
        "frac_io_above_s": (per_prompt > 0).float().mean().item(),
        "p_io": answer_prob(logits, answers, batch=data.batch).item(),
        "p_s": answer_prob(logits, answers.flip(-1), batch=data.batch).item(),
    }


def direct_effect_concentration(direct_effect: Float[torch.Tensor, "layer head"], k: int) -> dict[str, Any]:
    """How concentrated the heads' direct effects are: the ``k`` heads with the largest |effect|,
    the share of the total |effect| of all heads they carry, and their mean relative depth
    (layer / (n_layers - 1): 1 = last layer)."""
    de = torch.as_tensor(direct_effect).float().cpu()
    n_layers, n_heads = de.shape
    if not 1 <= k <= de.numel():
        raise ValueError(f"k must be between 1 and {de.numel()} (the number of heads), got {k}.")
    order = de.abs().flatten().argsort(descending=True)[:k]
    heads = [divmod(int(i), n_heads) for i in order]
    share = float(de.abs().flatten()[order].sum() / de.abs().sum())
    depth = sum(l for l, _ in heads) / len(heads) / max(n_layers - 1, 1)
    return {"heads": heads, "share": share, "mean_relative_depth": depth}


def bar_chart(frame: "pandas.DataFrame", *, x: str, y: str, color: str | None = None, title: str = "",  # noqa: F821
              hline: float | None = None, y_label: str | None = None):
    """A plotly bar chart of a results table (e.g. minimality scores per head, coloured by class)."""
    import plotly.express as px

    fig = px.bar(frame, x=x, y=y, color=color, title=title, template="plotly_white")
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dash", line_color="grey")
    fig.update_layout(yaxis_title=y_label or y, xaxis_type="category")
    return fig


#: The attention scores :func:`attention_scores` computes: ``"query->key"`` between word positions.
ATTENTION_SCORE_KEYS = ("END->IO", "END->S1", "END->S2", "END->S", "S2->S1+1", "S2->S1", "previous token")


@torch.no_grad()
def attention_scores(model: Any, data: IOIDataset) -> dict[str, Float[torch.Tensor, "layer head"]]:
    """Mean attention probabilities of every head between the IOI word positions.

    * ``"END->IO"``, ``"END->S1"``, ``"END->S2"``, ``"END->S"`` (= S1 + S2): from the last token
      to the names (name movers attend END→IO, S-inhibition heads END→S2);
    * ``"S2->S1+1"``: induction score (at S2, attend to the token after the earlier S1);
    * ``"S2->S1"``: duplicate-token score (at S2, attend to the earlier occurrence S1);
    * ``"previous token"``: mean attention from each real token to the token just before it (over
      every real query position after the first two, so the BOS sink does not count).

    One forward pass with only ``hook_pattern`` cached. Values are ``[layer, head]`` means over prompts.
    """
    data = _check_dataset(data)
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(data.batch.tokens, attention_mask=data.batch.attention_mask,
                                    names_filter=lambda n: n in names)
    rows = torch.arange(len(data), device=data.batch.tokens.device)
    pos = data.word_positions
    width = data.batch.tokens.shape[1]
    first_real = width - data.batch.lengths  # left padding
    query = torch.arange(width, device=rows.device)
    prev_mask = (query[None, :] >= (first_real[:, None] + 2)).float()  # [batch, query]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ATTENTION_SCORE_KEYS}
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float()  # [batch, head, q, k]
        at = lambda q, k: pattern[rows, :, pos[q], pos[k]].mean(0)  # noqa: E731
        out["END->IO"].append(at("END", "IO"))
        out["END->S1"].append(at("END", "S1"))
        out["END->S2"].append(at("END", "S2"))
        out["END->S"].append(out["END->S1"][-1] + out["END->S2"][-1])
        out["S2->S1+1"].append(at("S2", "S1+1"))
        out["S2->S1"].append(at("S2", "S1"))
        sub_diagonal = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, head, q-1]: q attends q-1
        weights = prev_mask[:, None, 1:]
        out["previous token"].append((sub_diagonal * weights).sum((0, 2)) / weights.sum((0, 2)))
    return {k: torch.stack(v).cpu() for k, v in out.items()}


@torch.no_grad()
def name_token_residuals(model: Any, names: Sequence[str]) -> tuple[Float[torch.Tensor, "name d_model"], Int[torch.Tensor, "name"]]:
    """The residual stream of each `` name`` after the embedding and the first MLP (attention of
    block 0 switched off), as the paper's copy score uses it; with the names' token ids."""
    ids = [_single_token(model.tokenizer, " " + n) for n in names]
    if any(i is None for i in ids):
        raise ValueError(f"copy scores need one-token names; these are not: {[n for n, i in zip(names, ids) if i is None]}.")
    tokens = torch.tensor(ids, dtype=torch.long)[:, None]
    bos = model.tokenizer.bos_token_id
    if bos is not None and getattr(model.cfg, "default_prepend_bos", True):
        tokens = torch.cat([torch.full_like(tokens, bos), tokens], dim=1)
    tokens = tokens.to(model.cfg.device)
    zero_attention = ("blocks.0.hook_attn_out", lambda act, hook: torch.zeros_like(act))
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        store["resid"] = act[:, -1].detach().clone()

    model.run_with_hooks(tokens, attention_mask=torch.ones_like(tokens),
                         fwd_hooks=[zero_attention, ("blocks.0.hook_resid_post", keep)])
    return store["resid"], torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def _ov_copy_fraction(model: Any, layer: int, head: int, resid: Float[torch.Tensor, "n d_model"],
                      ids: Int[torch.Tensor, "n"], *, top_k: int, negative: bool) -> float:
    """Fraction of rows whose token ``ids[i]`` is in the ``top_k`` logits of ``resid[i]`` sent through the
    head's input norm, its OV circuit (query head ``h`` reads value head ``h // (n_heads // n_kv_heads)``),
    its post-attention norm when the model has one (Gemma-2/3), the final norm and the unembedding."""
    group = model.cfg.n_heads // (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    b_V = getattr(model, "b_V", None)
    x = model.blocks[layer].ln1(resid[None])[0]
    value = x @ model.W_V[layer, head // group]
    if b_V is not None:
        value = value + b_V[layer, head // group]
    out = value @ model.W_O[layer, head]
    post_norm = getattr(model.blocks[layer], "ln1_post", None)  # Gemma-2/3 normalise the attention output
    if post_norm is not None:
        out = post_norm(out[None])[0]
    if negative:
        out = -out
    logits = model.unembed(model.ln_final(out[None]))[0]
    top = logits.topk(top_k, dim=-1).indices
    return (top == ids.to(top.device)[:, None]).any(-1).float().mean().item()


def _check_top_k(top_k: int, model: Any) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= model.cfg.d_vocab:
        raise ValueError(f"top_k must be an int in 1..{model.cfg.d_vocab} (the vocabulary), got {top_k!r}; the paper uses 5.")


@torch.no_grad()
def copy_scores(
    model: Any, heads: Sequence[HeadIndex], names: Sequence[str], *, top_k: int = 5, negative: bool = False
) -> dict[HeadIndex, float]:
    """The paper's copy score of each head: how often its OV circuit copies a name to the output.

    For every name: take its residual after the embedding and the first MLP
    (:func:`name_token_residuals`), apply the head's input norm, its value and output matrices (the
    head "attending fully" to that token), then the final norm and the unembedding, and check
    whether the name's own token is among the ``top_k`` logits. The score is the fraction of names
    for which it is. ``negative=True`` flips the sign of the OV output first (negative name movers
    write *minus* the name). Grouped-query attention: query head ``h`` reads value head
    ``h // (n_heads // n_kv_heads)``. A post-attention norm (Gemma-2/3) is applied to the head's
    output before the final norm, as the model does.

    The residual after the first MLP stands in for "the name" only where a name's identity is readable
    there (GPT-2, SmolLM2). Where it is not (Gemma-3-270M: no head scores above 0 although its heads copy
    names in context), :func:`in_context_copy_scores` reads the residual the head actually sees.
    """
    _check_top_k(top_k, model)
    resid, ids = name_token_residuals(model, names)
    return {(layer, head): _ov_copy_fraction(model, layer, head, resid, ids, top_k=top_k, negative=negative)
            for layer, head in heads}


@torch.no_grad()
def in_context_copy_scores(
    model: Any, heads: Sequence[HeadIndex], data: IOIDataset, *, top_k: int = 5, negative: bool = False,
    position: str = "IO",
) -> dict[HeadIndex, float]:
    """The copy score on the residual stream each head actually reads in the IOI prompts.

    As :func:`copy_scores`, but the input to the head's OV circuit is ``resid_pre`` of the head's own
    layer at the ``position`` word (default the indirect object, the name a name mover attends to) of every
    prompt of ``data``, and the target is that position's token. It asks "does this head copy the name it
    attends to, as the name is represented when the head reads it?" — the paper's question without the
    assumption that a name is represented at mid depth as it is after the first MLP. The score is the
    fraction of prompts whose name is in the ``top_k`` logits.
    """
    _check_top_k(top_k, model)
    if position not in data.word_positions:
        raise ValueError(f"position must be one of {sorted(data.word_positions)}, got {position!r}.")
    layers = sorted({int(layer) for layer, _ in heads})
    bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise ValueError(f"heads name layers {bad}, outside the model's 0..{model.cfg.n_layers - 1}.")
    tokens = data.batch.tokens
    where = data.word_positions[position].to(tokens.device)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    ids = tokens[rows, where]
    resid: dict[int, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        resid[int(hook.name.split(".")[1])] = act[rows, where].detach().clone()

    model.run_with_hooks(tokens, attention_mask=data.batch.attention_mask,
                         fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", keep) for layer in layers])
    return {(layer, head): _ov_copy_fraction(model, layer, head, resid[layer], ids, top_k=top_k, negative=negative)
            for layer, head in heads}


# ==================================================================================================
# Circuit faithfulness: mean ablation over the ABC distribution, per template and position
# ==================================================================================================

#: Where each head class acts (the paper's Section 4 circuit): a head in the circuit keeps its own
#: output at these word positions and is mean-ablated everywhere else.
CLASS_POSITIONS: dict[str, tuple[str, ...]] = {
    "name mover": ("END",),
    "negative name mover": ("END",),
    "backup name mover": ("END",),
    "other direct effect": ("END",),
    "s-inhibition": ("END",),
    "induction": ("S2",),
    "duplicate token": ("S2",),
    "previous token": ("S1+1",),
}

Circuit = dict[HeadIndex, tuple[str, ...]]
"""A circuit: each kept head → the word positions (keys of :attr:`IOIDataset.word_positions`) where it is kept."""


def circuit_from_classes(classes: dict[str, Sequence[HeadIndex]], positions: dict[str, Sequence[str]] | None = None) -> Circuit:
    """Turn ``{class: [heads]}`` into a :data:`Circuit` using :data:`CLASS_POSITIONS` (or ``positions``).

    A head in several classes is kept at the union of their positions.
    """
    table = {**CLASS_POSITIONS, **(positions or {})}
    circuit: dict[HeadIndex, set[str]] = {}
    for cls, heads in classes.items():
        if cls not in table:
            raise ValueError(f"no positions known for class {cls!r}; pass positions={{{cls!r}: ('END',)}}.")
        for head in heads:
            circuit.setdefault((int(head[0]), int(head[1])), set()).update(table[cls])
    return {head: tuple(sorted(pos)) for head, pos in sorted(circuit.items())}


@torch.no_grad()
def template_mean_z(model: Any, reference: IOIDataset) -> dict[int, Float[torch.Tensor, "group pos head d_head"]]:
    """Every head's output ``z`` (``blocks.{l}.attn.hook_z``) averaged over the ``reference`` prompts
    of each template group, per position: ``{layer: [group, pos, head, d_head]}``.

    Prompts of one group share template and length, so with left padding position ``p`` is the same
    word for all of them: this is the paper's "mean over the ABC distribution" at each position.
    """
    reference = _check_dataset(reference, "reference")
    names = {f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(reference.batch.tokens, attention_mask=reference.batch.attention_mask,
                                    names_filter=lambda n: n in names)
    groups = reference.template_groups
    n_groups = int(groups.max()) + 1
    one_hot = torch.nn.functional.one_hot(groups, n_groups).float()  # [batch, group]
    counts = one_hot.sum(0).clamp(min=1)
    return {
        layer: torch.einsum("bg,bphd->gphd", one_hot, cache[f"blocks.{layer}.attn.hook_z"].float()) / counts[:, None, None, None]
        for layer in range(model.cfg.n_layers)
    }


def _group_keys(data: IOIDataset) -> list[tuple[str, int]]:
    return [(o, t) for o, t in zip(data.orders, data.template_ids)]


def _reference_rows(data: IOIDataset, reference: IOIDataset) -> torch.Tensor:
    """For each prompt of ``data``, the template-group index in ``reference`` with the same template."""
    ref_index = {}
    for key, group in zip(_group_keys(reference), reference.template_groups.tolist()):
        ref_index[key] = group
    missing = sorted({k for k in _group_keys(data) if k not in ref_index})
    if missing:
        raise ValueError(f"reference has no prompts for templates {missing} of data; use reference=data.abc().")
    if reference.batch.tokens.shape[1] != data.batch.tokens.shape[1]:
        raise ValueError("reference and data are padded to different widths; build the reference with data.abc().")
    return torch.tensor([ref_index[k] for k in _group_keys(data)], dtype=torch.long, device=data.batch.tokens.device)


def mean_ablation_hooks(
    model: Any,
    data: IOIDataset,
    reference: IOIDataset,
    *,
    keep: Circuit | None = None,
    knock_out: Sequence[HeadIndex] = (),
    means: dict[int, torch.Tensor] | None = None,
) -> list[tuple[str, Any]]:
    """Hooks on every ``blocks.{l}.attn.hook_z`` that mean-ablate heads on ``data``'s prompts.

    What is ablated: a head's output ``z`` at a position is replaced by its mean over the
    ``reference`` (ABC) prompts of the same template at that position (:func:`template_mean_z`).

    * ``keep=None``: the full model, except the heads in ``knock_out`` (ablated at every position):
      the paper's ``M \\ K``.
    * ``keep=circuit``: **every** head is ablated except the circuit's heads at their positions;
      heads in ``knock_out`` are then removed from the circuit too: ``C \\ K``.

    MLPs, embeddings and the unembedding are never ablated (the circuit is made of heads).
    """
    data = _check_dataset(data)
    means = template_mean_z(model, reference) if means is None else means
    rows = _reference_rows(data, reference)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    batch, width = data.batch.tokens.shape
    device = data.batch.tokens.device
    # ablate[layer]: [batch, pos, head] bool
    if keep is None:
        ablate = torch.zeros(n_layers, batch, width, n_heads, dtype=torch.bool, device=device)
        for layer, head in knock_out:
            ablate[layer, :, :, head] = True
    else:
        ablate = torch.ones(n_layers, batch, width, n_heads, dtype=torch.bool, device=device)
        removed = {(int(l), int(h)) for l, h in knock_out}
        arange = torch.arange(batch, device=device)
        for (layer, head), positions in keep.items():
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ValueError(f"circuit head ({layer}, {head}) does not exist in a {n_layers}×{n_heads} model.")
            if (layer, head) in removed:
                continue
            for key in positions:
                if key not in data.word_positions:
                    raise ValueError(f"unknown position {key!r} for head ({layer}, {head}); use {WORD_POSITION_KEYS}.")
                ablate[layer, arange, data.word_positions[key], head] = False

    def make_hook(layer: int):
        mask = ablate[layer][..., None]  # [batch, pos, head, 1]
        mean = means[layer].to(device)[rows]  # [batch, pos, head, d_head]

        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            return torch.where(mask, mean.to(z.dtype), z)

        return hook

    return [(f"blocks.{layer}.attn.hook_z", make_hook(layer)) for layer in range(n_layers) if bool(ablate[layer].any())]


@torch.no_grad()
def ablated_logit_diff(
    model: Any, data: IOIDataset, reference: IOIDataset, *, keep: Circuit | None = None,
    knock_out: Sequence[HeadIndex] = (), means: dict[int, torch.Tensor] | None = None,
) -> float:
    """Mean logit difference on ``data`` under :func:`mean_ablation_hooks` (``F`` in the paper)."""
    from helpers.metrics import logit_diff

    hooks = mean_ablation_hooks(model, data, reference, keep=keep, knock_out=knock_out, means=means)
    logits = model.run_with_hooks(data.batch.tokens, attention_mask=data.batch.attention_mask, fwd_hooks=hooks)
    return logit_diff(logits, data.answer_tokens, batch=data.batch).item()


@dataclass
class FaithfulnessReport:
    """``F(M)``, ``F(C)`` and their ratio (the paper: 3.56, 3.10, 87%), plus the all-ablated floor."""

    full_model: float
    circuit: float
    everything_ablated: float

    @property
    def fraction_recovered(self) -> float:
        """``F(C) / F(M)``."""
        return self.circuit / self.full_model

    @property
    def gap(self) -> float:
        """``|F(M) - F(C)|``."""
        return abs(self.full_model - self.circuit)


def faithfulness(
    model: Any, data: IOIDataset, reference: IOIDataset, circuit: Circuit, *, means: dict[int, torch.Tensor] | None = None
) -> FaithfulnessReport:
    """How much of the logit difference the circuit alone keeps when everything else is mean-ablated."""
    means = template_mean_z(model, reference) if means is None else means
    full = ablated_logit_diff(model, data, reference, keep=None, means=means)
    kept = ablated_logit_diff(model, data, reference, keep=circuit, means=means)
    floor = ablated_logit_diff(model, data, reference, keep={}, means=means)
    return FaithfulnessReport(full, kept, floor)


def minimality_scores(
    model: Any, data: IOIDataset, reference: IOIDataset, circuit: Circuit, classes: dict[str, Sequence[HeadIndex]],
    *, means: dict[int, torch.Tensor] | None = None, progress: bool = True,
) -> "pandas.DataFrame":  # noqa: F821
    """The paper's minimality check: for each circuit head ``v``, ``|F(C \\ (K ∪ {v})) - F(C \\ K)|``.

    ``K`` is chosen as in the paper's spirit, per head: the empty set, and the other heads of
    ``v``'s class (which can hide ``v``'s effect through redundancy, e.g. backup name movers); the
    larger of the two scores is reported. Returns a DataFrame (head, class, score, score / F(M)).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    means = template_mean_z(model, reference) if means is None else means
    full = ablated_logit_diff(model, data, reference, keep=None, means=means)
    f_circuit = ablated_logit_diff(model, data, reference, keep=circuit, means=means)
    head_class = {}
    for cls, heads in classes.items():
        for head in heads:
            head_class.setdefault((int(head[0]), int(head[1])), cls)
    rows = []
    cache: dict[frozenset, float] = {frozenset(): f_circuit}

    def f_without(removed: frozenset) -> float:
        if removed not in cache:
            cache[removed] = ablated_logit_diff(model, data, reference, keep=circuit, knock_out=sorted(removed), means=means)
        return cache[removed]

    for head in tqdm(list(circuit), desc="minimality", disable=not progress):
        cls = head_class.get(head, "?")
        same_class = frozenset(h for h, c in head_class.items() if c == cls and h != head and h in circuit)
        candidates = [frozenset()] + ([same_class] if same_class else [])
        scores = [abs(f_without(k | {head}) - f_without(k)) for k in candidates]
        best = max(range(len(scores)), key=scores.__getitem__)
        rows.append({"head": f"{head[0]}.{head[1]}", "class": cls, "score": scores[best],
                     "fraction_of_F(M)": scores[best] / full, "K": "same class" if best else "∅"})
    return pd.DataFrame(rows)


def completeness_scores(
    model: Any, data: IOIDataset, reference: IOIDataset, circuit: Circuit, classes: dict[str, Sequence[HeadIndex]],
    *, n_random: int = 5, seed: int = 0, means: dict[int, torch.Tensor] | None = None, progress: bool = True,
) -> "pandas.DataFrame":  # noqa: F821
    """The paper's completeness check: ``|F(C \\ K) - F(M \\ K)|`` for several knock-out sets ``K``.

    ``K`` ranges over the empty set, each class, the whole circuit and ``n_random`` random halves
    of the circuit (each head in with probability 1/2, seeded). A complete circuit has small values
    for every ``K``: knocking out the same heads hurts the circuit and the model alike.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    means = template_mean_z(model, reference) if means is None else means
    sets: list[tuple[str, list[HeadIndex]]] = [("∅", [])]
    sets += [(cls, [h for h in heads if h in circuit]) for cls, heads in classes.items() if heads]
    rng = random.Random(seed)
    members = list(circuit)
    for i in range(n_random):
        sets.append((f"random half {i + 1}", [h for h in members if rng.random() < 0.5]))
    rows = []
    for label, knock in tqdm(sets, desc="completeness", disable=not progress):
        f_c = ablated_logit_diff(model, data, reference, keep=circuit, knock_out=knock, means=means)
        f_m = ablated_logit_diff(model, data, reference, keep=None, knock_out=knock, means=means)
        rows.append({"K": label, "size": len(knock), "F(C\\K)": f_c, "F(M\\K)": f_m, "incompleteness": abs(f_c - f_m)})
    return pd.DataFrame(rows)


# ==================================================================================================
# Backup name movers: knock out the name movers, see who takes over (the paper's Section 3.4, App. F)
# ==================================================================================================


@dataclass
class BackupNameMovers:
    """What happens to the logit difference and to every head's direct effect when heads are knocked out.

    Attributes:
        knocked_out: the heads that were mean-ablated (at every position, :func:`mean_ablation_hooks`).
        ld_before, ld_after: mean logit difference of the clean model and with the knock-out (``F(M)``
            and ``F(M \\ K)``).
        dla_before, dla_after: ``[layer, head]`` direct logit attribution of every head to
            ``logit(IO) − logit(S)`` at END in the two runs (each with its own final-norm scale,
            :func:`helpers.attribution.direct_logit_attribution`). The knocked-out heads' ``dla_after``
            is the direct effect of the mean they were replaced by.
        naive_expected_drop: the knock-out's *direct* effect, ``Σ_K (DLA_clean(h) − DLA_clean(mean of h))``
            with every norm scale of the clean run: how much the logit difference would fall if nothing
            downstream reacted. For zero ablation this would be the heads' summed DLA
            (:attr:`knocked_out_dla`); the mean of a head over the ABC prompts also writes a little.
    """

    knocked_out: list[HeadIndex]
    ld_before: float
    ld_after: float
    dla_before: Float[torch.Tensor, "layer head"]
    dla_after: Float[torch.Tensor, "layer head"]
    naive_expected_drop: float

    @property
    def actual_drop(self) -> float:
        """``ld_before − ld_after``."""
        return self.ld_before - self.ld_after

    @property
    def naive_expected_ld(self) -> float:
        """The logit difference if nothing compensated: ``ld_before − naive_expected_drop``."""
        return self.ld_before - self.naive_expected_drop

    @property
    def knocked_out_dla(self) -> float:
        """The knocked-out heads' summed direct logit attribution in the clean run."""
        return float(sum(self.dla_before[l, h] for l, h in self.knocked_out))

    @property
    def compensation(self) -> float:
        """The share of the knock-out's direct effect the rest of the model gives back:
        ``1 − actual_drop / naive_expected_drop`` (0: none, 1: the logit difference does not move)."""
        if self.naive_expected_drop == 0:
            raise ValueError("the knocked-out heads have no direct effect: compensation is undefined.")
        return 1.0 - self.actual_drop / self.naive_expected_drop

    @property
    def rise(self) -> Float[torch.Tensor, "layer head"]:
        """``dla_after − dla_before`` per head."""
        return self.dla_after - self.dla_before

    def risers(self, k: int = 8, *, exclude: Sequence[HeadIndex] = ()) -> list[HeadIndex]:
        """The ``k`` heads (not knocked out, not in ``exclude``) whose direct effect rises the most."""
        skip = {(int(l), int(h)) for l, h in [*self.knocked_out, *exclude]}
        n_heads = self.rise.shape[1]
        order = [divmod(int(i), n_heads) for i in self.rise.flatten().argsort(descending=True)]
        return [h for h in order if h not in skip][:k]

    def backup_heads(self, *, exclude: Sequence[HeadIndex] = (), threshold: float = 0.02, max_heads: int = 8) -> list[HeadIndex]:
        """The paper's rule for backup name movers (App. F): after the knock-out, the heads that are in no
        other class (``exclude``) and write at least ``threshold`` × ``ld_before`` into the logit
        difference, largest first, at most ``max_heads`` (the paper kept eight, above 2%)."""
        skip = {(int(l), int(h)) for l, h in [*self.knocked_out, *exclude]}
        mask = self.dla_after >= threshold * abs(self.ld_before)
        return [h for h in _heads_where(mask, self.dla_after) if h not in skip][:max_heads]

    def table(self, heads: Sequence[HeadIndex]) -> "pandas.DataFrame":  # noqa: F821
        """One row per head: DLA before, after, and the rise."""
        import pandas as pd

        return pd.DataFrame([{"head": f"{l}.{h}", "DLA before": float(self.dla_before[l, h]),
                              "DLA after": float(self.dla_after[l, h]), "rise": float(self.rise[l, h])}
                             for l, h in heads])

    def plot(self, highlight: Sequence[HeadIndex] | None = None, *, title: str = ""):
        """Scatter of every head's DLA before (x) vs after (y) the knock-out, with ``y = x``; the knocked-out
        heads and ``highlight`` (default: the top 8 :meth:`risers`) are labelled."""
        import plotly.graph_objects as go

        highlight = self.risers(8) if highlight is None else [tuple(map(int, h)) for h in highlight]
        n_layers, n_heads = self.dla_before.shape
        every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
        groups = {"knocked out": [tuple(map(int, h)) for h in self.knocked_out]}
        groups["risers"] = [h for h in highlight if h not in groups["knocked out"]]
        groups["other heads"] = [h for h in every if h not in groups["knocked out"] and h not in groups["risers"]]
        style = {"other heads": dict(color="lightgrey", size=6), "risers": dict(color="#2ca02c", size=10),
                 "knocked out": dict(color="#d62728", size=10, symbol="x")}
        fig = go.Figure()
        for name in ("other heads", "knocked out", "risers"):
            heads = groups[name]
            fig.add_trace(go.Scatter(
                x=[float(self.dla_before[h]) for h in heads], y=[float(self.dla_after[h]) for h in heads],
                mode="markers" if name == "other heads" else "markers+text", name=name, marker=style[name],
                text=None if name == "other heads" else [f"{l}.{h}" for l, h in heads], textposition="top center",
                hovertext=[f"{l}.{h}" for l, h in heads]))
        values = torch.cat([self.dla_before.flatten(), self.dla_after.flatten()])
        lo, hi = float(values.min()), float(values.max())
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 line=dict(color="grey", dash="dash")))
        fig.update_layout(template="plotly_white", title=title or "Direct logit attribution per head, before vs after the knock-out",
                          xaxis_title="DLA before (clean model)", yaxis_title="DLA after (knocked-out heads mean-ablated)")
        return fig


@torch.no_grad()
def backup_name_movers(
    model: Any, data: IOIDataset, reference: IOIDataset, name_movers: Sequence[HeadIndex], *,
    means: dict[int, torch.Tensor] | None = None,
) -> BackupNameMovers:
    """Knock out ``name_movers`` and measure the compensation (the paper's §3.4 and Appendix F).

    The knock-out is the paper's: each head's output mean-ablated over the ``reference`` (ABC)
    prompts of the same template, at every position (:func:`mean_ablation_hooks` with
    ``knock_out``). Two forward passes, clean and knocked out, each cached for
    :func:`helpers.attribution.direct_logit_attribution`; the knock-out's direct effect
    (``naive_expected_drop``) is the DLA of the knocked-out heads minus the DLA of their means, both
    read with the clean run's scales. The paper measures each head's direct effect by path patching
    to the logits; DLA is the notebook's direct effect (the same quantity up to the final norm).
    """
    from helpers.attribution import direct_logit_attribution, dla_hook_names
    from helpers.metrics import logit_diff

    data = _check_dataset(data)
    knocked = [(int(l), int(h)) for l, h in name_movers]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not knocked:
        raise ValueError("name_movers is empty: pass the heads to knock out, e.g. classes['name mover'].")
    for layer, head in knocked:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head ({layer}, {head}) does not exist in a {n_layers}×{n_heads} model.")
    names = set(dla_hook_names(model, "head"))
    tokens, mask = data.batch.tokens, data.batch.attention_mask

    def dla(cache: Any) -> torch.Tensor:
        return direct_logit_attribution(model, cache, data.answer_tokens, by="head", batch=data.batch).values

    logits, clean = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n in names)
    ld_before = logit_diff(logits, data.answer_tokens, batch=data.batch).item()
    hooks = mean_ablation_hooks(model, data, reference, knock_out=knocked, means=means)
    with model.hooks(fwd_hooks=hooks):  # registered first: the cache below sees the ablated z
        logits, after = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n in names)
    ld_after = logit_diff(logits, data.answer_tokens, batch=data.batch).item()
    # the clean run with only the knocked-out heads' z swapped for the means they were replaced by
    swapped = {name: clean[name] for name in names}
    for layer in {l for l, _ in knocked}:
        z = clean[f"blocks.{layer}.attn.hook_z"].clone()
        for l, h in knocked:
            if l == layer:
                z[:, :, h] = after[f"blocks.{layer}.attn.hook_z"][:, :, h]
        swapped[f"blocks.{layer}.attn.hook_z"] = z
    dla_before, dla_mean = dla(clean), dla(swapped)
    drop = float(sum(dla_before[l, h] - dla_mean[l, h] for l, h in knocked))
    return BackupNameMovers(knocked, ld_before, ld_after, dla_before, dla(after), drop)


# ==================================================================================================
# Head classes, found from data with explicit rules
# ==================================================================================================


@dataclass(frozen=True)
class HeadClassRules:
    """The thresholds that turn measurements into head classes (all documented, none per-model).

    Attributes:
        direct_effect_fraction: a head has a *large direct effect* if its mean direct effect on the
            logit difference is at least this fraction of the clean logit difference (in absolute
            value). The paper's name movers each carry well over 5%.
        name_attention: minimum mean attention END→IO for (negative) name movers; they must also
            attend more to IO than to S (END→S1 + END→S2).
        copy_score: minimum copy score (negative copy score for negative name movers) to call a
            head a name mover. Reported always; set to 0 to not require it.
        s_inhibition_drop: minimum drop of the normalised logit difference when the head's output,
            *only* as read by the name movers' queries at END, is taken from the ABC run
            (path patching, noising). 0.05 = 5% of the clean-vs-ABC gap.
        induction_attention, duplicate_attention, previous_token_attention: minimum attention
            scores S2→S1+1, S2→S1 and t→t-1 (see :func:`attention_scores`).
        pattern_causal_effect: optionally, the pattern-defined classes (induction, duplicate token,
            previous token) also need |per-head activation patching effect| (normalised, all
            positions) at least this. Off (0) by default: these heads act through other heads, so
            their total effect can be small even when they matter (the minimality check tests each).
        max_per_class: keep at most this many heads per pattern class (highest scores first).
    """

    direct_effect_fraction: float = 0.05
    name_attention: float = 0.2
    copy_score: float = 0.5
    s_inhibition_drop: float = 0.05
    induction_attention: float = 0.2
    duplicate_attention: float = 0.3
    previous_token_attention: float = 0.3
    pattern_causal_effect: float = 0.0
    max_per_class: int = 8


def _heads_where(mask: torch.Tensor, order: torch.Tensor) -> list[HeadIndex]:
    n_heads = mask.shape[1]
    flat = [int(i) for i in order.flatten().argsort(descending=True) if bool(mask.flatten()[i])]
    return [divmod(i, n_heads) for i in flat]


def direct_effect_classes(
    direct_effect: Float[torch.Tensor, "layer head"],
    attention: dict[str, Float[torch.Tensor, "layer head"]],
    clean_logit_diff: float,
    copy: dict[HeadIndex, float] | None = None,
    negative_copy: dict[HeadIndex, float] | None = None,
    rules: HeadClassRules = HeadClassRules(),
) -> dict[str, list[HeadIndex]]:
    """Name movers, negative name movers and other large-direct-effect heads.

    * **name mover**: direct effect ≥ ``f·LD``, END→IO ≥ ``name_attention`` and > END→S, copy
      score ≥ ``copy_score`` (if copy scores are given);
    * **negative name mover**: direct effect ≤ ``-f·LD``, same attention rule, negative copy score
      ≥ ``copy_score`` (if given);
    * **other direct effect**: every other head with ``|direct effect| ≥ f·LD`` (heads that write the
      answer without attending to IO, e.g. heads that attend to S and suppress it).

    Lists are sorted by |direct effect|, largest first.
    """
    de = torch.as_tensor(direct_effect).float().cpu()
    threshold = rules.direct_effect_fraction * abs(clean_logit_diff)
    to_io = attention["END->IO"]
    attends_io = (to_io >= rules.name_attention) & (to_io > attention["END->S"])
    large = de.abs() >= threshold
    nm = _heads_where(large & (de > 0) & attends_io, de.abs())
    neg = _heads_where(large & (de < 0) & attends_io, de.abs())
    if copy is not None:
        nm = [h for h in nm if copy.get(h, 0.0) >= rules.copy_score]
    if negative_copy is not None:
        neg = [h for h in neg if negative_copy.get(h, 0.0) >= rules.copy_score]
    other = [h for h in _heads_where(large, de.abs()) if h not in nm and h not in neg]
    return {"name mover": nm, "negative name mover": neg, "other direct effect": other}


def s_inhibition_heads(
    path_to_name_movers: Float[torch.Tensor, "layer head"],
    exclude: Sequence[HeadIndex] = (),
    rules: HeadClassRules = HeadClassRules(),
) -> list[HeadIndex]:
    """Heads whose output, read only by the name movers' queries, carries the IOI signal.

    ``path_to_name_movers`` is :func:`helpers.patching.path_patch_senders` with receivers = the name
    movers, ``receiver_input="q"`` at END, ``direction="noise"`` and a logit-difference metric
    normalised to 1 = clean, 0 = ABC. A head is S-inhibition if that value is at most
    ``1 - s_inhibition_drop`` (NaN entries — heads with no path — are skipped). Sorted by drop.
    """
    values = torch.as_tensor(path_to_name_movers).float().cpu()
    drop = torch.nan_to_num(1.0 - values, nan=0.0)
    return [h for h in _heads_where(drop >= rules.s_inhibition_drop, drop) if h not in set(exclude)]


def pattern_classes(
    attention: dict[str, Float[torch.Tensor, "layer head"]],
    head_patching: Float[torch.Tensor, "layer head"] | None = None,
    *,
    before_layer: int,
    rules: HeadClassRules = HeadClassRules(),
) -> dict[str, list[HeadIndex]]:
    """Induction, duplicate-token and previous-token heads from their attention patterns.

    * **induction**: S2→S1+1 ≥ ``induction_attention``, in a layer before ``before_layer`` (the
      first S-inhibition layer: they must be able to feed it);
    * **duplicate token**: S2→S1 ≥ ``duplicate_attention``, before ``before_layer``;
    * **previous token**: t→t-1 ≥ ``previous_token_attention``, before the last induction head's
      layer (they feed induction heads' keys at S1+1);

    keeping the ``max_per_class`` highest-scoring heads of each class. With ``head_patching`` and
    ``rules.pattern_causal_effect > 0``, heads must also have ``|head_patching| ≥`` that.
    """
    n_layers, n_heads = attention["S2->S1"].shape
    layer_ids = torch.arange(n_layers)[:, None].expand(n_layers, n_heads)
    causal = torch.ones(n_layers, n_heads, dtype=torch.bool)
    if head_patching is not None and rules.pattern_causal_effect > 0:
        causal = torch.as_tensor(head_patching).float().cpu().abs() >= rules.pattern_causal_effect

    def pick(score: torch.Tensor, threshold: float, upper: int) -> list[HeadIndex]:
        mask = (score >= threshold) & causal & (layer_ids < upper)
        return _heads_where(mask, score)[: rules.max_per_class]

    induction = pick(attention["S2->S1+1"], rules.induction_attention, before_layer)
    duplicate = [h for h in pick(attention["S2->S1"], rules.duplicate_attention, before_layer) if h not in induction]
    last_induction = max((l for l, _ in induction), default=before_layer)
    previous = [h for h in pick(attention["previous token"], rules.previous_token_attention, last_induction)
                if h not in induction and h not in duplicate]
    return {"induction": induction, "duplicate token": duplicate, "previous token": previous}


def head_class_table(
    classes: dict[str, Sequence[HeadIndex]],
    *,
    direct_effect: torch.Tensor | None = None,
    attention: dict[str, torch.Tensor] | None = None,
    copy: dict[HeadIndex, float] | None = None,
    negative_copy: dict[HeadIndex, float] | None = None,
    path_to_name_movers: torch.Tensor | None = None,
    head_patching: torch.Tensor | None = None,
    scores: dict[str, dict[HeadIndex, float]] | None = None,
) -> "pandas.DataFrame":  # noqa: F821
    """One row per classified head with the evidence that put it in its class; ``scores`` adds one
    column per entry (e.g. ``{"copy score (paper)": copy_scores(...)}``), blank for heads it lacks."""
    import pandas as pd

    rows = []
    for cls, heads in classes.items():
        for layer, head in heads:
            row: dict[str, Any] = {"class": cls, "head": f"{layer}.{head}"}
            if direct_effect is not None:
                row["direct effect"] = float(direct_effect[layer, head])
            if head_patching is not None:
                row["patching (norm.)"] = float(head_patching[layer, head])
            if path_to_name_movers is not None:
                value = float(path_to_name_movers[layer, head])
                row["path→NM q drop"] = 1.0 - value if value == value else float("nan")
            if attention is not None:
                for key in ("END->IO", "END->S", "END->S2", "S2->S1+1", "S2->S1", "previous token"):
                    row[key] = float(attention[key][layer, head])
            if copy is not None and (layer, head) in copy:
                row["copy score"] = copy[(layer, head)]
            if negative_copy is not None and (layer, head) in negative_copy:
                row["neg. copy score"] = negative_copy[(layer, head)]
            for column, values in (scores or {}).items():
                if (layer, head) in values:
                    row[column] = values[(layer, head)]
            rows.append(row)
    return pd.DataFrame(rows)
