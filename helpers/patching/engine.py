"""The batched patching engine: :class:`_Patcher` caches the clean and corrupted runs once and runs
many patched forwards per batch, each from the patched layer on (and only over the positions where
the clean and corrupted prompts can differ). See :mod:`helpers.patching` for how and why it is exact.

A patched run (:class:`_PatchedRun`) is a list of in-place edits (hook name → :data:`Edit`) and the
layer to start from; the edit builders at the end make the usual edits."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from helpers import batching
from helpers.labelled_tensor import LabelledTensor
from helpers.metrics import Metric
from helpers.patching.inputs import Direction, LogitPositions, _check_direction, _check_hook_names, _check_pair

Edit = Callable[[torch.Tensor], None]
"""In-place edit of one copy's rows ``[batch, ...]`` of an activation."""

logger = logging.getLogger(__name__)


class SharedPrefixWarning(RuntimeWarning):
    """The shared-prefix fast path (see :meth:`_Patcher._setup_suffix`) is off for a model that does not
    support it: results stay exact (every patched run covers the whole sequence), only slower."""


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
        max_batch_tokens: int | None = None,
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
        if max_batch_tokens is None:
            max_batch_tokens = batching.max_batch_tokens(model)
        elif not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be a positive int (tokens per forward pass) or None for the "
                             f"default budget (helpers.batching.max_batch_tokens), got {max_batch_tokens!r}.")
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
        self.shared_prefix_off: str | None = None
        """Why patched runs compute the whole sequence (``None`` when they skip the shared prefix)."""
        if not allow_suffix:
            self._prefix_off("the caller asked for full-sequence runs (allow_suffix=False)", unsupported=False)
        elif self.keep_positions is None:
            self._prefix_off("no metric" if metric is None else "the metric reads logits at every position",
                             unsupported=False)
        else:
            self._setup_suffix(target_logits)
        self.meta["shared_prefix_positions"] = self.p0
        if self.shared_prefix_off is not None:
            self.meta["shared_prefix_off"] = self.shared_prefix_off

    # -- the shared prefix -------------------------------------------------------------------------

    def _setup_suffix(self, target_logits: torch.Tensor) -> None:
        """Run patched forwards only over the positions where clean and corrupted prompts can differ.

        Positions before the first token (or mask entry) that differs between the clean and corrupted
        batches have identical activations in both runs, and a causal model's later positions cannot
        change them: a patched run only needs to compute the suffix from ``p0`` on, reading the prefix's
        keys/values from the target run (a Hugging Face KV cache). Patching a position before ``p0``
        swaps identical values, so its result is the target run's metric.

        The prefix's keys/values come from a plain ``DynamicCache`` handed to the target run (the cache a
        model builds for itself may drop positions: Gemma-3's sliding-window layers keep only the last
        window - 1 keys). Checked once against the full run; if the model hands back no usable cache
        (none, one without per-layer keys/values, the wrong number of layers, or a layer whose keys do
        not hold every position), or the suffix run does not reproduce the full run (an architecture
        whose attention ignores the KV cache) or fails with a ``RuntimeError`` (one whose attention
        cannot continue from it, e.g. a tensor-shape mismatch), the full sequence is used and
        :attr:`shared_prefix_off` (also ``meta["shared_prefix_off"]``) says why, with a
        :class:`SharedPrefixWarning` and a log line. Any other error (and an out-of-memory error)
        propagates.
        """
        differs = (self.clean.tokens != self.corrupted.tokens) | (self.clean.attention_mask != self.corrupted.attention_mask)
        columns = differs.any(0).nonzero()
        first = int(columns[0]) if len(columns) else self.n_pos
        p0 = min(first, min(self.keep_positions))
        if p0 <= 0:
            self._prefix_off("the clean and corrupted prompts differ from the first position on", unsupported=False)
            return
        try:
            from transformers import DynamicCache
        except ImportError as err:  # an old transformers: no cache object to hand the prefix in
            self._prefix_off(f"transformers has no DynamicCache ({err})")
            return
        # A plain DynamicCache keeps every position of every layer. The cache a model builds for
        # itself may not: Gemma-3's sliding-window layers keep only their last window - 1 keys.
        cache = DynamicCache()
        with torch.no_grad():
            _, past = self.model(self.target.tokens, attention_mask=self.target.attention_mask,
                                 past_key_values=cache, use_cache=True, return_type="logits_and_cache")
        layers = getattr(past, "layers", None)
        if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
            self._prefix_off(f"the model returned no Hugging Face cache with per-layer keys/values "
                             f"(got {type(past).__name__})")
            return
        if len(layers) != self.n_layers:
            self._prefix_off(f"the model's cache has {len(layers)} layers, the model {self.n_layers}")
            return
        # Every layer must hold the keys of every position: a sliding-window cache (Gemma-3's own keeps
        # only the last window - 1) would hand the suffix the wrong prefix or none.
        short = [(i, None if layer.keys is None else tuple(layer.keys.shape)) for i, layer in enumerate(layers)
                 if layer.keys is None or layer.keys.ndim != 4 or layer.keys.shape[2] != self.n_pos]
        if short:
            i, shape = short[0]
            self._prefix_off(f"the model's cache does not hold the keys of all {self.n_pos} positions in "
                             f"{len(short)} layer(s) (layer {i}: keys {shape}; a sliding-window cache?)")
            return
        prefix = [(layer.keys[:, :, :p0].clone(), layer.values[:, :, :p0].clone()) for layer in layers]
        full_cache = (self.source_cache, self.target_cache)
        self.p0, self.prefix_kv = p0, prefix
        self.source_cache = {n: _suffix_slice(n, t, p0) for n, t in full_cache[0].items()}
        self.target_cache = {n: _suffix_slice(n, t, p0) for n, t in full_cache[1].items()}
        reference = target_logits[:, self.keep_positions]
        try:
            with torch.no_grad():  # check: the unpatched suffix run reproduces the target run's logits
                values, _ = self.run([_PatchedRun([], 0)], _return_logits=True)
            check = values[0]
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            # An attention that cannot continue from the cache fails with a tensor-shape RuntimeError (a
            # sliding-window cache: "The size of tensor a (20) must match the size of tensor b (10) at
            # non-singleton dimension 3" in the bridge's attention-mask reconstruction). Any other
            # exception type is a bug and propagates.
            self.p0, self.prefix_kv = 0, []
            self.source_cache, self.target_cache = full_cache
            self._prefix_off(f"a run over positions {p0}.. with the prefix's cached keys/values raised "
                             f"{type(err).__name__}: {err}")
            return
        if check.shape != reference.shape or not torch.allclose(check, reference, atol=1e-4, rtol=1e-4):
            self.p0, self.prefix_kv = 0, []
            self.source_cache, self.target_cache = full_cache
            gap = float((check - reference).abs().max()) if check.shape == reference.shape else math.inf
            self._prefix_off(f"a run over positions {p0}.. with the prefix's cached keys/values does not reproduce "
                             f"the full run (max |logit difference| {gap:.3g}): the model's attention ignores the cache")

    def _prefix_off(self, reason: str, *, unsupported: bool = True) -> None:
        """Record why the shared-prefix fast path is off: always as :attr:`shared_prefix_off` (and in
        ``meta``); when the model does not support it (``unsupported``) also as a log line and a
        :class:`SharedPrefixWarning`."""
        self.shared_prefix_off = reason
        if unsupported:
            message = f"patching: shared-prefix fast path off ({reason}); patched runs compute every position"
            logger.warning(message)
            warnings.warn(message, SharedPrefixWarning, stacklevel=3)
        else:
            logger.debug("patching: shared-prefix fast path not used (%s)", reason)

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
        if self.keep_positions is None:  # every position's logits are kept: half the budget for them
            k = min(k, batching.logit_rows(self.model, per_copy, batching.FORWARD_BUDGET_BYTES // 2))
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

    def _skip_blocks_below(self, start: int):
        """:func:`skip_blocks_below` on this patcher's model."""
        return skip_blocks_below(self.model, start)


@contextlib.contextmanager
def skip_blocks_below(model: Any, start: int) -> Iterator[None]:
    """Temporarily make blocks ``0..start-1`` of ``model`` return their input unchanged.

    The bridge's ``start_at_layer`` swaps the cached residual in at block ``start`` but still runs
    the blocks below it; passing their input through skips that wasted work. The blocks stay in
    the wrapped model's layer list: models that look up per-layer settings by position in that
    list (Gemma-2/3 pick each layer's sliding-window or global mask and rotary base from
    ``config.layer_types[i]``) would otherwise give block ``start`` the settings of block 0.
    Hooks live on the block modules themselves, so they are unaffected. Also used by
    :mod:`helpers.effects`.
    """
    if start <= 0:
        yield
        return
    skipped = list(model.blocks)[:start]
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
