"""Natural-English text for the studies that need "ordinary text" (entropy neurons, self-repair).

The papers measure neurons and heads on web text — C4 (Stolfo et al. 2024) or the Pile (Rushing &
Nanda 2024) — streamed from the Hugging Face hub. Those are only reachable in the ``paper`` profile.
The ``embedded`` and ``ci`` profiles use an offline corpus that a PyPI package ships, so the
notebooks run with no network at all.

Offline corpus: English Wikipedia articles shipped inside ``gensim``
-------------------------------------------------------------------
* **What.** ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, a shortened
  excerpt (1.7 MB compressed, 6.1 MB of wikitext, 206 pages: 105 articles with prose, the rest
  redirects) of the English Wikipedia XML dump, revisions of 2014–2016 (MediaWiki 1.27): *Anarchism*,
  *Autism*, *Albedo*, *Abraham Lincoln*, *Aristotle*, *An American in Paris*, … It is gensim's test
  fixture for its Wikipedia parser and is installed with every gensim wheel under
  ``gensim/test/test_data/``.
* **Package.** ``gensim==4.4.0`` from PyPI (code LGPL-2.1; pulls ``scipy`` and ``smart_open``).
  :func:`wikipedia_dump_path` finds the file through the wheel's installed file list — gensim is
  **never imported** (importing it would cost seconds and load scipy) — and checks its sha256.
* **Licence.** The article text is Wikipedia's: © Wikipedia contributors, licensed under the Creative
  Commons Attribution-ShareAlike 3.0 licence (CC BY-SA 3.0) and the GNU Free Documentation Licence;
  authors are listed in each article's history at ``https://en.wikipedia.org``. This repository
  does not redistribute the text; it reads the copy that pip installed.
* **Cleaning.** :func:`clean_wikitext` turns wikitext into plain prose: templates, tables,
  references, comments, HTML tags, files/categories/interlanguage links and headings are removed,
  ``[[target|label]]`` links become their label, lists are dropped. What is left are paragraphs
  of encyclopedic prose; :func:`load_corpus_texts` keeps those of at least ``min_chars`` characters
  (with the default 200: 4,132 paragraphs, 2.4 MB of text, 519 k tokens of the embedded model's
  tokenizer).
* **How it differs from C4 / the Pile.** Encyclopedic register only (no forum posts, code, fiction);
  older snapshot; ~10⁶ tokens rather than 10⁹. Token frequencies computed on it (the unigram
  direction of the entropy-neuron study) are therefore Wikipedia frequencies.

Token windows
-------------
:func:`load_corpus_tokens` turns paragraphs into a :class:`~helpers.prompts.TokenBatch` of
fixed-length windows, the way language-model evaluation sets are usually made (TransformerLens'
``tokenize_and_concatenate`` does the same): paragraphs are shuffled with ``seed``, tokenized,
joined with the tokenizer's end-of-text token, cut into consecutive windows of ``seq_len - 1``
tokens and each window gets a BOS token in front. No padding: the attention mask is all ones.
The same seed, tokenizer and sizes give the same tokens.

Paper profile
-------------
``load_corpus_tokens(model, ..., source="c4")`` (or ``"pile"``) streams the first documents of C4's
validation split (``allenai/c4``, ``en``) or ``NeelNanda/pile-10k`` with ``datasets`` at run time
and raises :class:`CorpusNotAvailableError` at once, saying what to do, when the hub cannot be
reached. Pick the source per profile in the notebook:
``source = run.choose(paper="c4", embedded="wikipedia", ci="wikipedia")``.
"""

from __future__ import annotations

import bz2
import functools
import html
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch

from helpers.packaged_files import packaged_file
from helpers.prompts import TokenBatch

CORPUS_PACKAGE = "gensim"
CORPUS_PACKAGE_VERSION = "4.4.0"
WIKIPEDIA_DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKIPEDIA_DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
INSTALL_HINT = f"Install it with `pip install {CORPUS_PACKAGE}=={CORPUS_PACKAGE_VERSION}` (or run `make setup`)."

CorpusSource = Literal["wikipedia", "c4", "pile"]
SOURCES: tuple[str, ...] = ("wikipedia", "c4", "pile")
HUB_DATASETS: dict[str, tuple[str, str | None, str]] = {
    # source: (dataset name on the hub, config, split)
    "c4": ("allenai/c4", "en", "validation"),
    "pile": ("NeelNanda/pile-10k", None, "train"),
}

