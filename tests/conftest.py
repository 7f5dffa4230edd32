"""Shared fixtures: models are loaded once per test session.

* ``tiny_llama`` / ``tiny_gpt2`` — random tiny models (embedded layout / GPT-2 layout), seconds to load.
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


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny_model(request):
    """Each tiny model in turn: code that must work on both layouts (RMSNorm/GQA and LayerNorm/GPT-2)."""
    return request.getfixturevalue(request.param.replace("-", "_"))


@pytest.fixture(scope="session")
def embedded_model():
    from helpers.models import load_model

    return load_model("embedded", device="cpu")
