"""Shared fixtures: models are loaded once per test session.

* ``tiny_llama`` / ``tiny_gpt2`` / ``tiny_gemma3`` — random tiny models (embedded layout / GPT-2 layout /
  Gemma-3 layout: multi-query attention, (1 + γ) norms around each sublayer, sliding-window layers),
  seconds to load. ``tiny_model`` is each of them in turn.
* ``embedded_model`` — the real SmolLM2-135M-Instruct from the installed wheel (mark such tests
  ``@pytest.mark.embedded``).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_grad_enabled(True)


@pytest.fixture(scope="session")
def tiny_llama():
    from helpers.models import load_model

    return load_model("tiny-llama", device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from helpers.models import load_model

    return load_model("tiny-gpt2", device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma3():
    from helpers.models import load_model

    return load_model("tiny-gemma3", device="cpu", seed=0)


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def tiny_model(request):
    """Each tiny model in turn: code that must work on every layout (RMSNorm/GQA, LayerNorm/GPT-2,
    Gemma-3's multi-query attention with sandwich norms and sliding windows)."""
    return request.getfixturevalue(request.param.replace("-", "_"))


@pytest.fixture(scope="session")
def embedded_model():
    from helpers.models import load_model

    return load_model("embedded", device="cpu")