CORPUS_DESCRIPTION = (
    "English Wikipedia excerpt shipped in the gensim==4.4.0 wheel (gensim/test/test_data/"
    f"{WIKIPEDIA_DUMP_NAME}); text CC BY-SA 3.0 / GFDL, © Wikipedia contributors"
)
"""One line naming the offline corpus and its licence, for notebooks to print."""


class CorpusNotAvailableError(RuntimeError):
    """The requested corpus cannot be read here (package missing, file corrupt, hub unreachable)."""


# --------------------------------------------------------------------------------------------------
# Locating and cleaning the offline Wikipedia excerpt
# --------------------------------------------------------------------------------------------------


def wikipedia_dump_path(verify: bool = True) -> Path:
    """Path of the Wikipedia excerpt inside the installed gensim wheel (gensim is not imported).

    Args:
        verify: check the file's sha256 against :data:`WIKIPEDIA_DUMP_SHA256`.

    Raises:
        CorpusNotAvailableError: gensim is not installed, the file is missing, or its hash differs.
    """
    return packaged_file(
        CORPUS_PACKAGE,
        WIKIPEDIA_DUMP_NAME,
        sha256=WIKIPEDIA_DUMP_SHA256 if verify else None,
        purpose=f"The offline text corpus (English Wikipedia articles, shipped in {CORPUS_PACKAGE}=={CORPUS_PACKAGE_VERSION})",
        install_hint=INSTALL_HINT,
        reinstall_command=f"pip install --force-reinstall {CORPUS_PACKAGE}=={CORPUS_PACKAGE_VERSION}",
        error=CorpusNotAvailableError,
    )


_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_DROPPED_TAGS = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|pre|score|imagemap|chem)\b[^>]*>.*?</\1>",
    re.DOTALL | re.IGNORECASE,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_HTML_TAG = re.compile(r"<[^>]+>")
_HEADING = re.compile(r"^=+[^=\n]*=+\s*$", re.MULTILINE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_NON_LINK_NAMESPACES = ("file", "image", "category", "media", "wikipedia", "wp", "template", "help",
                        "portal", "user", "talk", "special", "wikt", "wiktionary", "s", "q", "commons")
_LEFTOVER_MARKUP = ("{{", "}}", "[[", "]]", "thumb|", "{|", "|}")
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)?$")


def _resolve_link(match: re.Match[str]) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix and (prefix in _NON_LINK_NAMESPACES or _LANGUAGE_PREFIX.match(prefix)):
        return ""  # images, categories, interlanguage links: not prose
    text = inner.rsplit("|", 1)[-1] if label else target
    return text.lstrip(":")


def _remove_nested(pattern: re.Pattern[str], text: str, replacement: Any = "") -> str:
    while True:
        new = pattern.sub(replacement, text)
        if new == text:
            return new
        text = new


def clean_wikitext(wikitext: str) -> list[str]:
    """Plain-prose paragraphs of one article's wikitext (may be empty).

    Removes comments, references, templates (nested), tables, maths/galleries, HTML tags, headings,
    list and table lines, file/category/interlanguage links; keeps the label of ``[[target|label]]``
    and of external links; drops bold/italic quote marks; unescapes HTML entities. Paragraphs are
    split at blank lines (and at removed headings) and their whitespace collapsed.
    """
    text = html.unescape(wikitext)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROPPED_TAGS.sub("", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _remove_nested(_TABLE, text)
    text = _remove_nested(_INNER_LINK, text, _resolve_link)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1), text)
    text = _HTML_TAG.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _HEADING.sub("\n", text)
    text = text.replace("'''", "").replace("''", "")
    lines = [ln for ln in text.split("\n") if not ln.lstrip().startswith(("*", "#", ":", ";", "|", "!", "{", "}"))]
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    cleaned = (re.sub(r"\s+", " ", p).strip() for p in paragraphs)
    # a paragraph with markup left over (unbalanced brackets in the source) is dropped, not guessed at
    return [
        p.replace(" ,", ",").replace("( ", "(").replace(" )", ")")
        for p in cleaned
        if p and not any(mark in p for mark in _LEFTOVER_MARKUP)
    ]


@dataclass(frozen=True)
class Article:
    """One Wikipedia article of the offline corpus: its title and its prose paragraphs."""

    title: str
    paragraphs: tuple[str, ...]


