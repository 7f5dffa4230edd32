"""Sparse autoencoders (SAEs) on cached activations, and how consistent their latents are across seeds.

The library half of a reproduction of Paulo & Belrose 2025, *Sparse Autoencoders Trained on the Same
Data Learn Different Features*: train several SAEs that differ only in their random seed on the same
activations, match their latents one-to-one, and count how many latents have a close partner in the
other SAE. No model is needed here — everything takes an ``[n_tokens, d_in]`` activation tensor (cache
it with the rest of the toolkit first).

Why a trainer of our own rather than EleutherAI's ``sparsify`` (which installs beside this stack): the
study compares TopK SAEs with ReLU + L1 ones, and ``sparsify``'s ``SparseCoderConfig.activation`` offers
only ``"topk"`` and ``"groupmax"`` (EleutherAI/sparsify source); its trainer also streams activations from
a Hugging Face model over a dataset rather than from a cached tensor. One small trainer for both kinds keeps
the comparison like for like (same data order, optimiser, decoder normalisation and AuxK). The files it
writes follow ``sparsify``'s layout (tensor names and ``cfg.json`` keys): ``sparsify``'s own
``SparseCoder.load_from_disk`` reads a TopK one and computes the same latents and reconstruction
(``tests/test_sparse_autoencoders.py``; it runs where ``sparsify`` is installed — not a dependency — and
passed with eai-sparsify 1.3.3 on 2026-12-04).

The SAE (:class:`SparseAutoencoder`)
------------------------------------
Parameters ``W_enc [d_in, n_latents]``, ``b_enc [n_latents]``, ``W_dec [n_latents, d_in]``,
``b_dec [d_in]``:

* pre-activations ``h = (x - b_dec) @ W_enc + b_enc``;
* latents ``z``: ``"topk"`` (Gao et al. 2024; EleutherAI ``sparsify``) keeps the ``k`` largest entries
  of ``h`` (ReLU'd, so a kept negative entry is 0) and zeros the rest; ``"relu"`` is ``relu(h)``;
* reconstruction ``x̂ = z @ W_dec + b_dec``.

Initialisation: decoder rows are random unit vectors, ``W_enc = W_decᵀ`` (tied init, trained untied),
``b_enc = 0``, ``b_dec`` the geometric median (or mean) of the first training batch
(:meth:`SparseAutoencoder.init_b_dec`). With ``normalize_decoder`` the decoder rows are kept at unit
norm: before each step the gradient component parallel to each row is removed, after it the rows are
renormalised (as ``sparsify`` does).

Training (:func:`train_sae`)
----------------------------
Adam on ``loss = FVU + auxk_coefficient · AuxK + l1_coefficient · L1``, deterministic given
``config.seed`` (one ``torch.Generator`` for the initialisation and the data order):

* ``FVU`` — :func:`fraction_of_variance_unexplained` of the batch (``sparsify``'s reconstruction loss):
  ``Σ‖x - x̂‖² / Σ‖x - mean(x)‖²``; 0 is perfect, 1 is as good as predicting the batch mean.
* ``AuxK`` — Gao et al.'s auxiliary loss against dead latents: a latent is *dead* when it has not fired
  on any of the last ``dead_after`` training tokens; the residual ``x - x̂`` (detached) is reconstructed
  from the ``auxk_k`` largest pre-activations among the dead latents only (no ``b_dec``), and the
  squared error of that is divided by the batch's total variance and scaled by
  ``min(n_dead / auxk_k, 1)``. Zero while no latent is dead. It gives dead latents a gradient.
* ``L1`` — for ``"relu"`` SAEs: mean over tokens of ``Σ_i z_i ‖W_dec[i]‖`` (= ``‖z‖₁`` with unit rows).

Metrics
-------
:func:`fraction_of_variance_unexplained`, :func:`l0` (mean number of non-zero latents per token),
:func:`latent_density` (fraction of tokens each latent fires on) and :func:`dead_and_dense`.

Seed consistency (:func:`match_latents`, :func:`shared_fraction`)
-----------------------------------------------------------------
Cosine similarities between the two SAEs' decoder rows (or encoder columns), then the one-to-one
assignment that maximises their sum (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).
:func:`shared_fraction` is the fraction of matched latents whose partner has cosine > ``threshold``.
The definition of Paulo & Belrose (EleutherAI blog "SAEs trained on the same data don't learn the same
features", 2024-12, the paper's precursor): match on the decoder (or encoder — "we find that the two
options usually yield the same matchings"), and a latent is **shared** "if and only if X is matched to a
latent Y in B with which it has cosine similarity greater than 0.7 according to both the encoder and
decoder weights" — ``use="both"``, ``threshold=0.7`` (the defaults). The paper's own methods section could
not be read here; the blog's rule is the one implemented.

Files (:func:`save_sae`, :func:`load_sae`)
-----------------------------------------
A directory with ``sae.safetensors`` (``encoder.weight [n_latents, d_in]``, ``encoder.bias``,
``W_dec``, ``b_dec`` — the layout ``sparsify`` uses) and ``cfg.json`` (``sparsify``'s keys ``d_in``,
``num_latents``, ``k``, ``activation``, ``normalize_decoder``, … plus every :class:`SAEConfig` field).
:func:`load_sae` also reads a directory ``sparsify`` saved (a TopK SAE).

On a model (the bridge)
-----------------------
:func:`collect_activations` caches a site's activations over a batch (:func:`token_positions` says which
``(row, position)`` each row came from); :func:`spliced_loss` runs the model with an SAE's reconstruction in
their place. Reading one latent: :func:`top_activating_contexts`, :func:`decoder_logit_effects` (its decoder
row read through the unembedding), :func:`steering_hook`, and :func:`latent_span` + :func:`show_latent_tokens`
(one text coloured by several latents: a static heatmap and circuitsvis' interactive token view).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from helpers.prompts import TokenBatch

Activation = Literal["topk", "relu"]
BDecInit = Literal["geometric_median", "mean", "zeros"]
Use = Literal["decoder", "encoder", "both"]

__all__ = [
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "TrainHistory",
    "TrainResult",
    "train_sae",
    "auxk_loss",
    "geometric_median",
    "fraction_of_variance_unexplained",
    "l0",
    "latent_density",
    "dead_and_dense",
    "LatentMatch",
    "match_latents",
    "shared_fraction",
    "save_sae",
    "load_sae",
    "collect_activations",
    "token_positions",
    "spliced_loss",
    "top_activating_contexts",
    "decoder_logit_effects",
    "steering_hook",
    "latent_span",
    "show_latent_tokens",
]

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEConfig:
    """Everything that defines an SAE and its training run (saved to ``cfg.json``).

    Attributes:
        d_in: width of the activations (e.g. ``d_model`` or ``d_mlp``).
        n_latents: number of latents (dictionary size).
        activation: ``"topk"`` (keep the ``k`` largest pre-activations) or ``"relu"`` (with an L1 penalty).
        k: latents kept per token for ``"topk"`` (ignored for ``"relu"``).
        l1_coefficient: weight of the L1 penalty for ``"relu"`` (must be 0 for ``"topk"``).
        lr: Adam learning rate.
        batch_size: tokens per step.
        n_steps: optimiser steps; ``None`` means ``epochs`` passes over the data.
        epochs: passes over the data when ``n_steps`` is ``None``.
        seed: seeds the initialisation and the data order.
        normalize_decoder: keep decoder rows at unit norm.
        auxk_k: dead latents used by the AuxK loss; ``None`` means ``d_in // 2`` (as ``sparsify``).
        auxk_coefficient: weight of the AuxK loss (0 turns it off; Gao et al. use 1/32).
        dead_after: a latent that has not fired on the last ``dead_after`` training tokens is dead.
        b_dec_init: ``"geometric_median"`` / ``"mean"`` of the first training batch, or ``"zeros"``.
    """

    d_in: int
    n_latents: int
    activation: Activation = "topk"
    k: int = 32
    l1_coefficient: float = 0.0
    lr: float = 2e-4
    batch_size: int = 4096
    n_steps: int | None = None
    epochs: int = 1
    seed: int = 0
    normalize_decoder: bool = True
    auxk_k: int | None = None
    auxk_coefficient: float = 1 / 32
    dead_after: int = 10_000_000
    b_dec_init: BDecInit = "geometric_median"

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "batch_size", "epochs", "dead_after"):
            _check_positive_int(name, getattr(self, name))
        if self.activation not in ("topk", "relu"):
            raise ValueError(f"SAEConfig: activation={self.activation!r} is unknown; use 'topk' or 'relu'.")
        if self.activation == "topk":
            _check_positive_int("k", self.k)
            if self.k > self.n_latents:
                raise ValueError(
                    f"SAEConfig: k={self.k} is larger than n_latents={self.n_latents}; a TopK SAE keeps k of "
                    "its n_latents latents per token, so choose k <= n_latents."
                )
            if self.l1_coefficient != 0:
                raise ValueError(
                    f"SAEConfig: l1_coefficient={self.l1_coefficient!r} with activation='topk'; TopK fixes the "
                    "sparsity itself. Set l1_coefficient=0 or use activation='relu'."
                )
        if not (isinstance(self.l1_coefficient, (int, float)) and math.isfinite(self.l1_coefficient)
                and self.l1_coefficient >= 0):
            raise ValueError(f"SAEConfig: l1_coefficient must be a finite number >= 0, got {self.l1_coefficient!r}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"SAEConfig: lr must be a finite number > 0 (e.g. 2e-4), got {self.lr!r}.")
        if self.n_steps is not None:
            _check_positive_int("n_steps", self.n_steps)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SAEConfig: seed must be an int, got {self.seed!r}.")
        if self.auxk_k is not None:
            _check_positive_int("auxk_k", self.auxk_k)
        if not (isinstance(self.auxk_coefficient, (int, float)) and math.isfinite(self.auxk_coefficient)
                and self.auxk_coefficient >= 0):
            raise ValueError(
                f"SAEConfig: auxk_coefficient must be a finite number >= 0 (0 turns AuxK off), got {self.auxk_coefficient!r}."
            )
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(
                f"SAEConfig: b_dec_init={self.b_dec_init!r} is unknown; use 'geometric_median', 'mean' or 'zeros'."
            )

    @property
    def effective_auxk_k(self) -> int:
        """The ``auxk_k`` actually used: ``d_in // 2`` (at least 1) when ``auxk_k`` is ``None``."""
        return self.auxk_k if self.auxk_k is not None else max(self.d_in // 2, 1)

    def steps_for(self, n_tokens: int) -> int:
        """Optimiser steps for ``n_tokens`` training tokens: ``n_steps``, or ``epochs`` full batches per pass."""
        return self.n_steps if self.n_steps is not None else self.epochs * (n_tokens // self.batch_size)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"SAEConfig: {name} must be a positive int, got {value!r}.")


# --------------------------------------------------------------------------------------------------
# The SAE
# --------------------------------------------------------------------------------------------------


@dataclass
class SAEOutput:
    """What :meth:`SparseAutoencoder.forward` returns (same leading dimensions as the input)."""

    reconstruction: Float[Tensor, "... d_in"]
    latents: Float[Tensor, "... n_latents"]
    pre_activations: Float[Tensor, "... n_latents"]


class SparseAutoencoder(nn.Module):
    """A TopK or ReLU sparse autoencoder; see the module docstring for the maths.

    Args:
        config: the SAE's :class:`SAEConfig` (only ``d_in``, ``n_latents``, ``activation``, ``k`` and
            ``normalize_decoder`` matter here).
        generator: for the random decoder directions (a CPU ``torch.Generator``); ``None`` uses
            ``torch.Generator().manual_seed(config.seed)``.
        device: where the parameters live.
    """

    def __init__(self, config: SAEConfig, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(config, SAEConfig):
            raise ValueError(f"config must be an SAEConfig, got {type(config).__name__}.")
        self.config = config
        if generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        directions = torch.randn(config.n_latents, config.d_in, generator=generator)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(directions.to(device))
        self.W_enc = nn.Parameter(directions.T.clone().to(device))
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents, device=device))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in, device=device))

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    def _check_input(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [..., d_in={self.d_in}], got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but this SAE takes [..., d_in={self.d_in}] inputs; pass "
                "activations of the site the SAE was trained on (last dimension = d_in)."
            )

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """``(x - b_dec) @ W_enc + b_enc``."""
        self._check_input(x)
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... n_latents"]:
        """Latents from pre-activations: ReLU, or for TopK the ReLU'd ``k`` largest entries (rest zero)."""
        if self.config.activation == "relu":
            return torch.relu(pre)
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """The (dense) latent vector of every input."""
        return self.activate(self.pre_activations(x))

    def decode(self, latents: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... d_in"]:
        """``latents @ W_dec + b_dec``."""
        if not isinstance(latents, Tensor) or latents.ndim == 0 or latents.shape[-1] != self.n_latents:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(
                f"latents has shape {shape} but this SAE has n_latents={self.n_latents}; pass "
                "[..., n_latents] latents (e.g. from sae.encode)."
            )
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> SAEOutput:
        pre = self.pre_activations(x)
        latents = self.activate(pre)
        return SAEOutput(reconstruction=self.decode(latents), latents=latents, pre_activations=pre)

    @torch.no_grad()
    def init_b_dec(self, activations: Float[Tensor, "n d_in"], method: BDecInit = "geometric_median") -> None:
        """Set ``b_dec`` to the geometric median (Weiszfeld) or mean of ``activations``, or to zeros."""
        _check_activations(activations, self.d_in)
        if method == "geometric_median":
            value = geometric_median(activations)
        elif method == "mean":
            value = activations.float().mean(0)
        elif method == "zeros":
            value = torch.zeros(self.d_in)
        else:
            raise ValueError(f"method={method!r} is unknown; use 'geometric_median', 'mean' or 'zeros'.")
        self.b_dec.copy_(value.to(self.b_dec))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Remove from ``W_dec.grad`` the component along each (unit) decoder row, as ``sparsify`` does."""
        if self.W_dec.grad is None:
            return
        parallel = einops.einsum(self.W_dec.grad, self.W_dec, "latent d, latent d -> latent")
        self.W_dec.grad.sub_(einops.einsum(parallel, self.W_dec, "latent, latent d -> latent d"))


def geometric_median(points: Float[Tensor, "n d"], *, n_iter: int = 100, tol: float = 1e-6) -> Float[Tensor, "d"]:
    """The point minimising the summed Euclidean distance to ``points`` (Weiszfeld's algorithm, from the mean)."""
    points = points.float()
    median = points.mean(0)
    for _ in range(n_iter):
        weights = 1 / (points - median).norm(dim=-1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(float(median.norm()), 1.0):
            return new
        median = new
    return median


def _check_activations(activations: object, d_in: int | None = None, name: str = "activations") -> None:
    if not isinstance(activations, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [n_tokens, d_in], got {type(activations).__name__}.")
    if activations.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [n_tokens, d_in], got shape {tuple(activations.shape)}; flatten batch and "
            "position first, e.g. einops.rearrange(acts, 'batch pos d -> (batch pos) d') (dropping padding)."
        )
    if not activations.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {activations.dtype}.")
    if d_in is not None and activations.shape[1] != d_in:
        raise ValueError(
            f"{name} has d_in={activations.shape[1]} (shape {tuple(activations.shape)}) but the config says "
            f"d_in={d_in}; set SAEConfig(d_in={activations.shape[1]}, ...) or pass the activations of the right site."
        )
    if not bool(torch.isfinite(activations).all()):
        bad = int((~torch.isfinite(activations)).any(dim=-1).sum())
        raise ValueError(
            f"{name} contains NaN or inf values (in {bad} of {activations.shape[0]} tokens); drop or fix those "
            "tokens first, e.g. activations[torch.isfinite(activations).all(-1)]."
        )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainHistory:
    """Per-step training curves (one float per optimiser step, measured on that step's batch)."""

    loss: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    auxk_loss: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)


@dataclass
class TrainResult:
    """What :func:`train_sae` returns.

    Attributes:
        sae: the trained SAE (in eval mode, on the training device).
        config: the config it was trained with.
        history: per-step curves.
        tokens_since_fired: ``[n_latents]`` training tokens since each latent last fired (dead ones have
            ``>= config.dead_after``).
    """

    sae: SparseAutoencoder
    config: SAEConfig
    history: TrainHistory
    tokens_since_fired: Int[Tensor, "n_latents"]


def auxk_loss(sae: SparseAutoencoder, pre_activations: Float[Tensor, "batch n_latents"],
              residual: Float[Tensor, "batch d_in"], dead: Bool[Tensor, "n_latents"],
              total_variance: Tensor, auxk_k: int) -> Tensor:
    """Gao et al.'s AuxK loss: reconstruct ``residual`` (detached) from the top ``auxk_k`` dead latents.

    ``scale · Σ‖e - ê‖² / total_variance`` with ``ê = relu(topk_dead(h)) @ W_dec`` (no ``b_dec``) and
    ``scale = min(n_dead / auxk_k, 1)``; exactly 0 (a 0-d tensor) when no latent is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre_activations.new_zeros(())
    k_aux = min(auxk_k, n_dead)
    masked = torch.where(dead, pre_activations, torch.full_like(pre_activations, -torch.inf))
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    aux_latents = torch.zeros_like(pre_activations).scatter(-1, indices, torch.relu(values))
    error_hat = aux_latents @ sae.W_dec
    scale = min(n_dead / auxk_k, 1.0)
    return scale * (error_hat - residual.detach()).pow(2).sum() / total_variance


def train_sae(activations: Float[Tensor, "n d"], config: SAEConfig, *, progress: bool = True,
              device: torch.device | str | None = None) -> TrainResult:
    """Train an SAE on ``activations`` with Adam (see the module docstring for the loss).

    Each pass over the data uses a fresh random order (from ``torch.Generator().manual_seed(config.seed)``,
    which first draws the decoder directions); incomplete last batches are dropped. Bit-for-bit repeatable
    for the same seed, data and device.

    Args:
        activations: ``[n_tokens, d_in]`` training activations (any float dtype; used as float32).
        config: the :class:`SAEConfig`.
        progress: show a tqdm bar over steps.
        device: where to train; ``None`` means the activations' device (batches are moved there).
    """
    if not isinstance(config, SAEConfig):
        raise ValueError(f"config must be an SAEConfig, got {type(config).__name__}.")
    _check_activations(activations, config.d_in)
    n_tokens = activations.shape[0]
    if config.batch_size > n_tokens:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {n_tokens} training tokens; collect more "
            f"activations or set SAEConfig(batch_size=<= {n_tokens})."
        )
    device = torch.device(device) if device is not None else activations.device
    n_steps = config.steps_for(n_tokens)

    generator = torch.Generator().manual_seed(config.seed)
    sae = SparseAutoencoder(config, generator=generator, device=device)
    batches_per_epoch = n_tokens // config.batch_size

    def batch_indices():
        while True:
            order = torch.randperm(n_tokens, generator=generator)
            for b in range(batches_per_epoch):
                yield order[b * config.batch_size:(b + 1) * config.batch_size]

    batches = batch_indices()
    first = next(batches)
    sae.init_b_dec(activations[first.to(activations.device)].to(device), config.b_dec_init)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    tokens_since_fired = torch.zeros(config.n_latents, dtype=torch.long, device=device)
    history = TrainHistory()
    auxk_k = config.effective_auxk_k

    sae.train()
    indices = first
    for step in tqdm(range(n_steps), desc=f"training {config.activation} SAE", disable=not progress, leave=False):
        if step > 0:
            indices = next(batches)
        x = activations[indices.to(activations.device)].to(device=device, dtype=torch.float32)
        out = sae(x)
        residual = x - out.reconstruction
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = residual.pow(2).sum() / total_variance
        loss = fvu
        dead = tokens_since_fired >= config.dead_after
        aux = torch.zeros((), device=device)
        if config.auxk_coefficient > 0:
            aux = auxk_loss(sae, out.pre_activations, residual, dead, total_variance, auxk_k)
            loss = loss + config.auxk_coefficient * aux
        if config.activation == "relu" and config.l1_coefficient > 0:
            l1 = (out.latents * sae.W_dec.norm(dim=-1)).sum(-1).mean()
            loss = loss + config.l1_coefficient * l1

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.normalize_decoder:
            sae.remove_parallel_decoder_grad_()
        optimizer.step()
        if config.normalize_decoder:
            sae.normalize_decoder_()

        with torch.no_grad():
            fired = (out.latents != 0).any(dim=0)
            tokens_since_fired += x.shape[0]
            tokens_since_fired[fired] = 0
            history.loss.append(float(loss.detach()))
            history.fvu.append(float(fvu.detach()))
            history.auxk_loss.append(float(aux.detach()))
            history.l0.append(float(l0(out.latents)))
            history.dead_fraction.append(float((tokens_since_fired >= config.dead_after).float().mean()))
    sae.eval()
    return TrainResult(sae=sae, config=config, history=history, tokens_since_fired=tokens_since_fired)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def fraction_of_variance_unexplained(x: Float[Tensor, "... d"], x_hat: Float[Tensor, "... d"]) -> Tensor:
    """``Σ‖x - x̂‖² / Σ‖x - mean(x)‖²`` over all tokens (leading dimensions flattened); a 0-d tensor.

    0 for a perfect reconstruction, 1 for predicting the mean of ``x`` everywhere.
    """
    if not isinstance(x, Tensor) or not isinstance(x_hat, Tensor) or x.shape != x_hat.shape or x.ndim == 0:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (x, x_hat)]
        raise ValueError(f"x and x_hat must be tensors of the same shape [..., d], got {shapes[0]} and {shapes[1]}.")
    x = einops.rearrange(x.float(), "... d -> (...) d")
    x_hat = einops.rearrange(x_hat.float(), "... d -> (...) d")
    total = (x - x.mean(0)).pow(2).sum()
    if float(total) == 0:
        raise ValueError("x has zero variance (every token is the same vector), so FVU is undefined; "
                         "pass at least two different tokens.")
    return (x - x_hat).pow(2).sum() / total


def _flat_latents(latents: Tensor) -> Tensor:
    if not isinstance(latents, Tensor) or latents.ndim == 0:
        raise ValueError(f"latents must be a [..., n_latents] tensor, got {latents!r:.80}.")
    return einops.rearrange(latents, "... latent -> (...) latent")


def l0(latents: Float[Tensor, "... n_latents"]) -> Tensor:
    """Mean number of non-zero latents per token (a 0-d float tensor)."""
    return (_flat_latents(latents) != 0).sum(-1).float().mean()


def latent_density(latents: Float[Tensor, "... n_latents"]) -> Float[Tensor, "n_latents"]:
    """For every latent, the fraction of tokens on which it is non-zero."""
    return (_flat_latents(latents) != 0).float().mean(0)


def dead_and_dense(density: Float[Tensor, "n_latents"], *, dead_below: float = 0.0,
                   dense_above: float = 0.1) -> tuple[Bool[Tensor, "n_latents"], Bool[Tensor, "n_latents"]]:
    """Boolean masks ``(dead, dense)``: ``density <= dead_below`` (default: never fired) and ``density > dense_above``.

    The thresholds are conventions, not from any one paper: report them with the fractions
    (``dead.float().mean()``).
    """
    if not isinstance(density, Tensor) or density.ndim != 1:
        raise ValueError("density must be a 1-D [n_latents] tensor, e.g. latent_density(latents).")
    if not 0 <= dead_below <= dense_above <= 1:
        raise ValueError(f"need 0 <= dead_below <= dense_above <= 1, got dead_below={dead_below}, dense_above={dense_above}.")
    return density <= dead_below, density > dense_above


# --------------------------------------------------------------------------------------------------
# Seed consistency
# --------------------------------------------------------------------------------------------------


@dataclass
class LatentMatch:
    """A one-to-one matching of SAE A's latents to SAE B's (``min(n_a, n_b)`` pairs, sorted by ``index_a``).

    Attributes:
        index_a, index_b: the matched latents: ``index_a[i]`` of A goes with ``index_b[i]`` of B.
        decoder_similarity: cosine of the matched decoder rows (``None`` for ``use="encoder"``).
        encoder_similarity: cosine of the matched encoder columns (``None`` for ``use="decoder"``).
        use: what the matching was computed from.
    """

    index_a: Int[Tensor, "pair"]
    index_b: Int[Tensor, "pair"]
    decoder_similarity: Float[Tensor, "pair"] | None
    encoder_similarity: Float[Tensor, "pair"] | None
    use: Use

    @property
    def similarities(self) -> Float[Tensor, "pair"]:
        """The per-pair similarity that :func:`shared_fraction` thresholds: the decoder or encoder cosine,
        or for ``use="both"`` the smaller of the two (so ``> threshold`` means both are)."""
        if self.use == "decoder":
            return self.decoder_similarity
        if self.use == "encoder":
            return self.encoder_similarity
        return torch.minimum(self.decoder_similarity, self.encoder_similarity)


def _cosine_matrix(a: Float[Tensor, "n_a d"], b: Float[Tensor, "n_b d"]) -> Float[Tensor, "n_a n_b"]:
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@torch.no_grad()
def match_latents(sae_a: SparseAutoencoder, sae_b: SparseAutoencoder, *, use: Use = "both") -> LatentMatch:
    """Match A's latents one-to-one to B's, maximising the summed cosine similarity (Hungarian algorithm).

    ``use="decoder"`` compares decoder rows, ``"encoder"`` encoder columns; ``"both"`` (the default, Paulo &
    Belrose's rule) matches on the decoder and reports both cosines for that matching, so a latent is
    shared only if both exceed the threshold. With different sizes only ``min(n_a, n_b)`` latents are matched.
    """
    from scipy.optimize import linear_sum_assignment

    if use not in ("decoder", "encoder", "both"):
        raise ValueError(f"use={use!r} is unknown; use 'decoder', 'encoder' or 'both'.")
    for name, sae in (("sae_a", sae_a), ("sae_b", sae_b)):
        if not isinstance(sae, SparseAutoencoder):
            raise ValueError(f"{name} must be a SparseAutoencoder, got {type(sae).__name__}.")
    if sae_a.d_in != sae_b.d_in:
        raise ValueError(
            f"sae_a has d_in={sae_a.d_in} but sae_b has d_in={sae_b.d_in}; only SAEs of the same site can be matched."
        )
    dec = _cosine_matrix(sae_a.W_dec.float().cpu(), sae_b.W_dec.float().cpu())
    enc = _cosine_matrix(sae_a.W_enc.T.float().cpu(), sae_b.W_enc.T.float().cpu())
    matrix = enc if use == "encoder" else dec
    rows, cols = linear_sum_assignment(matrix.double().numpy(), maximize=True)
    index_a, index_b = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    return LatentMatch(
        index_a=index_a,
        index_b=index_b,
        decoder_similarity=dec[index_a, index_b] if use != "encoder" else None,
        encoder_similarity=enc[index_a, index_b] if use != "decoder" else None,
        use=use,
    )


def shared_fraction(similarities: Float[Tensor, "pair"] | LatentMatch, threshold: float = 0.7) -> float:
    """Fraction of matched latents whose partner has similarity ``> threshold`` (Paulo & Belrose: 0.7).

    ``similarities`` is a :class:`LatentMatch` (its :attr:`~LatentMatch.similarities`; with ``use="both"``
    the smaller of the encoder and decoder cosines) or a 1-D tensor of per-pair cosines.
    """
    if isinstance(similarities, LatentMatch):
        similarities = similarities.similarities
    if not isinstance(similarities, Tensor) or similarities.ndim != 1 or similarities.numel() == 0:
        raise ValueError("similarities must be a non-empty 1-D tensor of per-pair cosines, or a LatentMatch "
                         "(from match_latents).")
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity and must lie in [-1, 1], got {threshold!r}.")
    return float((similarities > threshold).float().mean())


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def save_sae(sae: SparseAutoencoder, config: SAEConfig | None, directory: str | Path, *,
             dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> Path:
    """Write ``sae.safetensors`` and ``cfg.json`` (``sparsify``'s layout) into ``directory``; returns it.

    ``config`` defaults to ``sae.config``. ``dtype`` is what the tensors are stored in (``torch.float16``
    halves the file; :func:`load_sae` reads them back as float32). ``metadata`` (JSON-able) is written to
    ``cfg.json`` under ``"metadata"`` (what the SAE was trained on).
    """
    from safetensors.torch import save_file

    if not isinstance(sae, SparseAutoencoder):
        raise ValueError(f"sae must be a SparseAutoencoder, got {type(sae).__name__}.")
    config = sae.config if config is None else config
    if (config.d_in, config.n_latents) != (sae.d_in, sae.n_latents):
        raise ValueError(
            f"config (d_in={config.d_in}, n_latents={config.n_latents}) does not describe this SAE "
            f"(d_in={sae.d_in}, n_latents={sae.n_latents}); pass the config it was built with (or None)."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"save_sae: dtype must be torch.float32, float16 or bfloat16, got {dtype!r}.")
    tensors = {
        "encoder.weight": sae.W_enc.detach().T.contiguous().cpu().to(dtype),
        "encoder.bias": sae.b_enc.detach().contiguous().cpu().to(dtype),
        "W_dec": sae.W_dec.detach().contiguous().cpu().to(dtype),
        "b_dec": sae.b_dec.detach().contiguous().cpu().to(dtype),
    }
    save_file(tensors, str(directory / WEIGHTS_FILE))
    cfg = {
        # sparsify's SparseCoderConfig keys (its loader drops the rest)
        "d_in": config.d_in,
        "num_latents": config.n_latents,
        "k": config.k,
        "activation": config.activation,
        "normalize_decoder": config.normalize_decoder,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        # ours
        **dataclasses.asdict(config),
        **({"metadata": metadata} if metadata else {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


def load_sae(directory: str | Path, *, device: torch.device | str | None = None) -> tuple[SparseAutoencoder, SAEConfig]:
    """Read an SAE written by :func:`save_sae` (or a TopK SAE written by ``sparsify``): ``(sae, config)``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} does not exist; pass the directory save_sae wrote.")
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    kwargs = {key: value for key, value in cfg.items() if key in fields}
    kwargs.setdefault("n_latents", cfg.get("num_latents"))
    if "d_in" not in kwargs or not kwargs.get("n_latents"):
        raise ValueError(f"{directory / CONFIG_FILE} has no d_in / num_latents; it was not written by save_sae or sparsify.")
    if cfg.get("skip_connection") or cfg.get("transcode") or cfg.get("activation", "topk") not in ("topk", "relu"):
        raise ValueError(f"{directory / CONFIG_FILE} describes an SAE this module cannot run "
                         "(skip connection, transcoder or another activation).")
    config = SAEConfig(**kwargs)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    expected = {"encoder.weight": (config.n_latents, config.d_in), "encoder.bias": (config.n_latents,),
                "W_dec": (config.n_latents, config.d_in), "b_dec": (config.d_in,)}
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(f"{directory / WEIGHTS_FILE}: tensor {name!r} should have shape {shape}, got {got}.")
    sae = SparseAutoencoder(config, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["encoder.weight"].T.float())
        sae.b_enc.copy_(tensors["encoder.bias"].float())
        sae.W_dec.copy_(tensors["W_dec"].float())
        sae.b_dec.copy_(tensors["b_dec"].float())
    sae.eval()
    return sae, config


# --------------------------------------------------------------------------------------------------
# On a model: collecting activations, splicing the reconstruction back in
# --------------------------------------------------------------------------------------------------


def _real_token_mask(batch: "TokenBatch", skip_first: bool) -> Bool[Tensor, "batch pos"]:
    """Real (non-padding) tokens, without each row's first real token when ``skip_first`` (BOS:
    its residual stream is an outlier many times the others' norm, which an SAE should not fit)."""
    mask = batch.attention_mask.bool()
    if skip_first:
        first = mask.int().argmax(dim=1)  # first real position (left or right padding)
        mask = mask.clone()
        mask[torch.arange(mask.shape[0]), first] = False
    return mask


def collect_activations(model: object, batch: "TokenBatch", hook_name: str, *, rows_per_forward: int | None = None,
                        skip_first: bool = True, progress: bool = True) -> Float[Tensor, "n_tokens d"]:
    """The activations at ``hook_name`` (e.g. ``"blocks.15.hook_resid_post"``) of every real token.

    One forward pass per ``rows_per_forward`` rows (default from :func:`helpers.batching.rows_per_forward`),
    each stopped after the hook's block; padding — and, with ``skip_first``, each row's first real token (BOS)
    — left out. Returns float32 on the CPU, rows in (prompt, position) order.
    """
    from helpers.batching import rows_per_forward as default_rows
    from helpers.effects import StopForward

    names = set(getattr(model, "hook_dict", {}))
    if names and hook_name not in names:
        close = sorted(n for n in names if n.endswith(hook_name.split(".")[-1]))[:3]
        raise ValueError(f"hook_name={hook_name!r} is not a hook of this model (e.g. {close}); pass a bridge hook name "
                         "such as 'blocks.15.hook_resid_post' or 'blocks.15.hook_mlp_out'.")
    rows = rows_per_forward or default_rows(model, batch.tokens.shape[1])
    mask = _real_token_mask(batch, skip_first)
    parts: list[Tensor] = []

    def keep(activation: Tensor, hook: object) -> None:
        parts.append(activation.detach().float().cpu())
        raise StopForward

    with torch.no_grad():
        for start in tqdm(range(0, batch.tokens.shape[0], rows), desc=f"activations at {hook_name}",
                          disable=not progress, leave=False):
            chunk = batch[start:start + rows]
            try:
                model.run_with_hooks(chunk.tokens, attention_mask=chunk.attention_mask, fwd_hooks=[(hook_name, keep)])
            except StopForward:
                pass
    acts = torch.cat(parts, dim=0)  # [batch, pos, d]
    return acts[mask.cpu()]


def token_positions(batch: "TokenBatch", *, skip_first: bool = True) -> Int[Tensor, "n_tokens 2"]:
    """``(row, position)`` of every row :func:`collect_activations` returns, in the same order."""
    return _real_token_mask(batch, skip_first).cpu().nonzero()


def spliced_loss(model: object, batch: "TokenBatch", hook_name: str, reconstruct, *, skip_first: bool = True,
                 rows_per_forward: int | None = None, baselines: dict[str, float] | None = None) -> dict[str, float]:
    """Next-token loss with the activations at ``hook_name`` replaced by ``reconstruct(activations)``.

    ``reconstruct`` maps ``[n, d]`` float32 activations to their replacement (an SAE:
    ``lambda x: sae(x).reconstruction``). Only the tokens :func:`collect_activations` would keep are replaced
    (with ``skip_first`` BOS keeps its own activation, as it was not trained on). Returns the mean loss over
    next-token targets (``clean``, ``spliced``, ``zero``: the site's activations set to 0 on the same tokens),
    ``increase`` = spliced − clean, and ``fraction_recovered`` = (zero − spliced) / (zero − clean).

    ``baselines``: the ``clean`` and ``zero`` losses of an earlier call on the same batch and site (its
    returned dict), so that evaluating many SAEs runs the model once per SAE instead of three times.
    """
    from helpers.batching import rows_per_forward as default_rows
    from helpers.effects import token_losses

    rows = rows_per_forward or default_rows(model, batch.tokens.shape[1])
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    if baselines is not None and not {"clean", "zero"} <= set(baselines):
        raise ValueError("spliced_loss: baselines must be the dict an earlier spliced_loss call returned "
                         "(with 'clean' and 'zero').")
    conditions = ("spliced",) if baselines is not None else ("clean", "spliced", "zero")

    def replace_with(fn):
        def hook(activation: Tensor, hook: object) -> Tensor:
            keep = _real_token_mask(current, skip_first).to(activation.device)
            out = activation.clone()
            out[keep] = fn(activation[keep].float()).to(activation.dtype)
            return out
        return hook

    with torch.no_grad():
        for start in range(0, batch.tokens.shape[0], rows):
            current = batch[start:start + rows]
            replacements = {"clean": None, "spliced": reconstruct, "zero": torch.zeros_like}
            for name in conditions:
                hooks = [] if replacements[name] is None else [(hook_name, replace_with(replacements[name]))]
                logits = model.run_with_hooks(current.tokens, attention_mask=current.attention_mask, fwd_hooks=hooks)
                losses, valid = token_losses(logits, current)
                totals[name] += float(losses[valid].sum())
            count += int(valid.sum())
    if count == 0:
        raise ValueError("spliced_loss: the batch has no next-token targets (every prompt is a single token).")
    clean, spliced, zero = (totals[k] / count for k in ("clean", "spliced", "zero"))
    if baselines is not None:
        clean, zero = baselines["clean"], baselines["zero"]
    gap = zero - clean
    return {"clean": clean, "spliced": spliced, "zero": zero, "increase": spliced - clean,
            "fraction_recovered": (zero - spliced) / gap if gap != 0 else float("nan")}


# --------------------------------------------------------------------------------------------------
# Reading single latents: contexts, logit effects, steering
# --------------------------------------------------------------------------------------------------


def top_activating_contexts(tokenizer: object, batch: "TokenBatch", positions: Int[Tensor, "n_tokens 2"],
                            activations: Float[Tensor, "n_tokens"], *, n: int = 8, before: int = 12,
                            after: int = 3) -> list[dict]:
    """The ``n`` tokens where one latent is largest, each with its context.

    ``activations`` is the latent's value on every token of ``positions`` (:func:`token_positions` of
    ``batch``); returns dicts ``activation``, ``row``, ``position``, ``token`` and ``context`` — the
    ``before`` tokens in front, the token itself in ``[[…]]`` and ``after`` tokens behind. At most one
    context per (row, position); fewer than ``n`` when the latent is non-zero on fewer tokens.
    """
    if activations.ndim != 1 or activations.shape[0] != positions.shape[0]:
        raise ValueError(f"activations must be 1-D with one value per row of positions ({positions.shape[0]}), "
                         f"got shape {tuple(activations.shape)}.")
    if n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}.")
    values, order = activations.float().topk(min(n, activations.shape[0]))
    out = []
    tokens = batch.tokens.cpu()
    for value, index in zip(values.tolist(), order.tolist()):
        if value <= 0:
            break
        row, pos = positions[index].tolist()
        left = tokenizer.decode(tokens[row, max(0, pos - before):pos])
        token = tokenizer.decode(tokens[row, pos:pos + 1])
        right = tokenizer.decode(tokens[row, pos + 1:pos + 1 + after])
        out.append({"activation": value, "row": row, "position": pos, "token": token,
                    "context": f"{left}[[{token}]]{right}".replace("\n", "⏎")})
    return out


@torch.no_grad()
def decoder_logit_effects(model: object, sae: SparseAutoencoder, latent: int, *, k: int = 8) -> dict[str, list]:
    """What a latent's decoder direction does to the logits if read directly: ``W_dec[latent] ⊙ γ @ W_U``.

    The direction goes through the final norm's gain ``γ`` (:func:`helpers.models.final_norm`; the norm's
    scale only rescales every logit alike) and the unembedding, and the logits are centred (their mean
    over the vocabulary removed). Returns the ``k`` most promoted and most suppressed tokens
    (``"top"`` / ``"bottom"``: lists of ``(token, logit)``; ``"top_ids"`` / ``"bottom_ids"``: their ids). For an SAE on a middle layer this is the
    direct path only; later layers change what the latent finally does.
    """
    from helpers.models import final_norm

    if not 0 <= latent < sae.n_latents:
        raise ValueError(f"latent={latent} is out of range for an SAE with {sae.n_latents} latents.")
    w_u = model.W_U.detach().float().cpu()
    if w_u.shape[0] != sae.d_in:
        raise ValueError(f"the SAE's d_in ({sae.d_in}) is not the model's d_model ({w_u.shape[0]}): decoder "
                         "directions can be read through the unembedding only for residual-stream or "
                         "sublayer-output sites.")
    direction = sae.W_dec[latent].detach().float().cpu() * final_norm(model).gain.detach().float().cpu()
    logits = direction @ w_u
    logits = logits - logits.mean()
    top, bottom = logits.topk(k), (-logits).topk(k)
    decode = model.tokenizer.decode
    return {"top": [(decode([i]), v) for v, i in zip(top.values.tolist(), top.indices.tolist())],
            "bottom": [(decode([i]), -v) for v, i in zip(bottom.values.tolist(), bottom.indices.tolist())],
            "top_ids": top.indices.tolist(), "bottom_ids": bottom.indices.tolist()}


def steering_hook(direction: Float[Tensor, "d"], scale: float):
    """A forward hook that adds ``scale · direction`` to the activation at every position.

    Use with ``model.run_with_hooks`` / ``model.hooks`` at the SAE's site: steering with a latent is
    adding its decoder row (Templeton et al. 2024 clamp the latent; adding its direction is the simple form).
    """
    if direction.ndim != 1:
        raise ValueError(f"direction must be 1-D [d], got shape {tuple(direction.shape)}.")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    direction = direction.detach()

    def hook(activation: Tensor, hook: object) -> Tensor:
        if activation.shape[-1] != direction.shape[0]:
            raise ValueError(f"steering direction has {direction.shape[0]} entries but the activation at "
                             f"{getattr(hook, 'name', 'this hook')} has {activation.shape[-1]}.")
        return activation + scale * direction.to(device=activation.device, dtype=activation.dtype)

    return hook


def latent_span(batch: "TokenBatch", positions: Int[Tensor, "n_tokens 2"], activations: Float[Tensor, "n_tokens n_latents"],
                latents: Sequence[int], *, span: int = 48) -> dict[str, Any]:
    """The stretch of ``span`` tokens of one row of ``batch`` where the most of ``latents`` fire strongly.

    Each latent's values are divided by its largest value on all of ``positions`` (so every latent counts
    alike); a stretch scores the sum over ``latents`` of their largest scaled value inside it, and the best
    stretch over every row and start wins (ties: the earliest). Returns ``row``, ``start``, ``token_ids``
    (the stretch's ``span`` tokens, or the whole row when shorter), ``values`` ``[span, len(latents)]``,
    the latents' raw activations there (0 on tokens :func:`token_positions` leaves out, such as BOS and
    padding), and ``peak`` ``[len(latents)]``, each latent's largest value on all of ``positions``. The text
    to draw for :func:`show_latent_tokens`.
    """
    latents = [int(i) for i in latents]
    if activations.ndim != 2 or activations.shape[0] != positions.shape[0]:
        raise ValueError(f"activations must be [n_tokens, n_latents] with one row per row of positions "
                         f"({positions.shape[0]}), got shape {tuple(activations.shape)}.")
    if not latents or not all(0 <= i < activations.shape[1] for i in latents):
        raise ValueError(f"latents must be a non-empty list of indices below {activations.shape[1]}, got {latents!r}.")
    _check_positive_int("span", span)
    rows, length = batch.tokens.shape
    span = min(span, length)
    chosen = activations[:, latents].float().cpu()
    dense = torch.zeros(rows, length, len(latents))
    dense[positions[:, 0], positions[:, 1]] = chosen
    peak = chosen.max(dim=0).values.clamp_min(1e-12)
    windows = (dense / peak).clamp_min(0).unfold(1, span, 1)  # [row, start, latent, span]
    score = windows.max(dim=-1).values.sum(dim=-1)  # [row, start]
    best = int(score.flatten().argmax())
    row, start = divmod(best, score.shape[1])
    return {"row": row, "start": start, "token_ids": batch.tokens[row, start:start + span].cpu().tolist(),
            "values": dense[row, start:start + span], "peak": peak}


def show_latent_tokens(tokenizer: object, span: dict[str, Any], latents: Sequence[int], *, name: str | None = None,
                       title: str = "Latent activations on one held-out text") -> Path | None:
    """Draw a :func:`latent_span`: a static heatmap (one row per latent, one column per token, coloured by the
    fraction of the latent's largest activation so that weak latents stay visible; plotly JSON + PNG through
    :func:`helpers.plotting.show`) and, with ``name``, circuitsvis' interactive token view
    (``colored_tokens_multi``: click a latent to colour the text by it, hover a token for every latent's value)
    as an offline page ``<figures>/<name>.circuitsvis.html``, whose path is returned."""
    import circuitsvis as cv

    from helpers.plotting import heatmap, save_html_page, show

    labels = [f"latent {int(i)}" for i in latents]
    values = span["values"]
    if values.shape != (len(span["token_ids"]), len(labels)):
        raise ValueError(f"span['values'] has shape {tuple(values.shape)}, expected [{len(span['token_ids'])}, "
                         f"{len(labels)}]: pass the latents the span was made for.")
    tokens = [tokenizer.decode([t]) for t in span["token_ids"]]
    ticks = [f"{i}:{t!r}"[:18] for i, t in enumerate(tokens)]
    fig = heatmap((values / span["peak"]).T, title=title, x_label="token", y_label="latent", x_ticks=ticks,
                  y_ticks=labels, colorbar_title="÷ latent's max", signed=False)
    fig.update_layout(width=max(700, 22 * len(tokens)), height=200 + 40 * len(labels))
    show(fig, name)
    if name is None:
        return None
    body = cv.tokens.colored_tokens_multi(tokens, values, labels).local_src
    return save_html_page(body, f"{name}.circuitsvis", title=title)
