"""Path patching (Wang et al. 2022): the effect of sender heads only through the receiver heads'
queries, keys or values (:func:`path_patch`, and every head as the sender: :func:`path_patch_senders`),
on top of the batched engine."""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Int

from helpers.labelled_tensor import LabelledTensor
from helpers.metrics import Metric
from helpers.patching.engine import Edit, _layer_of, _PatchedRun, _Patcher, _set_positions
from helpers.patching.inputs import Direction, LogitPositions, _check_direction, _check_positions, _n_kv_heads
from helpers.prompts import TokenBatch

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
    max_batch_tokens: int | None = None,
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
