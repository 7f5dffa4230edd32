"""Tests of helpers.corpus: the offline Wikipedia corpus, its cleaning, and fixed-length token windows."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from helpers import corpus
from helpers.corpus import (
    CorpusNotAvailableError,
    clean_wikitext,
    corpus_token_count,
    load_corpus_texts,
    load_corpus_tokens,
    load_hub_texts,
    wikipedia_dump_path,
)

WIKITEXT = """{{Infobox person|name=Ada {{nowrap|Lovelace}}|born=1815}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]] and writer,<ref name="a">Smith, p. 3</ref> known for her work on the [[Analytical Engine]].<ref>Jones</ref> See [http://example.org the notes].
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace]]]]

== Early life ==
She was born in [[London]] &ndash; the only child of [[Lord Byron]].<!-- hidden comment -->
* a list item that is not prose
{| class="wikitable"
| cell || cell
|}
[[Category:Mathematicians]]
[[fr:Ada Lovelace]]"""


def test_clean_wikitext_keeps_prose_and_drops_markup():
    paragraphs = clean_wikitext(WIKITEXT)
    assert paragraphs == [
        "Ada Lovelace was an English mathematician and writer, known for her work on the Analytical "
        "Engine. See the notes.",
        "She was born in London – the only child of Lord Byron.",
    ]


def test_dump_is_found_and_verified():
    path = wikipedia_dump_path(verify=True)
    assert path.name == corpus.WIKIPEDIA_DUMP_NAME and path.stat().st_size > 1_000_000


def test_missing_package_gives_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CorpusNotAvailableError, match=r"pip install gensim==4\.4\.0"):
        wikipedia_dump_path()


def test_corrupt_file_is_reported(monkeypatch):
    monkeypatch.setattr(corpus, "WIKIPEDIA_DUMP_SHA256", "0" * 64)
    with pytest.raises(CorpusNotAvailableError, match="sha256"):
        wikipedia_dump_path(verify=True)


def test_texts_are_natural_english_and_deterministic():
    texts = load_corpus_texts()
    assert len(texts) > 3000 and sum(map(len, texts)) > 2_000_000
    assert all(len(t) >= 200 for t in texts)
    assert texts == load_corpus_texts()
    joined = " ".join(texts[:200])
    for markup in ("{{", "[[", "<ref", "'''", "==", "http"):
        assert markup not in joined
    # ordinary English: "the" is by far the most frequent word
    words = joined.lower().split()
    assert max(set(words), key=words.count) == "the"
    assert load_corpus_texts(max_texts=5) == texts[:5]
    assert len(load_corpus_texts(min_chars=1000)) < len(texts)


@pytest.mark.parametrize("kwargs", [{"min_chars": -1}, {"max_texts": 0}])
def test_texts_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_corpus_texts(**kwargs)


def test_corpus_has_over_100k_tokens(tiny_llama):
    assert corpus_token_count(tiny_llama) > 100_000


def test_token_windows_shape_bos_and_determinism(tiny_llama):
    batch = load_corpus_tokens(tiny_llama, 6, 32, seed=0)
    assert batch.tokens.shape == (6, 32) and batch.tokens.dtype == torch.long
    assert bool((batch.attention_mask == 1).all())
    assert bool((batch.tokens[:, 0] == tiny_llama.tokenizer.bos_token_id).all())
    assert bool((batch.tokens[:, 1:] != tiny_llama.tokenizer.bos_token_id).all())
    assert torch.equal(batch.tokens, load_corpus_tokens(tiny_llama, 6, 32, seed=0).tokens)
    other = load_corpus_tokens(tiny_llama, 6, 32, seed=1)
    assert not torch.equal(batch.tokens, other.tokens)
    text = tiny_llama.tokenizer.decode(batch.tokens[0, 1:])
    assert len(text) > 50 and text.count(" ") > 10
    no_bos = load_corpus_tokens(tiny_llama, 6, 31, seed=0, prepend_bos=False)
    assert torch.equal(no_bos.tokens, batch.tokens[:, 1:])


def test_token_windows_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="n_sequences"):
        load_corpus_tokens(tiny_llama, 0, 32)
    with pytest.raises(ValueError, match="seq_len"):
        load_corpus_tokens(tiny_llama, 2, 1)
    with pytest.raises(ValueError, match="source"):
        load_corpus_tokens(tiny_llama, 2, 8, source="bookcorpus")
    with pytest.raises(ValueError, match="has only"):
        load_corpus_tokens(tiny_llama, 10_000, 1000)


def test_allow_fewer_returns_every_full_window(tiny_llama):
    available = corpus_token_count(tiny_llama)
    window = 1000
    batch = load_corpus_tokens(tiny_llama, 10_000, window, allow_fewer=True)
    stream = available + len(load_corpus_texts())  # every paragraph is followed by one end-of-text token
    assert tiny_llama.tokenizer.eos_token_id is not None
    assert len(batch) == stream // (window - 1)
    assert len(batch) < 10_000 and batch.tokens.shape[1] == window
    enough = load_corpus_tokens(tiny_llama, 6, 32, seed=0, allow_fewer=True)  # enough text: the usual result
    assert torch.equal(enough.tokens, load_corpus_tokens(tiny_llama, 6, 32, seed=0).tokens)


def test_hub_corpus_fails_clearly_offline(monkeypatch, tiny_llama):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusNotAvailableError, match="source='wikipedia'"):
        load_hub_texts("c4", 10)
    with pytest.raises(CorpusNotAvailableError, match="allenai/c4"):
        load_corpus_tokens(tiny_llama, 2, 16, source="c4")
    with pytest.raises(ValueError, match="source"):
        load_hub_texts("wikipedia", 10)  # type: ignore[arg-type]
