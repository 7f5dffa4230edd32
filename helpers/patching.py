"""Activation patching and path patching on :class:`TransformerBridge` hooks — exact and fast.

Vocabulary (as in Heimersheim & Nanda, "How to use and interpret activation patching"):

* **clean** run: the prompts on which the model does the task (e.g. IOI prompts);
* **corrupted** run: the same prompts with the relevant information removed (e.g. other names);
* **denoising** (``direction="denoise"``, the default): run the *corrupted* prompts and patch in
  one activation from the *clean* run. A large metric means "this activation is sufficient to
  restore the behaviour";
* **noising** (``direction="noise"``): run the *clean* prompts and patch in one activation from the
  *corrupted* run. A large drop means "this activation is necessary".

Every sweep returns a :class:`LabelledTensor` whose values are ``metric(patched logits)``, one per
patched component; ``result.meta`` holds the metric on the unpatched clean and corrupted runs
(``clean_value``, ``corrupted_value``). Pass a normalised metric
(:func:`helpers.metrics.make_logit_diff_metric` with both baselines) to get 0 = corrupted,
1 = clean.

How it is fast, while staying exact
-----------------------------------
TransformerLens' ``transformer_lens.patching`` runs one full forward pass per patched component.
Here

1. the clean and corrupted runs are cached **once**, keeping only the hooks the sweep needs;
2. several patched runs share **one forward pass**: the prompts are repeated ``k`` times along the
   batch dimension and copy ``c`` patches component ``c``;
3. a patched run **starts at the patched layer** from the cached residual stream of the run being
   patched (nothing upstream of the patch can change), skipping the layers below it. (The bridge's
   own ``start_at_layer`` still executes the lower blocks and discards their output; we also take
   them out of the module list for the duration of the call.)
4. when the metric only reads each prompt's last real token (detected automatically, see
   ``logit_positions``), the unembedding is computed only there, and
5. positions before the first token where the clean and corrupted prompts differ are computed
   **once**: they are identical in both runs and no patch can change them (causal attention), so
   patched runs process only the suffix, reading the prefix's keys/values from the target run's
   KV cache. (This helps most when the corruption is late in the prompt; it is checked against the
   full run at setup and switched off for models whose attention ignores the cache.)

Memory: each batched forward holds at most ``max_batch_tokens`` tokens (default 2048); lower it on
small machines, raise it on a GPU.

The tests check every sweep against a naive one-forward-per-component loop and against
``transformer_lens.patching`` where it has the same sweep.

Grouped-query attention: the embedded model has 9 query heads but 3 key/value heads. Patching
``"q"``, ``"z"`` or ``"pattern"`` is per query head; patching ``"k"``/``"v"`` is per **key/value
head** (dimension ``"kv_head"``), which feeds ``n_heads / n_kv_heads`` query heads at once.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Int

from helpers.metrics import Metric
from helpers.prompts import TokenBatch

Direction = Literal["denoise", "noise"]
LogitPositions = Literal["auto", "last", "all"]

__all__ = [
    "LabelledTensor",
    "patch_residual",
    "patch_attn_out",
    "patch_mlp_out",
    "patch_layer_outputs",
    "patch_heads",
    "patch_layer_window",
    "patch_hook",
    "path_patch",
    "path_patch_senders",
    "as_token_batch",
]


# ==================================================================================================
# Labelled results
# ==================================================================================================


@dataclass
class LabelledTensor:
    """A tensor of results whose dimensions have names and whose entries have labels.

    Attributes:
        values: the numbers, e.g. ``[layer, head]`` patching results (on CPU, detached).
        dims: one name per dimension, e.g. ``("layer", "head")``.
        labels: per dimension name, one label per index (layer numbers, ``"5: ' Mary'"`` positions,
            head numbers, …). Dimensions without labels get ``0, 1, …``.
        meta: anything else worth keeping with the numbers (baselines, what was patched, …).

    ``to_frame()`` gives a long pandas DataFrame; ``top(k)`` the k largest ``|value|`` entries with
    their labels; the plotting helpers take ``.values`` (and ``tick_labels(dim)`` for the axes).
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values).detach()
        self.dims = tuple(self.dims)
        if len(self.dims) != self.values.ndim:
            raise ValueError(f"LabelledTensor: {len(self.dims)} dims {self.dims} for a {self.values.ndim}-d tensor.")
        labels = dict(self.labels)
        for axis, dim in enumerate(self.dims):
            size = self.values.shape[axis]
            if dim not in labels:
                labels[dim] = list(range(size))
            elif len(labels[dim]) != size:
                raise ValueError(f"LabelledTensor: dim {dim!r} has size {size} but {len(labels[dim])} labels.")
        self.labels = labels

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        what = f" {self.meta['what']!r}" if "what" in self.meta else ""
        return f"LabelledTensor({dims}){what}"

    def tick_labels(self, dim: str) -> list[str]:
        """The labels of ``dim`` as strings (for plot axes)."""
        return [str(label) for label in self.labels[dim]]

    def to_frame(self, value_name: str = "value"):
        """Long format: one row per entry, a column per dimension (its label) plus ``<dim>_index``."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(n) for n in self.values.shape], indexing="ij")
        columns: dict[str, Any] = {}
        for dim, grid in zip(self.dims, grids):
            flat = grid.reshape(-1).tolist()
            columns[dim] = [self.labels[dim][i] for i in flat]
            columns[f"{dim}_index"] = flat
        columns[value_name] = self.values.reshape(-1).float().tolist()
        return pd.DataFrame(columns)

    def top(self, k: int = 10, *, largest_abs: bool = True):
        """The ``k`` entries with the largest ``|value|`` (or largest value), NaNs skipped."""
        frame = self.to_frame()
        frame = frame[frame["value"].notna()]
        key = frame["value"].abs() if largest_abs else frame["value"]
        return frame.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def plot(self, title: str = "", **kwargs: Any):
        """A heatmap (2-D: first dim on y, second on x) or a line (1-D) via :mod:`helpers.plotting`."""
        from helpers import plotting

        if self.values.ndim == 2:
            y_dim, x_dim = self.dims
            return plotting.heatmap(
                self.values, title=title, x_label=x_dim, y_label=y_dim,
                x_ticks=self.tick_labels(x_dim), y_ticks=self.tick_labels(y_dim), **kwargs,
            )
        if self.values.ndim == 1:
            return plotting.line({self.meta.get("what", "value"): self.values}, title=title,
                                 x=self.labels[self.dims[0]], **kwargs)
        raise ValueError(f"plot() draws 1-D or 2-D results; this one is {self.dims}. Index it first.")


# ==================================================================================================
# Input validation
# ==================================================================================================


def as_token_batch(model: Any, tokens: Any, *, name: str = "tokens") -> TokenBatch:
    """A :class:`TokenBatch` on the model's device from a TokenBatch or a ``[batch, pos]`` id tensor.

    A bare tensor gets an all-ones attention mask (no padding); padded prompts must come as a
    TokenBatch from :func:`helpers.prompts.tokenize`.
    """
    device = _model_device(model)
    if isinstance(tokens, TokenBatch):
        batch = tokens
    elif isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point():
            raise TypeError(f"{name} must hold token ids (integers), got dtype {tokens.dtype}.")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"{name} must be [batch, pos] token ids, got shape {tuple(tokens.shape)}.")
        batch = TokenBatch(tokens, torch.ones_like(tokens))
    else:
        raise TypeError(
            f"{name} must be a TokenBatch (helpers.prompts.tokenize) or a [batch, pos] tensor of token ids, "
            f"got {type(tokens).__name__}."
        )
    return batch.to(device)


def _check_pair(model: Any, clean: Any, corrupted: Any) -> tuple[TokenBatch, TokenBatch]:
    clean_b = as_token_batch(model, clean, name="clean")
    corrupted_b = as_token_batch(model, corrupted, name="corrupted")
    if clean_b.tokens.shape != corrupted_b.tokens.shape:
        raise ValueError(
            f"clean tokens have shape {tuple(clean_b.tokens.shape)} but corrupted tokens have shape "
            f"{tuple(corrupted_b.tokens.shape)}. Patching swaps activations position by position, so the two "
            "must have the same number of prompts and positions: build corrupted prompts with the same "
            "token length as their clean counterparts (or tokenize both lists in one call and split)."
        )
    if clean_b.padding_side != corrupted_b.padding_side:
        raise ValueError("clean and corrupted batches must be padded on the same side.")
    return clean_b, corrupted_b


def _check_hook_names(model: Any, names: Iterable[str]) -> None:
    available = model.hook_dict
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, list(available), n=5, cutoff=0.6)
            hint = f" Close matches: {close}." if close else ""
            raise KeyError(
                f"The model has no hook named {name!r}.{hint} See model.hook_dict for all hook names "
                "(TransformerLens-style aliases such as 'blocks.0.attn.hook_z' work)."
            )


def _check_positions(positions: Sequence[int] | None, n_pos: int) -> list[int]:
    if positions is None:
        return list(range(n_pos))
    if isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        p = int(p)
        if not -n_pos <= p < n_pos:
            raise IndexError(
                f"position {p} is out of range: the prompts have {n_pos} positions "
                f"(valid: 0..{n_pos - 1}, or -{n_pos}..-1 from the end)."
            )
        out.append(p % n_pos)
    if len(set(out)) != len(out):
        raise ValueError(f"positions {list(positions)} contains duplicates.")
    return out


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise IndexError(f"layer {layer} is out of range for a {n_layers}-layer model.")
        out.append(layer % n_layers)
    return out


def _check_direction(direction: str) -> None:
    if direction not in ("denoise", "noise"):
        raise ValueError(
            f"direction must be 'denoise' (run corrupted, patch in clean activations) or 'noise' (run clean, "
            f"patch in corrupted activations), got {direction!r}."
        )


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device(getattr(model.cfg, "device", "cpu") or "cpu")


def _n_kv_heads(model: Any) -> int:
    n = getattr(model.cfg, "n_key_value_heads", None)
    return int(n) if n else int(model.cfg.n_heads)


def _position_labels(model: Any, batch: TokenBatch) -> list[str]:
    """``"p:token"`` for each position, tokens of the first prompt (``<pad>`` where padded)."""
    labels = []
    row, mask = batch.tokens[0].tolist(), batch.attention_mask[0].tolist()
    for p, (tok, keep) in enumerate(zip(row, mask)):
        text = model.tokenizer.decode([tok]) if keep else "<pad>"
        labels.append(f"{p}:{text!r}"[:24])
    return labels


# ==================================================================================================
# The patching engine
# ==================================================================================================


Edit = Callable[[torch.Tensor], None]
"""In-place edit of one copy's rows ``[batch, ...]`` of an activation."""


