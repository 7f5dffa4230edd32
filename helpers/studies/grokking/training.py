"""Grokking modular addition (Nanda et al. 2023): the model, the data and a fast training loop.

The paper trains a one-layer transformer on ``a + b mod p`` (``p = 113``) from 30% of all pairs
and watches it first memorise the training set, then — thousands of epochs later — generalise.
This module reproduces the paper's setup exactly and fast:

* :class:`GrokkingConfig` – the paper's hyper-parameters (1 layer, d_model 128, 4 heads of 32,
  d_mlp 512, ReLU, no LayerNorm, learned positions, untied embed/unembed, vocab 114 with "=" as
  token 113; AdamW lr 1e-3, weight decay 1.0, betas (0.9, 0.98), 10-step linear warm-up,
  full batch, float64 cross-entropy at the last position, 40,000 epochs).
* :func:`make_dataset` – all ``p²`` inputs ``(a, b, =)`` and the paper code's train/test split
  (Python's ``random.Random(seed).shuffle`` of the pairs, first 30% for training; the same
  permutation the official code gets from ``random.seed(seed); random.shuffle(pairs)``).
* :class:`GrokkingTransformer` – our own implementation, with a leading **model** dimension so
  that several independently initialised models (seeds, or checkpoints) run in one batched
  forward pass. It computes only what the loss reads, the last position: queries only at the last
  position, keys and values for all three positions, and it builds them from per-(position,
  token) tables (``(W_E + W_pos) @ W_K`` has only ``3 × 114`` rows, whatever the batch size).
  Mathematically it is the paper's model; the initialisation mirrors the paper's code
  (``progress-measures-paper/transformers.py``): every weight ``N(0, 1)/sqrt(d_model)`` except the
  unembedding, ``N(0, 1)/sqrt(d_vocab)``, and zero MLP biases; no attention or unembedding biases.
* :func:`train` – full-batch AdamW on ``n_models`` models at once (AdamW is elementwise, so one
  optimizer over parameters with a leading model dimension trains every model independently; the
  summed loss gives each model exactly its own gradient). It keeps a snapshot of the parameters
  every ``checkpoint_every`` epochs, from which :mod:`helpers.studies.grokking.fourier` computes the progress
  measures afterwards (they need the final model's key frequencies).
* :func:`to_bridge` – the trained model as a ``TransformerBridge`` (TransformerLens 4), so every
  TransformerLens hook works on it; its logits equal ours (checked in the tests).

Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` (weights + config + metadata) and
:func:`save_history` / :func:`load_history` (progress-measure arrays), used by the ``ci`` profile
and by ``scripts/train_grokking_checkpoint.py`` which regenerates them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import einops
import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from helpers.packaged_files import HELPERS_DATA_DIR

PARAM_NAMES: tuple[str, ...] = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "b_in", "W_out", "b_out", "W_U")
"""Parameter names, TransformerLens-style, each with a leading ``model`` dimension."""

DATA_DIR = HELPERS_DATA_DIR / "grokking"
"""Where the committed ``ci`` checkpoint and training history live."""


# --------------------------------------------------------------------------------------------------
# Configuration and data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrokkingConfig:
    """The paper's model and training hyper-parameters (defaults are the paper's).

    ``d_vocab_out`` is ``p + 1`` as in the paper's code (its unembedding also has a logit for "=");
    the loss is taken over all ``d_vocab_out`` logits and the Fourier analysis reads the first ``p``.
    """

    p: int = 113
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 3
    frac_train: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 10
    n_epochs: int = 40_000
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("p", "d_model", "n_heads", "d_head", "d_mlp", "n_epochs", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GrokkingConfig.{name} must be a positive integer, got {value!r}.")
        if self.p < 3:
            raise ValueError(f"GrokkingConfig.p must be at least 3 (a prime like 113), got {self.p}.")
        if self.n_ctx != 3:
            raise ValueError(f"GrokkingConfig.n_ctx must be 3 (inputs are `a b =`), got {self.n_ctx}.")
        if not 0.0 < self.frac_train < 1.0:
            raise ValueError(f"GrokkingConfig.frac_train must be in (0, 1), got {self.frac_train}.")
        if self.warmup_steps < 0:
            raise ValueError(f"GrokkingConfig.warmup_steps must be >= 0, got {self.warmup_steps}.")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def d_vocab(self) -> int:
        """Input vocabulary: the numbers ``0 … p-1`` and "=" (token ``p``)."""
        return self.p + 1

    @property
    def d_vocab_out(self) -> int:
        return self.p + 1

    @property
    def equals_token(self) -> int:
        return self.p

    def replace(self, **changes: Any) -> "GrokkingConfig":
        """A copy with some fields changed, e.g. ``config.replace(n_epochs=1000)``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModularAdditionData:
    """All ``p²`` inputs ``(a, b, =)`` with labels ``(a + b) mod p`` and one train/test split.

    Row ``a * p + b`` of :attr:`tokens` is the input ``(a, b, =)``, so reshaping any per-input
    quantity to ``[p, p]`` gives a grid indexed by ``(a, b)``.
    """

    p: int
    seed: int
    tokens: Int[torch.Tensor, "p_sq 3"]
    labels: Int[torch.Tensor, "p_sq"]
    train_indices: Int[torch.Tensor, "n_train"]
    test_indices: Int[torch.Tensor, "n_test"]

    @property
    def is_train(self) -> torch.Tensor:
        mask = torch.zeros(self.p * self.p, dtype=torch.bool, device=self.tokens.device)
        mask[self.train_indices] = True
        return mask

    def to(self, device: str | torch.device) -> "ModularAdditionData":
        return ModularAdditionData(self.p, self.seed, self.tokens.to(device), self.labels.to(device),
                                   self.train_indices.to(device), self.test_indices.to(device))


