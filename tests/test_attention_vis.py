"""Tests of helpers.attention_vis: patterns are right, figures are light, circuitsvis goes to a file."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import attention_vis
from helpers.models import load_model
from helpers.prompts import tokenize


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="module")
def batch(tiny):
    return tokenize(tiny, ["When Mary and John went to the store, John gave a drink to", "Hi there"])


def test_patterns_strip_padding_and_match_the_cache(tiny, batch):
    patterns, ids = attention_vis.attention_patterns(tiny, batch, 1, [(1, 2), (0, 0)])
    n_real = int(batch.attention_mask[1].sum())
    assert patterns.shape == (2, n_real, n_real) and len(ids) == n_real
    assert torch.allclose(patterns.sum(-1), torch.ones(2, n_real), atol=1e-5)  # rows are distributions
    assert torch.all(patterns.triu(1) == 0)  # causal
    _, cache = tiny.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    full = cache["blocks.1.attn.hook_pattern"][1, 2]
    assert torch.allclose(patterns[0], full[-n_real:, -n_real:].float(), atol=1e-6)


def test_bad_heads_and_index_raise(tiny, batch):
    with pytest.raises(ValueError, match="does not exist"):
        attention_vis.attention_patterns(tiny, batch, 0, [(7, 0)])
    with pytest.raises(IndexError, match="prompt_index"):
        attention_vis.attention_patterns(tiny, batch, 5, [(0, 0)])
    with pytest.raises(ValueError, match="interactive"):
        attention_vis.show_attention(tiny, batch, heads=[(0, 0)], interactive="big")


def test_grid_shape_checks():
    with pytest.raises(ValueError, match="query = key"):
        attention_vis.attention_grid(torch.rand(2, 3, 3), ["a", "b"], ["h0", "h1"])
    fig = attention_vis.attention_grid(torch.rand(4, 3, 3), ["a", "b", "c"], list("wxyz"), columns=2)
    assert len(fig.data) == 4 and fig.data[0].zmax == 1.0


def test_show_attention_output_is_small_and_circuitsvis_goes_to_a_file(tiny, batch, tmp_path, monkeypatch):
    monkeypatch.setenv("MI_FIGURES_DIR", str(tmp_path))
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False, **kw: shown.append(obj))
    attention_vis.show_attention(tiny, batch, heads=[(0, 1), (2, 3)], name="test/attn", interactive="file")
    size = sum(len(json.dumps(o, default=lambda b: "x" * len(b))) if isinstance(o, dict) else len(o.data) for o in shown)
    assert size < 200_000, f"notebook output would be {size} bytes"
    page = tmp_path / "test" / "attn.circuitsvis.html"
    assert page.is_file() and page.stat().st_size > 500_000  # the JS bundle is in the file, not the notebook
    assert "CircuitsVis" in page.read_text()
    # cdn mode adds only a small HTML fragment that loads the JS from unpkg
    shown.clear()
    attention_vis.show_attention(tiny, batch, heads=[(0, 1)], interactive="cdn")
    fragment = [o for o in shown if not isinstance(o, dict)][0].data
    assert "unpkg.com/circuitsvis" in fragment and len(fragment) < 20_000