def _iter_pages(path: Path) -> Iterator[tuple[str, int, bool, str]]:
    """(title, namespace, is_redirect, wikitext) for every page of a MediaWiki XML dump."""
    with bz2.open(path, "rb") as handle:
        for _, element in ET.iterparse(handle, events=("end",)):
            if not element.tag.endswith("}page"):
                continue
            ns_uri = element.tag[: -len("page")]
            title = element.findtext(f"{ns_uri}title") or ""
            namespace = int(element.findtext(f"{ns_uri}ns") or 0)
            redirect = element.find(f"{ns_uri}redirect") is not None
            wikitext = element.findtext(f"{ns_uri}revision/{ns_uri}text") or ""
            yield title, namespace, redirect, wikitext
            element.clear()


@functools.lru_cache(maxsize=2)
def _load_articles(path: str) -> tuple[Article, ...]:
    articles = []
    for title, namespace, redirect, wikitext in _iter_pages(Path(path)):
        if namespace != 0 or redirect or wikitext.lstrip().lower().startswith("#redirect"):
            continue
        paragraphs = clean_wikitext(wikitext)
        if paragraphs:
            articles.append(Article(title, tuple(paragraphs)))
    return tuple(articles)


def load_corpus_articles() -> tuple[Article, ...]:
    """The cleaned articles of the offline Wikipedia excerpt, in dump order (parsed once, ~3 s)."""
    return _load_articles(str(wikipedia_dump_path()))


def load_corpus_texts(*, min_chars: int = 200, max_texts: int | None = None) -> list[str]:
    """Prose paragraphs of the offline corpus, in dump order (deterministic).

    Args:
        min_chars: drop paragraphs shorter than this (captions and stubs that survived cleaning).
        max_texts: return at most this many paragraphs (``None``: all, 4,132 with ``min_chars=200``).

    Raises:
        CorpusNotAvailableError: gensim (which ships the text) is not installed.
        ValueError: ``min_chars`` < 0 or ``max_texts`` < 1.
    """
    if min_chars < 0:
        raise ValueError(f"load_corpus_texts(min_chars=...) must be >= 0, got {min_chars}.")
    if max_texts is not None and max_texts < 1:
        raise ValueError(f"load_corpus_texts(max_texts=...) must be >= 1 or None, got {max_texts}.")
    texts = [p for article in load_corpus_articles() for p in article.paragraphs if len(p) >= min_chars]
    return texts if max_texts is None else texts[:max_texts]


# --------------------------------------------------------------------------------------------------
# Paper profile: C4 / the Pile from the Hugging Face hub at run time
# --------------------------------------------------------------------------------------------------


def load_hub_texts(source: Literal["c4", "pile"], n_texts: int, *, min_chars: int = 200) -> list[str]:
    """The first ``n_texts`` documents (of at least ``min_chars`` characters) of C4 or the Pile.

    Streams ``allenai/c4`` (``en``, validation split) or ``NeelNanda/pile-10k`` with ``datasets``;
    only the documents read are downloaded. Deterministic: always the first documents in the split.

    Raises:
        CorpusNotAvailableError: offline (``HF_HUB_OFFLINE=1`` or the hub unreachable), ``datasets``
            missing, or the download failed. Use ``source="wikipedia"`` (the offline corpus) there.
    """
    if source not in HUB_DATASETS:
        raise ValueError(f"load_hub_texts(source=...) must be one of {sorted(HUB_DATASETS)}, got {source!r}.")
    if n_texts < 1:
        raise ValueError(f"load_hub_texts(n_texts=...) must be >= 1, got {n_texts}.")
    from helpers.models import _hub_offline, _hub_reachable

    name, config, split = HUB_DATASETS[source]
    offline_hint = (
        f"Run where the hub is reachable (the 'paper' profile streams {name}), or use the offline "
        f"corpus: source='wikipedia' (set MI_PROFILE=embedded or ci)."
    )
    if _hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true", "TRUE"):
        raise CorpusNotAvailableError(f"Corpus {source!r} ({name}) needs the Hugging Face hub, but offline mode is set. {offline_hint}")
    if not _hub_reachable():
        raise CorpusNotAvailableError(f"Corpus {source!r} ({name}) needs the Hugging Face hub, which cannot be reached. {offline_hint}")
    try:
        import datasets
    except ImportError:
        raise CorpusNotAvailableError(f"Corpus {source!r} needs the `datasets` package: `pip install datasets`.") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        texts: list[str] = []
        for row in stream:
            text = str(row["text"]).strip()
            if len(text) >= min_chars:
                texts.append(text)
            if len(texts) >= n_texts:
                break
    except Exception as err:  # network errors come in many types
        raise CorpusNotAvailableError(f"Streaming {name} failed ({type(err).__name__}: {err}). {offline_hint}") from err
    return texts