def make_dataset(p: int = 113, frac_train: float = 0.3, seed: int = 0) -> ModularAdditionData:
    """All inputs of ``a + b mod p`` and the paper code's train/test split for ``seed``.

    The pairs ``(a, b)`` are listed in row-major order and shuffled with ``random.Random(seed)``;
    the first ``int(frac_train * p²)`` are the training set (3,830 of 12,769 for the paper).
    """
    if p < 3:
        raise ValueError(f"make_dataset(p=...) expects p >= 3, got {p}.")
    if not 0.0 < frac_train < 1.0:
        raise ValueError(f"make_dataset(frac_train=...) must be in (0, 1), got {frac_train}.")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    tokens = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    labels = (a.flatten() + b.flatten()) % p
    order = list(range(p * p))
    random.Random(seed).shuffle(order)
    n_train = int(frac_train * p * p)
    train = torch.tensor(sorted(order[:n_train]))
    test = torch.tensor(sorted(order[n_train:]))
    return ModularAdditionData(p, seed, tokens, labels, train, test)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def init_params(
    config: GrokkingConfig, seeds: Sequence[int], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The paper code's initialisation, one independent draw per seed, stacked on a model dimension.

    ``W_E, W_pos, W_Q, W_K, W_V, W_O, W_in, W_out ~ N(0, 1)/sqrt(d_model)``,
    ``W_U ~ N(0, 1)/sqrt(d_vocab)``, ``b_in = b_out = 0``. Each seed uses its own CPU generator,
    so a model's weights do not depend on which other seeds it is trained with.
    """
    if len(seeds) == 0:
        raise ValueError("init_params(seeds=...) needs at least one seed.")
    c = config
    shapes = {
        "W_E": (c.d_vocab, c.d_model), "W_pos": (c.n_ctx, c.d_model),
        "W_Q": (c.n_heads, c.d_model, c.d_head), "W_K": (c.n_heads, c.d_model, c.d_head),
        "W_V": (c.n_heads, c.d_model, c.d_head), "W_O": (c.n_heads, c.d_head, c.d_model),
        "W_in": (c.d_model, c.d_mlp), "b_in": (c.d_mlp,), "W_out": (c.d_mlp, c.d_model),
        "b_out": (c.d_model,), "W_U": (c.d_model, c.d_vocab_out),
    }
    scale = {name: 1 / math.sqrt(c.d_model) for name in shapes}
    scale["W_U"] = 1 / math.sqrt(c.d_vocab)
    per_seed = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        per_seed.append({
            name: (torch.randn(shape, generator=generator) * scale[name]) if name.startswith("W")
            else torch.zeros(shape)
            for name, shape in shapes.items()
        })
    return {name: torch.stack([p[name] for p in per_seed]).to(device) for name in shapes}


def forward(
    params: Mapping[str, torch.Tensor],
    tokens: Int[torch.Tensor, "... batch 3"],
    *,
    cache: dict[str, torch.Tensor] | None = None,
) -> Float[torch.Tensor, "model batch d_vocab_out"]:
    """Logits at the last position of every model in ``params`` on ``tokens``.

    Args:
        params: tensors named as in :data:`PARAM_NAMES`, each with a leading ``model`` dimension.
        tokens: ``[batch, 3]`` (the same inputs for every model) or ``[model, batch, 3]``.
        cache: if a dict is given, it is filled with the last position's activations:
            ``pattern`` ``[model, batch, head, key_pos]`` (attention of the last position),
            ``z`` ``[model, batch, head, d_head]``, ``attn_out``, ``resid_mid``,
            ``mlp_pre``/``mlp_post`` ``[model, batch, d_mlp]``, ``resid_post``.

    The computation is the paper's transformer block (no LayerNorm), done only at the last
    position: ``resid = W_E[t] + W_pos``; attention of the last position over all
    three (keys/values from per-(position, token) tables); ``resid += attn``;
    ``resid += W_out·ReLU(W_in·resid + b_in) + b_out``; ``logits = resid @ W_U``.
    """
    W_E, W_pos = params["W_E"], params["W_pos"]
    n_models, d_vocab, d_model = W_E.shape
    n_heads, d_head = params["W_Q"].shape[1], params["W_Q"].shape[-1]
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 3 or tokens.shape[-1] != W_pos.shape[1]:
        raise ValueError(f"forward(tokens=...) expects [batch, {W_pos.shape[1]}] or [model, batch, "
                         f"{W_pos.shape[1]}] token ids, got shape {tuple(tokens.shape)}.")
    if tokens.shape[0] not in (1, n_models):
        raise ValueError(f"tokens has {tokens.shape[0]} models in its first dimension, params have {n_models}.")
    n_pos = tokens.shape[-1]

    # Everything before the MLP depends on the inputs only through (position, token) pairs, so it
    # is computed once per pair ("tables", 3 × d_vocab rows) and then looked up per example.
    embed_table = W_E[:, None, :, :] + W_pos[:, :, None, :]           # [model, pos, vocab, d_model]
    q_table = torch.einsum("mtd,mhde->mthe", embed_table[:, -1], params["W_Q"])  # last position only
    k_table = torch.einsum("mptd,mhde->mpthe", embed_table, params["W_K"])
    v_table = torch.einsum("mptd,mhde->mpthe", embed_table, params["W_V"])
    # Attention score of a last-position query token against a key token at each position.
    score_table = torch.einsum("mqhe,mpthe->mqpth", q_table, k_table) / math.sqrt(d_head)

    # Look the tables up with index_select on flattened rows (much faster than advanced indexing
    # on CPU, forward and backward). Row of (model, pos, token): (model * n_pos + pos) * vocab + token.
    batch = tokens.shape[1]
    model_index = torch.arange(n_models, device=tokens.device)[:, None, None]
    pos_index = torch.arange(n_pos, device=tokens.device)
    last_tokens = tokens[..., -1:].expand(n_models, batch, n_pos)
    value_rows = ((model_index * n_pos + pos_index) * d_vocab + tokens).flatten()
    score_rows = (((model_index * d_vocab + last_tokens) * n_pos + pos_index) * d_vocab + tokens).flatten()
    last_rows = (model_index[..., 0] * d_vocab + tokens[..., -1]).flatten()
    scores = score_table.reshape(-1, n_heads).index_select(0, score_rows).view(n_models, batch, n_pos, n_heads)
    v = v_table.reshape(-1, n_heads, d_head).index_select(0, value_rows).view(n_models, batch, n_pos, n_heads, d_head)
    resid_last = embed_table[:, -1].reshape(-1, d_model).index_select(0, last_rows).view(n_models, batch, d_model)

    pattern = scores.softmax(dim=2)                                    # over the 3 key positions
    # Three values per head: elementwise products beat a batched matmul of tiny blocks.
    z = (pattern[..., None] * v).sum(dim=2)                            # [model, batch, h, e]
    pattern = pattern.transpose(2, 3)                                  # [model, batch, h, key_pos]
    attn_out = z.flatten(2) @ params["W_O"].flatten(1, 2)
    resid_mid = resid_last + attn_out
    mlp_pre = torch.baddbmm(params["b_in"][:, None, :], resid_mid, params["W_in"])
    mlp_post = F.relu(mlp_pre)
    resid_post = resid_mid + torch.baddbmm(params["b_out"][:, None, :], mlp_post, params["W_out"])
    logits = resid_post @ params["W_U"]
    if cache is not None:
        cache.update(pattern=pattern, z=z, attn_out=attn_out, resid_mid=resid_mid, mlp_pre=mlp_pre,
                     mlp_post=mlp_post, resid_post=resid_post)
    return logits


class GrokkingTransformer(nn.Module):
    """``n_models`` independent copies of the paper's one-layer transformer, batched.

    Parameters carry a leading ``model`` dimension (``model.W_E[i]`` is model ``i``'s embedding).
    Call it on ``[batch, 3]`` tokens to get ``[n_models, batch, d_vocab_out]`` last-position logits.
    ``model[i]`` is a one-model copy sharing nothing with the original.
    """

    def __init__(self, config: GrokkingConfig = GrokkingConfig(), seeds: Sequence[int] = (0,),
                 device: str | torch.device = "cpu", params: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        self.seeds = tuple(int(s) for s in seeds)
        values = init_params(config, self.seeds, device) if params is None else params
        missing = set(PARAM_NAMES) - set(values)
        if missing:
            raise ValueError(f"GrokkingTransformer(params=...) is missing {sorted(missing)}.")
        for name in PARAM_NAMES:
            self.register_parameter(name, nn.Parameter(values[name].detach().clone().float()))
        if self.W_E.shape[0] != len(self.seeds):
            raise ValueError(f"params hold {self.W_E.shape[0]} models but {len(self.seeds)} seeds were given.")

    @property
    def n_models(self) -> int:
        return self.W_E.shape[0]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def forward(self, tokens: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return forward(self.params, tokens, cache=cache)

    def run_with_cache(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the last position's activations (see :func:`forward` for the names)."""
        cache: dict[str, torch.Tensor] = {}
        logits = forward(self.params, tokens, cache=cache)
        return logits, cache

    def __getitem__(self, index: int) -> "GrokkingTransformer":
        if not -self.n_models <= index < self.n_models:
            raise IndexError(f"model index {index} out of range for {self.n_models} models.")
        params = {name: value[index:index + 1].detach() for name, value in self.params.items()}
        return GrokkingTransformer(self.config, (self.seeds[index],), params=params)

    def W_L(self) -> Float[torch.Tensor, "model d_mlp p"]:
        """Neuron → logit map ``W_out @ W_U`` restricted to the ``p`` number outputs (paper: W_L)."""
        return (self.W_out @ self.W_U)[..., : self.config.p]


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def cross_entropy_float64(
    logits: Float[torch.Tensor, "... batch vocab"], labels: Int[torch.Tensor, "... batch"]
) -> Float[torch.Tensor, "..."]:
    """Mean cross-entropy over the batch dimension, computed in float64 (as the paper does).

    In float32, ``log_softmax`` cannot resolve losses below ~1.2e-7 (it returns multiples of it),
    which the paper reports causes loss spikes late in training.
    """
    logprobs = logits.double().log_softmax(dim=-1)
    labels = labels.expand(logprobs.shape[:-1])
    return -logprobs.gather(-1, labels[..., None]).squeeze(-1).mean(dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of argmax predictions equal to the labels, per model."""
    return (logits.argmax(dim=-1) == labels).double().mean(dim=-1)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What :func:`train` returns.

    Attributes:
        model: the trained models (``n_models`` on the model dimension).
        data: one :class:`ModularAdditionData` per model (each seed has its own split).
        train_loss: ``[n_epochs, n_models]`` float64 training loss before each optimizer step.
        checkpoint_epochs: epochs of the snapshots (``0, checkpoint_every, …, n_epochs``).
        snapshots: parameter name → ``[n_checkpoints, n_models, ...]`` float32 (on ``model``'s device).
        seconds: wall time of the loop (excluding setup).
    """

    config: GrokkingConfig
    model: GrokkingTransformer
    data: list[ModularAdditionData]
    train_loss: np.ndarray
    checkpoint_epochs: np.ndarray
    snapshots: dict[str, torch.Tensor] | None
    seconds: float

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.model.seeds


def _stack_split(data: Sequence[ModularAdditionData], which: str) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.stack([getattr(d, f"{which}_indices") for d in data])          # [model, n]
    tokens = torch.stack([d.tokens[i] for d, i in zip(data, indices)])              # [model, n, 3]
    labels = torch.stack([d.labels[i] for d, i in zip(data, indices)])              # [model, n]
    return tokens, labels


def train(
    config: GrokkingConfig = GrokkingConfig(),
    seeds: Sequence[int] = (0,),
    *,
    n_epochs: int | None = None,
    device: str | torch.device = "cpu",
    keep_snapshots: bool = True,
    progress: bool = True,
    initial: GrokkingTransformer | None = None,
) -> TrainingRun:
    """Train one model per seed with the paper's recipe, all in one batched loop.

    Args:
        config: hyper-parameters (defaults: the paper's).
        seeds: one model per seed. A seed sets both the initialisation and the train/test split
            (seed ``s`` uses :func:`make_dataset` ``(seed=s)``), as in the paper's code.
        n_epochs: overrides ``config.n_epochs`` (e.g. a short run).
        device: ``"cpu"``, ``"cuda"``, …
        keep_snapshots: keep the parameters every ``config.checkpoint_every`` epochs (needed for
            :func:`helpers.studies.grokking.fourier.progress_measures`; 0.9 MB per model per snapshot).
        progress: show a ``tqdm`` bar with the training loss and test accuracy (worst model).
        initial: continue training these models (in place) instead of a fresh initialisation
            (seeds must match; the optimizer state starts afresh).

    Full batch: every epoch is one AdamW step on each model's whole training set. The learning
    rate warms up linearly, ``lr · min(step / warmup_steps, 1)`` (``LambdaLR``, so step 0 has
    ``lr = 0``, like the paper's code). Deterministic on CPU for a fixed thread count.
    """
    from tqdm.auto import tqdm

    n_epochs = config.n_epochs if n_epochs is None else int(n_epochs)
    if n_epochs < 0:
        raise ValueError(f"train(n_epochs=...) must be >= 0, got {n_epochs}.")
    seeds = tuple(int(s) for s in seeds)
    if len(seeds) == 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"train(seeds=...) needs distinct seeds, got {seeds}.")
    if initial is not None and initial.seeds != seeds:
        raise ValueError(f"train(initial=...) holds seeds {initial.seeds}, but seeds={seeds}.")
    model = (GrokkingTransformer(config, seeds) if initial is None else initial).to(device).requires_grad_(True)
    data = [make_dataset(config.p, config.frac_train, s).to(device) for s in seeds]
    train_tokens, train_labels = _stack_split(data, "train")
    test_tokens, test_labels = _stack_split(data, "test")

    # One fused kernel per step on CUDA; on CPU the multi-tensor ("foreach") implementation.
    fused = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay, foreach=not fused, fused=fused)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(step / warmup, 1.0) if warmup > 0 else 1.0)

    every = config.checkpoint_every
    checkpoint_epochs = np.arange(0, n_epochs + 1, every)
    snapshots = None
    if keep_snapshots:
        snapshots = {name: torch.empty((len(checkpoint_epochs), *value.shape), dtype=torch.float32, device=value.device)
                     for name, value in model.params.items()}
    losses = torch.empty((n_epochs, len(seeds)), dtype=torch.float64, device=device)

    def snapshot(epoch: int) -> None:
        if snapshots is not None and epoch % every == 0:
            with torch.no_grad():
                for name, value in model.params.items():
                    snapshots[name][epoch // every].copy_(value)

    start = time.perf_counter()
    snapshot(0)
    bar = tqdm(range(n_epochs), desc="training", disable=not progress, mininterval=1.0)
    for epoch in bar:
        per_model = cross_entropy_float64(model(train_tokens), train_labels)
        per_model.sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses[epoch] = per_model.detach()
        snapshot(epoch + 1)
        if progress and (epoch + 1) % every == 0:
            with torch.no_grad():
                test_accuracy = accuracy(model(test_tokens), test_labels)
            bar.set_postfix(train_loss=f"{losses[epoch].max().item():.2e}",
                            test_acc=f"{test_accuracy.min().item():.3f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    model.requires_grad_(False)
    return TrainingRun(config, model, data, losses.cpu().numpy(), checkpoint_epochs, snapshots, seconds)


def snapshot_params(run_or_snapshots: TrainingRun | Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The parameters of checkpoint number ``index`` (all models), as a ``forward``-ready dict."""
    snapshots = run_or_snapshots.snapshots if isinstance(run_or_snapshots, TrainingRun) else run_or_snapshots
    if snapshots is None:
        raise ValueError("This run kept no snapshots: train(..., keep_snapshots=True).")
    return {name: value[index] for name, value in snapshots.items()}


# --------------------------------------------------------------------------------------------------
# TransformerLens bridge
# --------------------------------------------------------------------------------------------------


def bridge_config(config: GrokkingConfig, seed: int = 0) -> Any:
    """The ``TransformerBridgeConfig`` of the paper's architecture (for ``boot_native``)."""
    from transformer_lens import TransformerBridgeConfig

    return TransformerBridgeConfig(
        n_layers=1, d_model=config.d_model, n_heads=config.n_heads, d_head=config.d_head,
        d_mlp=config.d_mlp, d_vocab=config.d_vocab, d_vocab_out=config.d_vocab_out, n_ctx=config.n_ctx,
        act_fn="relu", normalization_type=None, seed=seed,
    )


def bridge_state_dict(model: GrokkingTransformer, index: int = 0) -> dict[str, torch.Tensor]:
    """Our weights of model ``index`` under the ``boot_native`` bridge's state-dict names.

    ``nn.Linear`` stores ``[out, in]``; heads are contiguous blocks of ``d_head`` in the q/k/v
    outputs and o inputs. Biases the paper's model does not have are zero.
    """
    p = {name: value[index].detach().float().cpu() for name, value in model.params.items()}
    zeros = torch.zeros
    heads = lambda w: einops.rearrange(w, "h d e -> (h e) d")  # noqa: E731
    return {
        "embed.weight": p["W_E"], "pos_embed.weight": p["W_pos"],
        "blocks.0.attn.q.weight": heads(p["W_Q"]), "blocks.0.attn.q.bias": zeros(p["W_Q"].shape[0] * p["W_Q"].shape[2]),
        "blocks.0.attn.k.weight": heads(p["W_K"]), "blocks.0.attn.k.bias": zeros(p["W_K"].shape[0] * p["W_K"].shape[2]),
        "blocks.0.attn.v.weight": heads(p["W_V"]), "blocks.0.attn.v.bias": zeros(p["W_V"].shape[0] * p["W_V"].shape[2]),
        "blocks.0.attn.o.weight": einops.rearrange(p["W_O"], "h e d -> d (h e)"),
        "blocks.0.attn.o.bias": zeros(p["W_O"].shape[-1]),
        "blocks.0.mlp.in.weight": p["W_in"].T.contiguous(), "blocks.0.mlp.in.bias": p["b_in"],
        "blocks.0.mlp.out.weight": p["W_out"].T.contiguous(), "blocks.0.mlp.out.bias": p["b_out"],
        "unembed.weight": p["W_U"].T.contiguous(), "unembed.bias": zeros(p["W_U"].shape[-1]),
    }


def to_bridge(model: GrokkingTransformer, index: int = 0, device: str | torch.device | None = None) -> Any:
    """Model ``index`` as a ``TransformerBridge`` (TransformerLens 4) with the same weights.

    Use it for anything hook-based: ``bridge.run_with_cache(data.tokens)`` gives every
    ``blocks.0.*`` activation at all three positions. Its last-position logits equal
    ``model(tokens)[index]`` up to float32 rounding.
    """
    from transformer_lens import TransformerBridge

    if not -model.n_models <= index < model.n_models:
        raise IndexError(f"to_bridge(index={index}) but the model holds {model.n_models} models.")
    bridge = TransformerBridge.boot_native(bridge_config(model.config, seed=model.seeds[index]))
    state = bridge_state_dict(model, index)
    expected = set(bridge.state_dict())
    if set(state) != expected:
        raise RuntimeError(
            "TransformerBridge.boot_native's state-dict names changed (TransformerLens version?): "
            f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}."
        )
    bridge.load_state_dict(state, strict=True)
    if device is not None:
        bridge = bridge.to(device)
    return bridge.eval()


# --------------------------------------------------------------------------------------------------
# Checkpoints and histories
# --------------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, model: GrokkingTransformer, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save weights (float32), config, seeds and JSON-able ``metadata`` with ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "mechinterp-repro/grokking-checkpoint/v1",
        "config": model.config.to_dict(),
        "seeds": list(model.seeds),
        "params": {name: value.detach().float().cpu().clone() for name, value in model.params.items()},
        "metadata": json.loads(json.dumps(dict(metadata or {}))),
    }
    torch.save(payload, path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GrokkingTransformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; returns ``(model, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No grokking checkpoint at {path}. Regenerate it with "
            "`python scripts/train_grokking_checkpoint.py` (or `make grokking-checkpoint`).")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != "mechinterp-repro/grokking-checkpoint/v1":
        raise ValueError(f"{path} is not a grokking checkpoint written by helpers.studies.grokking.training.save_checkpoint.")
    config_dict = dict(payload["config"])
    config_dict["betas"] = tuple(config_dict["betas"])
    config = GrokkingConfig(**config_dict)
    model = GrokkingTransformer(config, payload["seeds"], params=payload["params"]).to(device)
    model.requires_grad_(False)
    return model, payload["metadata"]


def save_history(path: str | Path, history: Mapping[str, Any]) -> Path:
    """Save a dict of arrays (progress measures over training) as a compressed ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(value) for name, value in history.items()}
    np.savez_compressed(path, **arrays)
    return path


def load_history(path: str | Path) -> dict[str, np.ndarray]:
    """Load a history written by :func:`save_history`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No grokking training history at {path}. Regenerate it with "
            "`python scripts/train_grokking_checkpoint.py` (or `make grokking-checkpoint`).")
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


# --------------------------------------------------------------------------------------------------
# Cost accounting (for the benchmark)
# --------------------------------------------------------------------------------------------------


def step_flops(config: GrokkingConfig, n_examples: int, *, last_position_only: bool = True) -> int:
    """Matmul FLOPs of one full-batch training step (forward + backward), counted from the shapes.

    ``last_position_only=True`` counts this module's computation (per-example: attention of the last
    position, W_O, W_in, W_out, W_U; plus the batch-independent q/k/v tables);
    ``False`` counts a standard implementation that runs every position (as the plain bridge does).
    Backward costs twice the forward (gradients for inputs and weights). Elementwise ops are
    not counted: this is the floor a matmul-bound step cannot beat.
    """
    c = config
    hd = c.n_heads * c.d_head
    per_pos_attn = 2 * c.n_ctx * hd  # scores + weighted sum of values, one query
    per_example_tail = hd * c.d_model + 2 * c.d_model * c.d_mlp + c.d_model * c.d_vocab_out
    if last_position_only:
        macs = n_examples * (per_pos_attn + per_example_tail)
        macs += c.n_ctx * c.d_vocab * c.d_model * 2 * hd + c.d_vocab * c.d_model * hd  # k/v and q tables
    else:
        qkv = 3 * c.d_model * hd
        macs = n_examples * c.n_ctx * (qkv + per_pos_attn + per_example_tail)
    return int(3 * 2 * macs)