@dataclass
class _PatchedRun:
    """One patched run: edits (hook name → in-place edit of this copy's rows) applied to the target run."""

    edits: list[tuple[str, Edit]]
    start_layer: int
    stop_layer: int | None = None  # for capture-only runs: stop before this block


def _layer_of(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks":
        return int(parts[1])
    return None


class _Patcher:
    """Caches the clean and corrupted runs once and runs batched patched forwards from a layer.

    ``target`` is the run being patched (corrupted when denoising), ``source`` the run the patched-in
    activations come from.
    """

    def __init__(
        self,
        model: Any,
        clean: Any,
        corrupted: Any,
        metric: Metric | None,
        direction: Direction,
        source_hooks: Iterable[str],
        target_hooks: Iterable[str] = (),
        *,
        logit_positions: LogitPositions = "auto",
        max_batch_tokens: int = 2048,
        progress: bool = True,
        desc: str = "patching",
        allow_suffix: bool = True,
    ) -> None:
        _check_direction(direction)
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be a callable metric(logits) -> scalar tensor, got {type(metric).__name__}.")
        if logit_positions not in ("auto", "last", "all"):
            raise ValueError(f"logit_positions must be 'auto', 'last' or 'all', got {logit_positions!r}.")
        self.model = model
        self.metric = metric
        self.direction = direction
        self.n_layers = int(model.cfg.n_layers)
        self.clean, self.corrupted = _check_pair(model, clean, corrupted)
        self.target = self.corrupted if direction == "denoise" else self.clean
        self.source = self.clean if direction == "denoise" else self.corrupted
        self.batch_size, self.n_pos = self.target.tokens.shape
        self.max_batch_tokens = max(int(max_batch_tokens), self.batch_size * self.n_pos)
        self.progress = progress
        self.desc = desc

        resid_pre = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.n_layers)]
        source_hooks = sorted(set(source_hooks))
        target_hooks = sorted(set(target_hooks) | set(resid_pre))
        _check_hook_names(model, [*source_hooks, *target_hooks])
        with torch.no_grad():
            source_logits, self.source_cache = model.run_with_cache(
                self.source.tokens, attention_mask=self.source.attention_mask, names_filter=source_hooks
            )
            target_logits, self.target_cache = model.run_with_cache(
                self.target.tokens, attention_mask=self.target.attention_mask, names_filter=target_hooks
            )
            self.meta: dict[str, Any] = {"direction": direction}
            self.target_value = math.nan
            if metric is not None:
                clean_logits = source_logits if direction == "denoise" else target_logits
                corrupted_logits = target_logits if direction == "denoise" else source_logits
                self.meta["clean_value"] = _scalar(metric(clean_logits), "metric")
                self.meta["corrupted_value"] = _scalar(metric(corrupted_logits), "metric")
                self.target_value = self.meta["corrupted_value" if direction == "denoise" else "clean_value"]
                self.keep_positions = self._choose_logit_positions(logit_positions, target_logits)
            else:
                self.keep_positions = None
        self.position_ids = self._position_ids(self.target.attention_mask)
        self.source_cache = {name: self.source_cache[name] for name in source_hooks}
        self.target_cache = {name: self.target_cache[name] for name in target_hooks}
        self.p0 = 0
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if allow_suffix and self.keep_positions is not None:
            self._setup_suffix(target_logits)

    # -- the shared prefix -------------------------------------------------------------------------

    def _setup_suffix(self, target_logits: torch.Tensor) -> None:
        """Run patched forwards only over the positions where clean and corrupted prompts can differ.

        Positions before the first token (or mask entry) that differs between the clean and corrupted
        batches have identical activations in both runs, and a causal model's later positions cannot
        change them: a patched run only needs to compute the suffix from ``p0`` on, reading the prefix's
        keys/values from the target run (a Hugging Face KV cache). Patching a position before ``p0``
        swaps identical values, so its result is the target run's metric.

        Checked once against the full run; if the suffix run does not reproduce it (an architecture
        whose attention ignores the KV cache), the full sequence is used.
        """
        differs = (self.clean.tokens != self.corrupted.tokens) | (self.clean.attention_mask != self.corrupted.attention_mask)
        columns = differs.any(0).nonzero()
        first = int(columns[0]) if len(columns) else self.n_pos
        p0 = min(first, min(self.keep_positions))
        if p0 <= 0:
            return
        try:
            from transformers import DynamicCache

            # A plain DynamicCache keeps every position of every layer. The cache a model builds for
            # itself may not: Gemma-3's sliding-window layers keep only their last window - 1 keys.
            past = DynamicCache()
            with torch.no_grad():
                self.model(self.target.tokens, attention_mask=self.target.attention_mask, past_key_values=past,
                           use_cache=True, return_type="logits_and_cache")
            prefix = [(layer.keys[:, :, :p0].clone(), layer.values[:, :, :p0].clone()) for layer in past.layers]
        except Exception:  # no HF cache for this model: use the full sequence
            return
        if len(prefix) != self.n_layers or any(keys.shape[2] != p0 for keys, _ in prefix):
            return
        full_cache = (self.source_cache, self.target_cache)
        self.p0, self.prefix_kv = p0, prefix
        self.source_cache = {n: _suffix_slice(n, t, p0) for n, t in full_cache[0].items()}
        self.target_cache = {n: _suffix_slice(n, t, p0) for n, t in full_cache[1].items()}
        try:
            with torch.no_grad():  # check: the unpatched suffix run reproduces the target run's logits
                values, _ = self.run([_PatchedRun([], 0)], _return_logits=True)
            check = values[0]
        except Exception:  # an architecture whose attention cannot continue from the cache
            check = None
        reference = target_logits[:, self.keep_positions]
        if check is None or check.shape != reference.shape or not torch.allclose(check, reference, atol=1e-4, rtol=1e-4):
            self.p0, self.prefix_kv = 0, []
            self.source_cache, self.target_cache = full_cache

    def relative(self, positions: Sequence[int] | None) -> list[int] | None:
        """Absolute positions → positions in the computed suffix (dropping those before it)."""
        if positions is None:
            return None
        return [p - self.p0 for p in positions if p >= self.p0]

    def covers(self, position: int) -> bool:
        """Whether patching at ``position`` can change anything (it is not in the shared prefix)."""
        return position >= self.p0

    # -- setup helpers ---------------------------------------------------------------------------

    def _choose_logit_positions(self, mode: LogitPositions, target_logits: torch.Tensor) -> list[int] | None:
        """Which positions to unembed in patched runs (``None`` = all).

        ``"auto"`` keeps only the last real positions if the metric gives the same finite value on the
        target run's logits with every other position set to NaN (so it provably reads nothing else).
        """
        if mode == "all":
            return None
        keep = sorted(set(self.target.last_positions.tolist()) | set(self.source.last_positions.tolist()))
        masked = torch.full_like(target_logits, float("nan"))
        masked[:, keep] = target_logits[:, keep]
        full_value = self.metric(target_logits)
        masked_value = self.metric(masked)
        same = bool(torch.isfinite(masked_value).all()) and torch.allclose(masked_value, full_value, rtol=0, atol=0)
        if mode == "last":
            if not same:
                raise ValueError(
                    "logit_positions='last' but the metric reads logits at positions other than each prompt's "
                    "last real token. Use logit_positions='all' (or 'auto')."
                )
            return keep
        return keep if same else None

    def _position_ids(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The position ids the bridge derives from the mask (it does not when given a residual)."""
        if not bool((mask == 0).any()):
            return None
        mask = mask.long()
        derived = (mask.cumsum(-1) - 1).clamp(min=0)
        arange = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        needs = ((derived != arange) & (mask != 0)).any(dim=1, keepdim=True)
        return torch.where(needs, derived, arange)

    # -- running -----------------------------------------------------------------------------------

    def copies_per_forward(self) -> int:
        per_copy = self.batch_size * (self.n_pos - self.p0)
        k = max(1, self.max_batch_tokens // per_copy)
        if self.keep_positions is None:  # full logits: keep them under ~256 MB
            vocab = int(self.model.cfg.d_vocab_out if getattr(self.model.cfg, "d_vocab_out", -1) > 0
                        else self.model.cfg.d_vocab)
            k = max(1, min(k, (256 * 2**20) // (per_copy * vocab * 4)))
        return k

    def run(self, runs: Sequence[_PatchedRun | None], capture: Sequence[str] = (), _return_logits: bool = False
            ) -> tuple[list, list[dict]]:
        """Metric value of each patched run (and, per run, the activations named in ``capture``).

        Runs are grouped by start layer and executed ``copies_per_forward()`` at a time. A ``None``
        run is a patch that cannot change anything (see :meth:`_setup_suffix`): the target's value.
        """
        values: list = [self.target_value if run is None else math.nan for run in runs]
        captured: list[dict] = [{} for _ in runs]
        groups: dict[tuple[int, int | None], list[int]] = {}
        for index, run in enumerate(runs):
            if run is not None:
                groups.setdefault((run.start_layer, run.stop_layer), []).append(index)
        k = self.copies_per_forward()
        chunks = [(key, idx[i : i + k]) for key, idx in sorted(groups.items()) for i in range(0, len(idx), k)]
        bar = _progress(len(chunks), self.desc, self.progress and len(chunks) > 4)
        for (start, stop), chunk in chunks:
            chunk_values, chunk_captured = self._forward_chunk([runs[i] for i in chunk], start, stop, capture,
                                                               _return_logits)
            for i, value, cap in zip(chunk, chunk_values, chunk_captured):
                values[i] = value
                captured[i] = cap
            bar.update(1)
        bar.close()
        return values, captured

    @torch.no_grad()
    def _forward_chunk(
        self, runs: Sequence[_PatchedRun], start: int, stop: int | None, capture: Sequence[str],
        return_logits: bool = False,
    ) -> tuple[list, list[dict]]:
        model, b = self.model, self.batch_size
        n_copies = len(runs)
        by_hook: dict[str, list[tuple[int, Edit]]] = {}
        for copy, run in enumerate(runs):
            for hook_name, edit in run.edits:
                layer = _layer_of(hook_name)
                if layer is not None and layer < start:
                    raise AssertionError(f"edit at {hook_name} is below the start layer {start}")
                by_hook.setdefault(hook_name, []).append((copy, edit))
        stash: dict[str, torch.Tensor] = {}
        fwd_hooks = [(name, _make_edit_hook(edits, b)) for name, edits in by_hook.items()]
        for name in capture:
            fwd_hooks.append((name, _make_capture_hook(stash, name)))
        # Edits and captures on the same hook: edits first (hook order = list order), capture after.
        kwargs: dict[str, Any] = {"attention_mask": self.target.attention_mask.repeat(n_copies, 1)}
        if start < 0:  # from the tokens (a hook outside the blocks, e.g. the embedding, is patched)
            if self.p0:
                raise AssertionError("a patch outside the blocks needs the full sequence (allow_suffix=False)")
            model_input = self.target.tokens.repeat(n_copies, 1)
        else:  # from the cached residual stream entering block `start` (positions p0.. only)
            model_input = self.target_cache[f"blocks.{start}.hook_resid_pre"].repeat(n_copies, 1, 1)
            kwargs["start_at_layer"] = start
            position_ids = self.position_ids
            if self.p0 and position_ids is None:
                position_ids = torch.arange(self.n_pos, device=model_input.device)[None].expand(b, -1)
            if position_ids is not None:  # the bridge derives them from tokens only
                kwargs["position_ids"] = position_ids[:, self.p0 :].repeat(n_copies, 1)
            if self.p0:
                kwargs["past_key_values"] = self._prefix_cache(n_copies)
        if stop is not None:
            kwargs["stop_at_layer"] = stop
        elif self.keep_positions is not None:
            kwargs["logits_to_keep"] = torch.tensor([p - self.p0 for p in self.keep_positions],
                                                    device=model_input.device)
        with self._skip_blocks_below(start), model.hooks(fwd_hooks=fwd_hooks):
            out = model(model_input, **kwargs)
        captured = [
            {name: tensor[c * b : (c + 1) * b] for name, tensor in stash.items()} for c in range(n_copies)
        ]
        if return_logits:
            return [out[c * b : (c + 1) * b] for c in range(n_copies)], captured
        if stop is not None or self.metric is None:
            return [math.nan] * n_copies, captured
        values = []
        buffer = None
        for c in range(n_copies):
            logits = out[c * b : (c + 1) * b]
            if self.keep_positions is not None:
                if buffer is None:
                    buffer = torch.full((b, self.n_pos, logits.shape[-1]), float("nan"), dtype=logits.dtype,
                                        device=logits.device)
                buffer[:, self.keep_positions] = logits
                logits = buffer
            values.append(_scalar(self.metric(logits), "metric"))
        return values, captured

    def _prefix_cache(self, n_copies: int):
        """A fresh KV cache holding the target run's prefix keys/values, repeated for each copy."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.prefix_kv):
            cache.update(keys.repeat(n_copies, 1, 1, 1), values.repeat(n_copies, 1, 1, 1), layer)
        return cache

    @contextlib.contextmanager
    def _skip_blocks_below(self, start: int):
        """Temporarily make blocks ``0..start-1`` return their input unchanged.

        The bridge's ``start_at_layer`` swaps the cached residual in at block ``start`` but still runs
        the blocks below it; passing their input through skips that wasted work. The blocks stay in
        the wrapped model's layer list: models that look up per-layer settings by position in that
        list (Gemma-2/3 pick each layer's sliding-window or global mask and rotary base from
        ``config.layer_types[i]``) would otherwise give block ``start`` the settings of block 0.
        Hooks live on the block modules themselves, so they are unaffected.
        """
        if start <= 0:
            yield
            return
        skipped = list(self.model.blocks)[:start]
        for block in skipped:  # object.__setattr__: the bridge would forward a plain setattr to the HF module
            object.__setattr__(block, "forward", _passthrough)
        try:
            yield
        finally:
            for block in skipped:
                object.__delattr__(block, "forward")


def _passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _suffix_slice(name: str, tensor: torch.Tensor, p0: int) -> torch.Tensor:
    """The part of a cached activation that a suffix run (positions ``p0..``) computes."""
    if name.endswith(("hook_pattern", "hook_attn_scores")):  # [batch, head, query_pos, key_pos]
        return tensor[:, :, p0:]
    return tensor[:, p0:]


def _make_edit_hook(edits: list[tuple[int, Edit]], batch_size: int):
    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        activation = activation.clone()
        for copy, edit in edits:
            edit(activation[copy * batch_size : (copy + 1) * batch_size])
        return activation

    return hook


def _make_capture_hook(stash: dict, name: str):
    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        stash[name] = activation.detach().clone()
        return activation

    return hook


def _scalar(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"The {what} must return a scalar (0-d tensor), got shape {tuple(value.shape)}. Reduce over the "
                "batch inside the metric (e.g. logit_diff(..., reduce='mean'))."
            )
        value = value.item()
    value = float(value)
    if math.isnan(value):
        raise ValueError(
            f"The {what} returned NaN on a patched run. If it reads logits at positions other than each "
            "prompt's last real token, pass logit_positions='all'."
        )
    return value


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# -- edit builders ---------------------------------------------------------------------------------


def _set_positions(source: torch.Tensor, positions: Sequence[int] | None) -> Edit:
    """Edit copying ``source`` (the source run's activation, ``[batch, pos, ...]``) at ``positions``."""
    if positions is None:
        return lambda rows: rows.copy_(source)
    index = list(positions)
    return lambda rows: rows.__setitem__((slice(None), index), source[:, index])


def _set_head(source: torch.Tensor, head: int, positions: Sequence[int] | None, head_dim: int = 2) -> Edit:
    """Edit copying head ``head`` (on ``head_dim``) of ``source`` at ``positions`` (dim 1, or the
    query dim for patterns)."""

    def edit(rows: torch.Tensor) -> None:
        if head_dim == 2:  # [batch, pos, head, ...]
            if positions is None:
                rows[:, :, head] = source[:, :, head]
            else:
                rows[:, positions, head] = source[:, positions, head]
        else:  # pattern [batch, head, query_pos, key_pos]
            if positions is None:
                rows[:, head] = source[:, head]
            else:
                rows[:, head, positions] = source[:, head, positions]

    return edit


def _result(values: list[float], shape: Sequence[int], dims: tuple[str, ...], labels: dict, meta: dict,
            what: str) -> LabelledTensor:
    tensor = torch.tensor(values, dtype=torch.float32).reshape(*shape)
    return LabelledTensor(tensor, dims, labels, {**meta, "what": what})


# ==================================================================================================
# Sweeps
# ==================================================================================================

_RESID_SITES = ("resid_pre", "resid_mid", "resid_post")


def patch_residual(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    site: Literal["resid_pre", "resid_mid", "resid_post"] = "resid_pre",
    direction: Direction = "denoise",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
    max_batch_tokens: int = 2048,
    progress: bool = True,
) -> LabelledTensor:
    """Patch the residual stream at one (layer, position) at a time → ``[layer, pos]``.

    What is patched: the residual stream vector ``blocks.{layer}.hook_{site}`` at one position, for all
    prompts at once. ``"resid_pre"`` is the input of block ``layer``; ``"resid_mid"`` is the stream
    after the block's attention (input of its MLP branch); ``"resid_post"`` its output.
    Direction: ``"denoise"`` runs the corrupted prompts with the clean vector patched in;
    ``"noise"`` runs the clean prompts with the corrupted vector patched in.

    ``resid_mid`` is patched for real (the value the MLP reads *and* the residual it is added to), by
    setting the attention output to ``clean_mid - resid_pre``; the bridge's ``hook_resid_mid`` alias is
    the MLP norm's input only, so patching it would leave the skip connection unpatched.

    Args:
        layers, positions: restrict the sweep (default all). Negative positions count from the end.
        logit_positions: ``"auto"`` (unembed only the last real token when the metric provably reads
            nothing else), ``"last"`` or ``"all"``.
        max_batch_tokens: how many tokens (copies × batch × positions) one batched forward may hold.
    """
    if site not in _RESID_SITES:
        raise ValueError(f"site must be one of {_RESID_SITES}, got {site!r}.")
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    hooks = [f"blocks.{layer}.hook_{site}" for layer in layer_list]
    patcher = _Patcher(model, clean, corrupted, metric, direction, hooks, logit_positions=logit_positions,
                       max_batch_tokens=max_batch_tokens, progress=progress, desc=f"patching {site}")
    pos_list = _check_positions(positions, patcher.n_pos)
    runs = []
    for layer in layer_list:
        source = patcher.source_cache[f"blocks.{layer}.hook_{site}"]
        for pos in pos_list:
            runs.append(_resid_run(patcher, site, layer, source, patcher.relative([pos]))
                        if patcher.covers(pos) else None)
    values, _ = patcher.run(runs)
    return _result(values, (len(layer_list), len(pos_list)), ("layer", "pos"),
                   {"layer": layer_list, "pos": [_position_labels(model, patcher.clean)[p] for p in pos_list]},
                   patcher.meta, f"{site} ({direction})")


def _resid_run(patcher: _Patcher, site: str, layer: int, source: torch.Tensor, positions: list[int] | None
               ) -> _PatchedRun:
    if site == "resid_pre":
        return _PatchedRun([(f"blocks.{layer}.hook_resid_pre", _set_positions(source, positions))], layer)
    if site == "resid_post":
        if layer + 1 < patcher.n_layers:  # the next block's input is the same vector
            return _PatchedRun([(f"blocks.{layer + 1}.hook_resid_pre", _set_positions(source, positions))],
                               layer + 1)
        return _PatchedRun([(f"blocks.{layer}.hook_resid_post", _set_positions(source, positions))], layer)
    # resid_mid = resid_pre + attn_out: set attn_out := source_mid - resid_pre (this run's resid_pre,
    # which is the target's cached one since nothing upstream is patched).
    resid_pre = patcher.target_cache[f"blocks.{layer}.hook_resid_pre"]
    return _PatchedRun([(f"blocks.{layer}.hook_attn_out", _set_positions(source - resid_pre, positions))], layer)


def _component_sweep(model, clean, corrupted, metric, hook_site: str, direction, layers, positions,
                     logit_positions, max_batch_tokens, progress) -> LabelledTensor:
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    hooks = [f"blocks.{layer}.hook_{hook_site}" for layer in layer_list]
    patcher = _Patcher(model, clean, corrupted, metric, direction, hooks, logit_positions=logit_positions,
                       max_batch_tokens=max_batch_tokens, progress=progress, desc=f"patching {hook_site}")
    pos_list = _check_positions(positions, patcher.n_pos)
    runs = []
    for layer in layer_list:
        name = f"blocks.{layer}.hook_{hook_site}"
        for pos in pos_list:
            runs.append(_PatchedRun([(name, _set_positions(patcher.source_cache[name], patcher.relative([pos])))],
                                    layer) if patcher.covers(pos) else None)
    values, _ = patcher.run(runs)
    return _result(values, (len(layer_list), len(pos_list)), ("layer", "pos"),
                   {"layer": layer_list, "pos": [_position_labels(model, patcher.clean)[p] for p in pos_list]},
                   patcher.meta, f"{hook_site} ({direction})")


def patch_attn_out(
    model: Any, clean: Any, corrupted: Any, metric: Metric, direction: Direction = "denoise", *,
    layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto", max_batch_tokens: int = 2048, progress: bool = True,
) -> LabelledTensor:
    """Patch each layer's attention output (``blocks.{l}.hook_attn_out``, all heads summed, what the
    attention adds to the residual stream) at one position at a time → ``[layer, pos]``.

    Direction as in :func:`patch_residual` (denoise: clean output into the corrupted run).
    """
    return _component_sweep(model, clean, corrupted, metric, "attn_out", direction, layers, positions,
                            logit_positions, max_batch_tokens, progress)


def patch_mlp_out(
    model: Any, clean: Any, corrupted: Any, metric: Metric, direction: Direction = "denoise", *,
    layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto", max_batch_tokens: int = 2048, progress: bool = True,
) -> LabelledTensor:
    """Patch each layer's MLP output (``blocks.{l}.hook_mlp_out``) at one position at a time →
    ``[layer, pos]``. Direction as in :func:`patch_residual`."""
    return _component_sweep(model, clean, corrupted, metric, "mlp_out", direction, layers, positions,
                            logit_positions, max_batch_tokens, progress)


def patch_layer_outputs(
    model: Any, clean: Any, corrupted: Any, metric: Metric,
    component: Literal["attn", "mlp", "resid_pre", "resid_mid", "resid_post"] = "attn",
    direction: Direction = "denoise", *, layers: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto", max_batch_tokens: int = 2048, progress: bool = True,
) -> LabelledTensor:
    """Patch a whole layer's component at **all** positions at once → ``[layer]``.

    ``component``: ``"attn"``/``"mlp"`` patch ``hook_attn_out``/``hook_mlp_out`` (what the layer's
    attention/MLP writes into the residual stream); ``"resid_pre"``/``"resid_mid"``/``"resid_post"``
    patch the whole residual stream there (so the run continues exactly as the source run from that
    point: the metric equals the source run's). Direction as in :func:`patch_residual`.
    """
    if component in _RESID_SITES:
        n_layers = int(model.cfg.n_layers)
        layer_list = _check_layers(layers, n_layers)
        patcher = _Patcher(model, clean, corrupted, metric, direction,
                           [f"blocks.{layer}.hook_{component}" for layer in layer_list],
                           logit_positions=logit_positions, max_batch_tokens=max_batch_tokens, progress=progress,
                           desc=f"patching {component}")
        runs = [_resid_run(patcher, component, layer, patcher.source_cache[f"blocks.{layer}.hook_{component}"], None)
                for layer in layer_list]
        values, _ = patcher.run(runs)
        return _result(values, (len(layer_list),), ("layer",), {"layer": layer_list}, patcher.meta,
                       f"{component}, all positions ({direction})")
    if component not in ("attn", "mlp"):
        raise ValueError(f"component must be one of 'attn', 'mlp', {', '.join(map(repr, _RESID_SITES))}; "
                         f"got {component!r}.")
    return patch_layer_window(model, clean, corrupted, metric, component=component, window=1,
                              direction=direction, layers=layers, logit_positions=logit_positions,
                              max_batch_tokens=max_batch_tokens, progress=progress)


def patch_hook(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    hook_names: str | Sequence[str],
    direction: Direction = "denoise",
    *,
    positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
) -> float:
    """One patched run: the activations at ``hook_names`` (any hooks of the model, e.g.
    ``"blocks.3.hook_mlp_out"``) replaced by the source run's at ``positions`` (default all) → metric.

    Direction as in :func:`patch_residual`. Note that the bridge's ``hook_resid_mid`` is the MLP
    norm's input only (use :func:`patch_residual` with ``site="resid_mid"`` for the residual stream).
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("patch_hook needs at least one hook name.")
    _check_hook_names(model, names)
    layers = [_layer_of(name) for name in names]
    start = -1 if any(layer is None for layer in layers) else min(layers)  # -1: from the tokens
    patcher = _Patcher(model, clean, corrupted, metric, direction, names, logit_positions=logit_positions,
                       progress=False, allow_suffix=start >= 0)
    pos_list = None if positions is None else patcher.relative(_check_positions(positions, patcher.n_pos))
    edits = [(name, _set_positions(patcher.source_cache[name], pos_list)) for name in names]
    values, _ = patcher.run([_PatchedRun(edits, start)])
    return values[0]


def patch_layer_window(
    model: Any, clean: Any, corrupted: Any, metric: Metric, component: Literal["attn", "mlp"] = "attn",
    window: int = 3, direction: Direction = "denoise", *, layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None, logit_positions: LogitPositions = "auto",
    max_batch_tokens: int = 2048, progress: bool = True,
) -> LabelledTensor:
    """Patch the attention (or MLP) outputs of a window of ``window`` consecutive layers at once → ``[layer]``.

    Entry ``l`` patches layers ``l - window//2 .. l - window//2 + window - 1`` (clipped to the model),
    i.e. a window centred on ``l`` as in Meng et al.'s causal tracing; the labels give each window.
    What is patched: ``blocks.{i}.hook_attn_out`` (or ``hook_mlp_out``) for every ``i`` in the window, at
    ``positions`` (default all). Direction as in :func:`patch_residual`.
    """
    if component not in ("attn", "mlp"):
        raise ValueError(f"component must be 'attn' or 'mlp', got {component!r}.")
    if int(window) < 1:
        raise ValueError(f"window must be a positive number of layers, got {window}.")
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    site = "attn_out" if component == "attn" else "mlp_out"
    windows = []
    for layer in layer_list:
        first = max(0, layer - window // 2)
        last = min(n_layers - 1, layer - window // 2 + window - 1)
        windows.append(list(range(first, last + 1)))
    needed = sorted({i for w in windows for i in w})
    patcher = _Patcher(model, clean, corrupted, metric, direction, [f"blocks.{i}.hook_{site}" for i in needed],
                       logit_positions=logit_positions, max_batch_tokens=max_batch_tokens, progress=progress,
                       desc=f"patching {site} windows")
    pos_list = None if positions is None else patcher.relative(_check_positions(positions, patcher.n_pos))
    runs = []
    for w in windows:
        edits = [(f"blocks.{i}.hook_{site}", _set_positions(patcher.source_cache[f"blocks.{i}.hook_{site}"], pos_list))
                 for i in w]
        runs.append(_PatchedRun(edits, w[0]))
    values, _ = patcher.run(runs)
    labels = layer_list if window == 1 else [f"{w[0]}-{w[-1]}" for w in windows]
    meta = {**patcher.meta, "windows": windows}
    return _result(values, (len(layer_list),), ("layer",), {"layer": labels}, meta,
                   f"{site} window={window} ({direction})")


_HEAD_ACTIVATIONS = {"z": "hook_z", "q": "hook_q", "k": "hook_k", "v": "hook_v", "pattern": "hook_pattern"}


def patch_heads(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    activation: Literal["z", "q", "k", "v", "pattern"] = "z",
    per_position: bool = False,
    direction: Direction = "denoise",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
    max_batch_tokens: int = 2048,
    progress: bool = True,
) -> LabelledTensor:
    """Patch one attention head's activation at a time → ``[layer, head]`` or ``[layer, pos, head]``.

    What is patched (``blocks.{l}.attn.hook_{activation}``):

    * ``"z"``: the head's output before ``W_O`` (its mixed values), i.e. the head's whole contribution
      to the residual stream — the usual "head output" patch;
    * ``"q"``: its queries (before rotary, where the model uses it); ``"pattern"``: its attention
      pattern (per query position when ``per_position``);
    * ``"k"``/``"v"``: keys/values. With grouped-query attention these exist per **key/value head**
      (dimension ``"kv_head"``, ``model.cfg.n_key_value_heads`` of them), each shared by
      ``n_heads / n_kv_heads`` query heads, so the patch affects the whole group.

    ``per_position=False`` patches all positions at once; ``True`` one (position, head) at a time
    (``[layer, pos, head]``, the layout of ``transformer_lens.patching``'s ``*_by_pos`` sweeps).
    Direction as in :func:`patch_residual` (denoise: clean activation into the corrupted run).
    """
    if activation not in _HEAD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_HEAD_ACTIVATIONS)}, got {activation!r}.")
    n_layers = int(model.cfg.n_layers)
    layer_list = _check_layers(layers, n_layers)
    hook = _HEAD_ACTIVATIONS[activation]
    hooks = [f"blocks.{layer}.attn.{hook}" for layer in layer_list]
    patcher = _Patcher(model, clean, corrupted, metric, direction, hooks, logit_positions=logit_positions,
                       max_batch_tokens=max_batch_tokens, progress=progress, desc=f"patching heads ({activation})")
    head_dim_name = "kv_head" if activation in ("k", "v") and _n_kv_heads(model) != int(model.cfg.n_heads) else "head"
    n_heads = _n_kv_heads(model) if head_dim_name == "kv_head" else int(model.cfg.n_heads)
    source_head_axis = 1 if activation == "pattern" else 2
    pos_list = _check_positions(positions, patcher.n_pos) if per_position else None
    if positions is not None and not per_position:
        raise ValueError("positions= only applies with per_position=True.")
    runs = []
    for layer in layer_list:
        name = f"blocks.{layer}.attn.{hook}"
        source = patcher.source_cache[name]
        if source.shape[source_head_axis] != n_heads:
            raise RuntimeError(f"{name} has {source.shape[source_head_axis]} heads, expected {n_heads}.")
        for pos in pos_list if per_position else [None]:
            for head in range(n_heads):
                if pos is not None and not patcher.covers(pos):
                    runs.append(None)  # identical activations in both runs: nothing to patch
                    continue
                rel = None if pos is None else patcher.relative([pos])
                runs.append(_PatchedRun([(name, _set_head(source, head, rel, source_head_axis))], layer))
    values, _ = patcher.run(runs)
    meta = {**patcher.meta, "activation": activation}
    if per_position:
        labels = {"layer": layer_list, "pos": [_position_labels(model, patcher.clean)[p] for p in pos_list],
                  head_dim_name: list(range(n_heads))}
        return _result(values, (len(layer_list), len(pos_list), n_heads), ("layer", "pos", head_dim_name), labels,
                       meta, f"head {activation} per position ({direction})")
    return _result(values, (len(layer_list), n_heads), ("layer", head_dim_name),
                   {"layer": layer_list, head_dim_name: list(range(n_heads))}, meta,
                   f"head {activation} ({direction})")


# ==================================================================================================
# Path patching
# ==================================================================================================

Head = tuple[int, int]


def _check_heads(model: Any, heads: Sequence[Head], what: str) -> list[Head]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    out = []
    try:
        items = [(int(layer), int(head)) for layer, head in heads]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of (layer, head) pairs, got {heads!r}.") from None
    if not items:
        raise ValueError(f"{what} is empty: give at least one (layer, head) pair.")
    for layer, head in items:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise IndexError(f"{what}: head ({layer}, {head}) does not exist (the model has {n_layers} layers × "
                             f"{n_heads} heads).")
        out.append((layer, head))
    return out


class _PathPatcher:
    """Shared machinery of :func:`path_patch` and :func:`path_patch_senders` (see their docs)."""

    def __init__(self, model, clean, corrupted, metric, receivers, receiver_input, direction, freeze_mlps,
                 receiver_positions, logit_positions, max_batch_tokens, progress):
        if receiver_input not in ("q", "k", "v"):
            raise ValueError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}.")
        self.model = model
        self.receivers = _check_heads(model, receivers, "receivers")
        self.receiver_input = receiver_input
        self.freeze_mlps = freeze_mlps
        self.n_layers = int(model.cfg.n_layers)
        self.receiver_layers = sorted({layer for layer, _ in self.receivers})
        grouped = _n_kv_heads(model) != int(model.cfg.n_heads)
        # "input": patch the receivers' q/k/v themselves (per head). "z": for keys/values shared by a group
        # of query heads (GQA), patch the receivers' outputs computed from the patched key/value instead.
        self.mode = "z" if (grouped and receiver_input in ("k", "v")) else "input"
        max_receiver = self.receiver_layers[-1]
        z_hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(max_receiver + 1)]
        self.frozen_inputs = [i for i in ("q", "k", "v") if i != receiver_input] if self.mode == "z" else []
        target_hooks = z_hooks + [f"blocks.{layer}.attn.hook_{i}" for layer in self.receiver_layers
                                  for i in self.frozen_inputs]
        if freeze_mlps:
            target_hooks += [f"blocks.{layer}.hook_mlp_out" for layer in range(max_receiver)]
        self.patcher = _Patcher(model, clean, corrupted, metric, direction, source_hooks=z_hooks,
                                target_hooks=target_hooks, logit_positions=logit_positions,
                                max_batch_tokens=max_batch_tokens, progress=progress, desc="path patching")
        if receiver_positions is not None and self.mode == "z":
            raise NotImplementedError(
                "receiver_positions with receiver_input='k'/'v' is not supported on grouped-query-attention "
                "models (keys/values are shared by several query heads); patch all positions instead."
            )
        self.receiver_positions = (None if receiver_positions is None else
                                   self.patcher.relative(_check_positions(receiver_positions, self.patcher.n_pos)))

    def runs_for(self, sender_sets: Sequence[Sequence[Head]]) -> list[float]:
        """Metric for each set of senders patched along paths into the receivers only."""
        p = self.patcher
        max_receiver = self.receiver_layers[-1]
        stop = max_receiver + 1 if max_receiver + 1 < self.n_layers else None
        # Step 1: the target run with the senders' z from the source run and every other head's z frozen
        # to the target run (MLPs recomputed unless freeze_mlps). Record what the receivers read: their
        # q/k/v ("input" mode), or their z computed with the other two inputs frozen to the target run
        # ("z" mode) — which differs from the target's only through the chosen input.
        capture_runs, records = [], []
        for senders in sender_sets:
            start = min(layer for layer, _ in senders)
            record: dict[str, torch.Tensor] = {}
            records.append(record)
            edits: list[tuple[str, Edit]] = []
            for layer in range(start, max_receiver + 1):
                name = f"blocks.{layer}.attn.hook_z"
                layer_senders = [h for l_, h in senders if l_ == layer]
                freeze = _freeze_heads_except(p.target_cache[name], p.source_cache[name], layer_senders)
                if self.mode == "z" and layer in self.receiver_layers:
                    freeze = _record_then(freeze, record, name)
                edits.append((name, freeze))
                if self.freeze_mlps and layer < max_receiver:
                    mlp = f"blocks.{layer}.hook_mlp_out"
                    edits.append((mlp, _set_positions(p.target_cache[mlp], None)))
            for layer in self.receiver_layers:
                if layer < start:
                    continue
                if self.mode == "input":
                    name = f"blocks.{layer}.attn.hook_{self.receiver_input}"
                    edits.append((name, _record_then(_no_edit, record, name)))
                for i in self.frozen_inputs:
                    name = f"blocks.{layer}.attn.hook_{i}"
                    edits.append((name, _set_positions(p.target_cache[name], None)))
            capture_runs.append(_PatchedRun(edits, start, stop_layer=stop))
        p.run(capture_runs)
        # Step 2: the target run, normal except for the receivers' recorded input (or z).
        final_runs = []
        hook = "hook_z" if self.mode == "z" else f"hook_{self.receiver_input}"
        for senders, record in zip(sender_sets, records):
            start = min(layer for layer, _ in senders)
            edits = []
            for layer in self.receiver_layers:
                if layer <= start:  # a receiver at or below the senders' layer is not downstream
                    continue
                heads = [h for l_, h in self.receivers if l_ == layer]
                name = f"blocks.{layer}.attn.{hook}"
                edits.append((name, _set_heads(record[name], heads, self.receiver_positions)))
            final_runs.append(_PatchedRun(edits, min(_layer_of(n) for n, _ in edits)) if edits else None)
        values, _ = p.run([r for r in final_runs if r is not None])
        it = iter(values)
        return [math.nan if r is None else next(it) for r in final_runs]


def _no_edit(rows: torch.Tensor) -> None:
    return None


def _record_then(edit: Edit, record: dict, name: str) -> Edit:
    def wrapped(rows: torch.Tensor) -> None:
        record[name] = rows.detach().clone()
        edit(rows)

    return wrapped


def _freeze_heads_except(target: torch.Tensor, source: torch.Tensor, senders: Sequence[int]) -> Edit:
    """z := target z for every head, except ``senders`` which get the source z."""

    def edit(rows: torch.Tensor) -> None:
        rows.copy_(target)
        for head in senders:
            rows[:, :, head] = source[:, :, head]

    return edit


def _set_heads(source: torch.Tensor, heads: Sequence[int], positions: Sequence[int] | None) -> Edit:
    def edit(rows: torch.Tensor) -> None:
        for head in heads:
            if positions is None:
                rows[:, :, head] = source[:, :, head]
            else:
                rows[:, positions, head] = source[:, positions, head]

    return edit


def path_patch(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    senders: Sequence[Head],
    receivers: Sequence[Head],
    receiver_input: Literal["q", "k", "v"] = "q",
    direction: Direction = "noise",
    *,
    freeze_mlps: bool = False,
    receiver_positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
    progress: bool = False,
) -> float:
    """Path patching (Wang et al. 2022): the effect of the senders' output *only* via the receivers'
    queries/keys/values.

    Default ``direction="noise"`` is the IOI paper's: run the clean prompts, take the senders' outputs
    (``hook_z``) from the corrupted run. Algorithm:

    1. Run the target prompts with the senders' ``z`` from the source run and **every other head's z
       frozen** to its target-run value (MLPs are recomputed, as in the paper's code, unless
       ``freeze_mlps=True``). Record the receivers' ``receiver_input`` (``hook_q``/``hook_k``/``hook_v``).
    2. Run the target prompts normally except that the receivers' ``receiver_input`` is replaced by
       the recorded value (at ``receiver_positions``, default all positions). Return ``metric``.

    Grouped-query attention (the embedded model): keys and values exist per key/value head, shared
    by several query heads, so patching a receiver's ``k``/``v`` would also change its group mates.
    There, step 1 instead records the receivers' outputs ``z`` computed with the patched keys (values)
    and with queries and values (keys) frozen to the target run, and step 2 patches those ``z``. This
    equals patching the input itself when the receivers sit in one layer; with receivers in several
    layers it also blocks paths from earlier receivers into later receivers' other inputs.

    Returns:
        ``metric`` on the path-patched run (``nan`` if every receiver sits at or below the senders'
        lowest layer: there is no path).
    """
    _check_direction(direction)
    senders = _check_heads(model, senders, "senders")
    engine = _PathPatcher(model, clean, corrupted, metric, receivers, receiver_input, direction, freeze_mlps,
                          receiver_positions, logit_positions, 2048, progress)
    return engine.runs_for([senders])[0]


def path_patch_senders(
    model: Any,
    clean: TokenBatch | Int[torch.Tensor, "batch pos"],
    corrupted: TokenBatch | Int[torch.Tensor, "batch pos"],
    metric: Metric,
    receivers: Sequence[Head],
    receiver_input: Literal["q", "k", "v"] = "q",
    direction: Direction = "noise",
    *,
    freeze_mlps: bool = False,
    receiver_positions: Sequence[int] | None = None,
    logit_positions: LogitPositions = "auto",
    max_batch_tokens: int = 2048,
    progress: bool = True,
) -> LabelledTensor:
    """:func:`path_patch` with every head as the single sender → ``[layer, head]``.

    Heads at or above the highest receiver layer have no path into the receivers: their entries are
    ``nan``. ``result.meta`` holds the clean/corrupted baselines.
    """
    _check_direction(direction)
    engine = _PathPatcher(model, clean, corrupted, metric, receivers, receiver_input, direction, freeze_mlps,
                          receiver_positions, logit_positions, max_batch_tokens, progress)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    max_receiver = engine.receiver_layers[-1]
    senders = [(layer, head) for layer in range(max_receiver) for head in range(n_heads)]
    values = engine.runs_for([[s] for s in senders]) if senders else []
    grid = torch.full((n_layers, n_heads), math.nan)
    for (layer, head), value in zip(senders, values):
        grid[layer, head] = value
    meta = {**engine.patcher.meta, "receivers": engine.receivers, "receiver_input": receiver_input}
    return LabelledTensor(grid, ("layer", "head"), {}, {**meta, "what": f"path patching → {receiver_input} ({direction})"})