# --------------------------------------------------------------------------------------------------
# Fixed-length token windows
# --------------------------------------------------------------------------------------------------


def load_corpus_tokens(
    model: Any,
    n_sequences: int,
    seq_len: int,
    *,
    seed: int = 0,
    source: CorpusSource = "wikipedia",
    prepend_bos: bool = True,
    allow_fewer: bool = False,
) -> TokenBatch:
    """``n_sequences`` windows of exactly ``seq_len`` tokens of natural English, as a TokenBatch.

    Paragraphs (``source="wikipedia"``) or documents (``"c4"``, ``"pile"``) are shuffled with ``seed``,
    tokenized, joined with the end-of-text token and cut into consecutive windows of ``seq_len - 1``
    tokens; each window starts with the BOS token (``prepend_bos=True``, the usual evaluation
    setting) — so position 0 is BOS and positions 1… are text. Only as many paragraphs as needed are
    tokenized. No padding: ``attention_mask`` is all ones.

    Args:
        model: a bridge (only its tokenizer and ``cfg.device`` are used).
        n_sequences: number of windows (rows).
        seq_len: tokens per window, BOS included.
        seed: shuffling seed; the same seed gives the same windows.
        source: ``"wikipedia"`` (offline, embedded/ci profiles), ``"c4"`` or ``"pile"`` (paper profile).
        prepend_bos: start every window with BOS.
        allow_fewer: when the corpus has fewer than ``n_sequences`` windows with this tokenizer,
            return all the full windows it has instead of raising (for statistics over "as much of
            the corpus as the size asks for", e.g. unigram counts: tokenizers differ in how many
            tokens the same text makes). ``len(result)`` says how many came back.

    Raises:
        CorpusNotAvailableError: the corpus cannot be read here (see :func:`wikipedia_dump_path`,
            :func:`load_hub_texts`).
        ValueError: bad sizes, unknown source, or more tokens asked for than the corpus has.
    """
    if source not in SOURCES:
        raise ValueError(f"load_corpus_tokens(source=...) must be one of {SOURCES}, got {source!r}.")
    if not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"load_corpus_tokens(n_sequences=...) must be a positive int, got {n_sequences!r}.")
    body_len = seq_len - 1 if prepend_bos else seq_len
    if not isinstance(seq_len, int) or body_len < 1:
        raise ValueError(f"load_corpus_tokens(seq_len=...) must be an int >= {2 if prepend_bos else 1}, got {seq_len!r}.")
    tokenizer = model.tokenizer
    needed = n_sequences * body_len
    if source == "wikipedia":
        texts = load_corpus_texts()
    else:  # web documents average several hundred tokens: ~100 per document leaves a wide margin
        texts = load_hub_texts(source, n_texts=needed // 100 + 32)  # type: ignore[arg-type]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    separator = tokenizer.eos_token_id
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed and allow_fewer and len(stream) >= body_len:
        n_sequences = len(stream) // body_len
        needed = n_sequences * body_len
    if len(stream) < needed:
        raise ValueError(
            f"Asked for {n_sequences} x {seq_len} tokens ({needed} of text) but corpus {source!r} has only "
            f"{len(stream)} with this tokenizer. Ask for fewer or shorter sequences (or pass allow_fewer=True "
            f"to take every full window there is)."
        )
    body = torch.tensor(stream[:needed], dtype=torch.long).reshape(n_sequences, body_len)
    if prepend_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"{type(tokenizer).__name__} has no BOS token; call load_corpus_tokens(..., prepend_bos=False).")
        body = torch.cat([torch.full((n_sequences, 1), bos, dtype=torch.long), body], dim=1)
    device = getattr(model.cfg, "device", None) or "cpu"
    return TokenBatch(body.to(device), torch.ones_like(body).to(device), "right")


def corpus_token_count(model: Any, texts: Sequence[str] | None = None) -> int:
    """How many tokens ``texts`` (default: the whole offline corpus) make with ``model``'s tokenizer."""
    texts = load_corpus_texts() if texts is None else texts
    return sum(len(ids) for ids in model.tokenizer(list(texts), add_special_tokens=False)["input_ids"])
