"""Entropy neurons and token-frequency neurons (Stolfo et al. 2024, "Confidence Regulation Neurons").

The claim. A few final-layer MLP neurons barely change *which* token is predicted but change *how
sure* the model is. **Entropy neurons** write mostly into an (effective) null space of the
unembedding: their direct effect on the logits is tiny, but they add norm to the residual stream, so
the final norm (LayerNorm in GPT-2, RMSNorm here) divides every logit by a larger scale and the
output distribution flattens. **Token-frequency neurons** push every logit along the log-frequency
of its token, moving the prediction towards or away from the unigram distribution.

The method, as implemented here (every step works on any TransformerLens bridge):

1. **Effective unembedding** (:func:`effective_unembedding`). The final norm computes
   ``γ ⊙ x̂ + β`` with ``x̂ = center(x) / scale(x)`` (``center`` is the identity for RMSNorm), then
   ``logits = (γ ⊙ x̂ + β) W_U + b_U``. The map from the normalised stream to the logits is therefore
   ``diag(γ) W_U`` — we fold ``γ`` **explicitly** (no need for ``compatibility_mode``; with it, ``γ``
   is already 1 and folding is a no-op). Softmax ignores a shift of all logits, so we also centre
   each row over the vocabulary (what ``center_unembed`` does; valid for RMSNorm too, unlike centring
   the writing weights). For LayerNorm the map is read through the norm's centring (the all-ones
   direction becomes an exact, trivial null direction, as in the paper's ``fold_ln``-processed GPT-2).
2. **Null space** (:func:`unembedding_spectrum`). The SVD ``W_eff = U S Vᵀ`` (computed from the
   ``d_model × d_model`` Gram matrix); the effective null space ``V₀`` is spanned by the left
   singular vectors with the ``k`` smallest singular values (12 of 768 for GPT-2 small in the paper,
   ≈ 1.6 % of ``d_model``).
3. **Per-neuron geometry** (:func:`final_layer_neuron_geometry`) of every final-layer neuron's
   output weight ``w_out`` (a row of ``W_out[-1]``; for LayerNorm models its mean is removed, since
   the norm removes it anyway): ``‖w_out‖``; ``LogitVar`` = variance over the vocabulary of the
   cosine between ``w_out`` and each token's column of ``W_eff``; ``ρ = ‖V₀ᵀ w_out‖ / ‖w_out‖``.
   Candidates (:func:`entropy_neuron_candidates`) are ranked by the norm they put into the null
   space, ``ρ ‖w_out‖``: large output norm *and* mostly invisible to the unembedding.
4. **Total vs direct effect of mean ablation** (:func:`mean_ablation_effects`). Setting a
   final-layer neuron to its mean activation changes the final residual stream by
   ``δ = (ā − a) w_out`` and nothing else (no later layer exists), so both effects are computed
   exactly from one cached clean run: the **total** effect re-runs the final norm on ``x + δ``
   (new scale); the **direct** effect keeps the clean scale (the norm's scale frozen, as
   ``helpers.effects.freeze_final_norm_scale_hooks`` does in a full forward pass). The difference is
   the norm-mediated effect. Measured on entropy, loss and KL(unigram ‖ model) at every token.
   :func:`forward_pass_effects` computes the same with full forward passes through
   :func:`helpers.effects.norm_mediated_effects` (the toolkit's ablation and frozen-scale hooks);
   :func:`cache_vs_forward_discrepancy` compares the two.
5. **Token frequency** (:func:`unigram_distribution`, :func:`frequency_scores`): the unigram
   distribution of the corpus, the centred log-frequency vector over the vocabulary, its residual
   direction (:func:`unigram_direction`) and each neuron's cosine with it through ``W_eff``.
6. **Induction** (:func:`repeated_text`, :func:`induction_ablation_values`, :func:`per_position_effects`,
   :func:`largest_entropy_reduction`): corpus text repeated once, as the official code does; the repeat
   is predictable by induction, so confidence rises — the paper finds an entropy neuron that fires
   there and *raises* entropy (hedging); clip-mean-ablating it lowers the entropy on the repeat.
   ``mean_ablation_effects(frozen_logit_direction=...)`` gives token-frequency neurons' "direct"
   effect with the logits' unigram component frozen (Fig. 4c).
7. **Induction heads drive it** (:func:`induction_scores` on :func:`repeated_random_tokens`,
   :func:`bos_ablation`): sending the top induction heads' attention to BOS at a position lowers the
   entropy neuron's activation there (Fig. 5c).

Neurons are named as in the paper, ``"{layer}.{neuron}"`` (``"11.584"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from helpers.batching import rows_per_forward
from helpers.models import norm_eps, norm_gain, post_sublayer_norm
from helpers.prompts import TokenBatch

ClipSide = Literal["none", "above", "below"]
CLIP_SIDES: tuple[str, ...] = ("none", "above", "below")

# --------------------------------------------------------------------------------------------------
# The final norm and the unembedding
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinalReadout:
    """The map from the final residual stream to the logits: final norm, then unembedding.

    ``logits(x) = ((center(x) / scale(x)) ⊙ weight + bias) @ W_U + b_U`` where ``center`` removes the
    mean over ``d_model`` for LayerNorm (``kind="ln"``) and does nothing for RMSNorm (``"rms"``), and
    ``scale(x) = sqrt(mean(center(x)²) + eps)``.
    """

    kind: Literal["ln", "rms"]
    eps: float
    weight: Float[torch.Tensor, "d_model"]
    bias: Float[torch.Tensor, "d_model"]
    W_U: Float[torch.Tensor, "d_model d_vocab"]
    b_U: Float[torch.Tensor, "d_vocab"]

    def center(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.kind == "ln" else x

    def scale(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "..."]:
        return (self.center(x).pow(2).mean(-1) + self.eps).sqrt()

    @property
    def bias_logits(self) -> Float[torch.Tensor, "d_vocab"]:
        """The logits every position gets whatever the stream: ``bias @ W_U + b_U``."""
        return self.bias @ self.W_U + self.b_U

    def logits(self, x: Float[torch.Tensor, "... d_model"], scale: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the residual stream ``x``; pass ``scale`` to freeze the norm's scale."""
        scale = self.scale(x) if scale is None else scale
        return (self.center(x) / scale[..., None] * self.weight) @ self.W_U + self.bias_logits


def final_readout(model: Any) -> FinalReadout:
    """Read the final norm (kind, eps, weight, bias) and the unembedding off ``model``.

    Raises:
        NotImplementedError: the final norm is neither a LayerNorm nor an RMSNorm.
    """
    norm = getattr(model.ln_final, "original_component", model.ln_final)
    name = type(norm).__name__
    if "rms" in name.lower():
        kind: Literal["ln", "rms"] = "rms"
    elif "layernorm" in name.lower() or isinstance(norm, torch.nn.LayerNorm):
        kind = "ln"
    else:
        raise NotImplementedError(f"The final norm of this model is a {name}; only LayerNorm and RMSNorm are supported.")
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or getattr(model.cfg, "eps", 1e-5)
    d_model = model.cfg.d_model
    weight = norm_gain(model.ln_final) if hasattr(model.ln_final, "original_component") else getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    W_U = model.W_U.detach().float()
    b_U = getattr(model, "b_U", None)
    return FinalReadout(
        kind=kind,
        eps=float(eps),
        weight=torch.ones(d_model) if weight is None else weight.detach().float().reshape(d_model).clone(),
        bias=torch.zeros(d_model) if bias is None else bias.detach().float().reshape(d_model).clone(),
        W_U=W_U,
        b_U=torch.zeros(W_U.shape[1]) if b_U is None else b_U.detach().float().clone(),
    )


def effective_unembedding(model: Any, readout: FinalReadout | None = None) -> Float[torch.Tensor, "d_model d_vocab"]:
    """``diag(γ) W_U`` with every row centred over the vocabulary (softmax-invariant).

    This is the linear map from the *normalised* residual stream to the logits, up to a shift of all
    logits by the same amount (which leaves the output distribution unchanged). For LayerNorm models
    the map is read through the norm's centring, so the all-ones direction is an exact (trivial) null
    direction — as in the paper's processed GPT-2, whose ``W_U`` is centred by ``fold_ln``.
    """
    readout = final_readout(model) if readout is None else readout
    W_eff = readout.weight[:, None] * readout.W_U
    if readout.kind == "ln":  # LayerNorm feeds only mean-free vectors in: read through the centring
        W_eff = W_eff - W_eff.mean(0, keepdim=True)
    return W_eff - W_eff.mean(-1, keepdim=True)


@dataclass(frozen=True)
class UnembeddingSpectrum:
    """Singular values (descending) and left singular vectors (columns) of the effective unembedding."""

    singular_values: Float[torch.Tensor, "d_model"]
    directions: Float[torch.Tensor, "d_model d_model"]

    def null_space(self, k: int) -> Float[torch.Tensor, "d_model k"]:
        """Orthonormal basis of the ``k`` directions the unembedding reads least (smallest singular values)."""
        d_model = self.directions.shape[0]
        if not 1 <= k < d_model:
            raise ValueError(f"null-space dimension k must be in 1..{d_model - 1}, got {k}.")
        return self.directions[:, -k:]


def unembedding_spectrum(model: Any, readout: FinalReadout | None = None) -> UnembeddingSpectrum:
    """Singular values and left singular vectors of :func:`effective_unembedding`.

    Computed from the ``d_model × d_model`` Gram matrix ``W_eff W_effᵀ = U S² Uᵀ`` in float64 (an
    eigendecomposition instead of an SVD of the ``d_model × d_vocab`` matrix: same ``U`` and ``S``,
    a fraction of the time).
    """
    W_eff = effective_unembedding(model, readout).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(W_eff @ W_eff.T)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    singular_values = eigenvalues[order].clamp_min(0).sqrt()
    return UnembeddingSpectrum(singular_values.float(), eigenvectors[:, order].float())


def default_null_space_dim(d_model: int) -> int:
    """The paper's choice scaled to ``d_model``: 12 of 768 for GPT-2 small (``round(d_model / 64)``)."""
    return max(1, round(d_model / 64))


def final_norm_facts(readout: FinalReadout) -> dict[str, float]:
    """Numbers behind "norms matter": the range of the final norm's weight γ, and how close the top
    singular direction of the *uncentred* ``diag(γ) W_U`` is to a uniform shift of all logits (cosine
    of its logit vector with the all-ones vector; ±1 = pure shift, invisible to softmax)."""
    raw = (readout.weight[:, None] * readout.W_U).double()
    top_direction = torch.linalg.eigh(raw @ raw.T).eigenvectors[:, -1]
    logits = top_direction @ raw
    uniformity = torch.nn.functional.cosine_similarity(logits, torch.ones_like(logits), dim=0)
    return {
        "gamma_min": float(readout.weight.min()),
        "gamma_max": float(readout.weight.max()),
        "gamma_mean": float(readout.weight.mean()),
        "uncentred_top_direction_uniformity": float(uniformity.abs()),
    }


# --------------------------------------------------------------------------------------------------
# Per-neuron geometry of the final layer
# --------------------------------------------------------------------------------------------------


def neuron_name(layer: int, neuron: int) -> str:
    """The paper's notation: ``"11.584"`` is neuron 584 of layer 11."""
    return f"{layer}.{neuron}"


def output_weights(model: Any, layer: int | None = None, readout: FinalReadout | None = None) -> Float[torch.Tensor, "d_mlp d_model"]:
    """What each neuron of ``layer`` (default: the final one) writes into the residual stream, rows =
    neurons: ``W_out[layer]``; mean-removed for LayerNorm models.

    Models with a norm after the MLP (Gemma-2/3's post-feedforward RMSNorm) write ``(1 + γ) ⊙ w_out``
    divided by that norm's per-token scale: the rows are multiplied by ``1 + γ`` (the direction is then
    exact; a positive per-token factor changes no direction, no ``ρ``, no cosine).
    """
    layer = model.cfg.n_layers - 1 if layer is None else layer
    readout = final_readout(model) if readout is None else readout
    rows = model.W_out[layer].detach().float()
    post = post_sublayer_norm(model, layer, "mlp")
    if post is not None:
        rows = rows * norm_gain(post).float()
    return readout.center(rows)


@dataclass
class NeuronGeometry:
    """``‖w_out‖``, LogitVar and null-space fraction ``ρ`` of every neuron of one layer."""

    layer: int
    norm: Float[torch.Tensor, "d_mlp"]
    logit_var: Float[torch.Tensor, "d_mlp"]
    null_fraction: Float[torch.Tensor, "d_mlp"]
    null_space_dim: int

    @property
    def null_norm(self) -> Float[torch.Tensor, "d_mlp"]:
        """``ρ ‖w_out‖`` = ``‖V₀ᵀ w_out‖``: how much output norm a neuron puts into the null space."""
        return self.null_fraction * self.norm

    def to_frame(self) -> pd.DataFrame:
        """One row per neuron: neuron, name, norm, logit_var, rho, null_norm, null_norm_rank (1 = top)."""
        frame = pd.DataFrame(
            {
                "neuron": np.arange(len(self.norm)),
                "name": [neuron_name(self.layer, i) for i in range(len(self.norm))],
                "norm": self.norm.numpy(),
                "logit_var": self.logit_var.numpy(),
                "rho": self.null_fraction.numpy(),
                "null_norm": self.null_norm.numpy(),
            }
        )
        frame["null_norm_rank"] = frame["null_norm"].rank(ascending=False, method="first").astype(int)
        return frame


def final_layer_neuron_geometry(
    model: Any,
    null_space_dim: int | None = None,
    *,
    spectrum: UnembeddingSpectrum | None = None,
    readout: FinalReadout | None = None,
) -> NeuronGeometry:
    """Norm, LogitVar and ``ρ`` of every final-layer neuron (the paper's Figure 2 quantities).

    Args:
        model: the bridge.
        null_space_dim: ``k``, the number of bottom singular directions that form ``V₀``
            (default :func:`default_null_space_dim`).
        spectrum, readout: pass them to avoid recomputing.
    """
    readout = final_readout(model) if readout is None else readout
    spectrum = unembedding_spectrum(model, readout) if spectrum is None else spectrum
    k = default_null_space_dim(model.cfg.d_model) if null_space_dim is None else null_space_dim
    W_eff = effective_unembedding(model, readout)
    w_out = output_weights(model, readout=readout)
    norm = w_out.norm(dim=-1)
    unit_out = w_out / norm.clamp_min(1e-12)[:, None]
    unit_columns = W_eff / W_eff.norm(dim=0, keepdim=True).clamp_min(1e-12)
    logit_var = (unit_out @ unit_columns).var(dim=-1)
    null_fraction = (w_out @ spectrum.null_space(k)).norm(dim=-1) / norm.clamp_min(1e-12)
    return NeuronGeometry(model.cfg.n_layers - 1, norm, logit_var, null_fraction, k)


def entropy_neuron_candidates(geometry: NeuronGeometry, n: int) -> list[int]:
    """The ``n`` neurons that put the most norm into the null space (largest ``ρ ‖w_out‖``)."""
    if not 1 <= n <= len(geometry.norm):
        raise ValueError(f"n must be in 1..{len(geometry.norm)}, got {n}.")
    return geometry.null_norm.topk(n).indices.tolist()


def random_neurons(d_mlp: int, n: int, *, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """``n`` distinct neurons drawn uniformly (seeded) from ``range(d_mlp)`` minus ``exclude``."""
    pool = torch.tensor(sorted(set(range(d_mlp)) - set(int(i) for i in exclude)))
    if not 1 <= n <= len(pool):
        raise ValueError(f"cannot draw {n} random neurons from the {len(pool)} left after excluding {len(exclude)}.")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(pool[order].tolist())


# --------------------------------------------------------------------------------------------------
# Token frequency
# --------------------------------------------------------------------------------------------------


def token_counts(
    tokens: Int[torch.Tensor, "..."],
    d_vocab: int,
    *,
    ignore: Sequence[int] = (),
) -> Int[torch.Tensor, "d_vocab"]:
    """How often each token id occurs in ``tokens`` (ids in ``ignore``, e.g. BOS, not counted)."""
    flat = tokens.flatten().cpu()
    if len(ignore):
        flat = flat[~torch.isin(flat, torch.tensor(list(ignore)))]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= d_vocab):
        raise ValueError(f"token ids must be in 0..{d_vocab - 1}.")
    return torch.bincount(flat, minlength=d_vocab)


def unigram_distribution(
    tokens: Int[torch.Tensor, "..."],
    d_vocab: int,
    *,
    pseudocount: float = 1.0,
    ignore: Sequence[int] = (),
) -> Float[torch.Tensor, "d_vocab"]:
    """Token frequencies of ``tokens`` (ids in ``ignore``, e.g. BOS, not counted), add-``pseudocount``
    smoothed so that every token has non-zero probability."""
    if pseudocount <= 0:
        raise ValueError(f"pseudocount must be > 0 (every token needs a non-zero probability), got {pseudocount}.")
    counts = token_counts(tokens, d_vocab, ignore=ignore).double() + pseudocount
    return (counts / counts.sum()).float()


def log_frequency_vector(
    log_unigram: Float[torch.Tensor, "d_vocab"],
    *,
    seen: Bool[torch.Tensor, "d_vocab"] | None = None,
) -> Float[torch.Tensor, "d_vocab"]:
    """The unigram direction in logit space, ``ℓ``: the log-frequencies centred over the tokens whose
    frequency was measured (``seen``, e.g. ``token_counts(...) > 0``) and 0 on the others;
    ``seen=None``: every token (the log-unigram vector centred over the whole vocabulary).

    Why not always the whole vocabulary: smoothing gives every token that the counted text never
    contains the same floor value. The paper counts the model's training data, where nearly every token
    occurs; a sample of a few hundred thousand tokens leaves most of a large vocabulary unseen
    (Gemma-3: 33k of 262k types in the embedded profile's 510k tokens), and the whole-vocabulary vector
    is then mostly the contrast *seen once vs never seen* rather than log frequency. ``ℓ`` sums to 0
    over the vocabulary either way, so freezing the logits' component along it
    (``mean_ablation_effects(frozen_logit_direction=ℓ)``) leaves the unseen tokens' logits alone."""
    log_unigram = log_unigram.float()
    if seen is None:
        return log_unigram - log_unigram.mean()
    seen = torch.as_tensor(seen, dtype=torch.bool, device=log_unigram.device).flatten()
    if seen.shape != log_unigram.shape:
        raise ValueError(f"seen must have one entry per token ({log_unigram.numel()}), got shape {tuple(seen.shape)}.")
    if int(seen.sum()) < 2:
        raise ValueError(f"seen marks {int(seen.sum())} tokens; the unigram direction needs at least 2 measured tokens.")
    vector = torch.zeros_like(log_unigram)
    vector[seen] = log_unigram[seen] - log_unigram[seen].mean()
    return vector


def frequency_scores(
    model: Any,
    log_unigram: Float[torch.Tensor, "d_vocab"],
    *,
    readout: FinalReadout | None = None,
    seen: Bool[torch.Tensor, "d_vocab"] | None = None,
) -> Float[torch.Tensor, "d_mlp"]:
    """Cosine between each final-layer neuron's direct logit effect ``W_effᵀ w_out`` and the unigram
    direction ``ℓ`` (:func:`log_frequency_vector`; ``seen``: the tokens whose frequency was measured).
    +1: the neuron raises frequent tokens' logits in proportion to their log frequency (pushes towards
    the unigram distribution); -1: away from it."""
    readout = final_readout(model) if readout is None else readout
    W_eff = effective_unembedding(model, readout)
    target = log_frequency_vector(log_unigram, seen=seen).to(W_eff.device)
    direct = output_weights(model, readout=readout) @ W_eff  # [d_mlp, d_vocab], rows centred already
    return torch.nn.functional.cosine_similarity(direct, target[None, :], dim=-1)


def unigram_direction(
    model: Any,
    log_unigram: Float[torch.Tensor, "d_vocab"],
    *,
    readout: FinalReadout | None = None,
    seen: Bool[torch.Tensor, "d_vocab"] | None = None,
) -> Float[torch.Tensor, "d_model"]:
    """Unit direction ``v`` of the (normalised) residual stream whose logits ``W_effᵀ v`` best fit the
    unigram direction ``ℓ`` (least squares, over the ``seen`` tokens only when given: the others have
    no measured frequency; :func:`log_frequency_vector`). Adding it makes the prediction more
    unigram-like."""
    readout = final_readout(model) if readout is None else readout
    W_eff = effective_unembedding(model, readout)
    target = log_frequency_vector(log_unigram, seen=seen).to(W_eff.device)
    rows = slice(None) if seen is None else torch.as_tensor(seen, dtype=torch.bool).flatten().to(W_eff.device)
    v = torch.linalg.lstsq(W_eff.T[rows], target[rows][:, None]).solution[:, 0]
    return v / v.norm()


def token_frequency_candidates(scores: Float[torch.Tensor, "d_mlp"], n: int, *, exclude: Sequence[int] = ()) -> list[int]:
    """The ``n`` neurons with the largest ``|frequency score|``, skipping ``exclude``."""
    magnitude = scores.abs().clone()
    if len(exclude):
        magnitude[list(exclude)] = -1.0
    return magnitude.topk(n).indices.tolist()


# --------------------------------------------------------------------------------------------------
# One clean run on text, cached
# --------------------------------------------------------------------------------------------------


def _per_token_stats(logits: torch.Tensor, next_tokens: torch.Tensor, log_unigram: torch.Tensor | None):
    """Entropy, loss of ``next_tokens`` and KL(unigram ‖ model), each ``logits.shape[:-1]``.

    One exponential pass over the vocabulary: with ``lse = logsumexp(z)`` and ``p = softmax(z)``,
    ``H = lse − Σ p z``, ``loss = lse − z[target]`` and ``KL(q ‖ p) = Σ q log q − q·z + lse`` (a
    matrix-vector product). Targets < 0 (no next token) get a meaningless loss.
    """
    logits = logits.float()
    top = logits.amax(-1, keepdim=True)
    weights = torch.sub(logits, top).exp_()  # the only [.., d_vocab] temporary
    total = weights.sum(-1)
    lse = total.log() + top[..., 0]
    entropy = lse - weights.mul_(logits).sum(-1) / total
    loss = lse - logits.gather(-1, next_tokens[..., None].clamp_min(0))[..., 0]
    kl = None
    if log_unigram is not None:
        q = log_unigram.exp()
        kl = (q * log_unigram).sum() - logits @ q + lse
    return entropy, loss, kl


@dataclass
class CleanRun:
    """What one clean pass over a TokenBatch leaves for the ablation analysis (all on CPU).

    ``valid`` marks the tokens every statistic is averaged over: they have a next token, and neither
    they nor their next token is BOS or the end-of-text separator (as in the paper's filtering).
    ``loss`` at position ``p`` is the loss of predicting token ``p + 1``. ``neuron_means`` is the
    mean activation of every final-layer neuron over all non-BOS tokens: the mean-ablation values.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    valid: Bool[torch.Tensor, "batch pos"]
    resid: Float[torch.Tensor, "batch pos d_model"]
    scale: Float[torch.Tensor, "batch pos"]
    activations: Float[torch.Tensor, "batch pos n_tracked"]
    tracked: list[int]
    neuron_means: Float[torch.Tensor, "d_mlp"]
    entropy: Float[torch.Tensor, "batch pos"]
    loss: Float[torch.Tensor, "batch pos"]
    kl_unigram: Float[torch.Tensor, "batch pos"] | None
    log_unigram: Float[torch.Tensor, "d_vocab"] | None = field(default=None, repr=False)
    mlp_raw: Float[torch.Tensor, "batch pos d_model"] | None = field(default=None, repr=False)
    """Models with a post-feedforward norm (Gemma-2/3): the final MLP's output before that norm."""
    mlp_out: Float[torch.Tensor, "batch pos d_model"] | None = field(default=None, repr=False)
    """… and after it (what the final MLP adds to the residual stream)."""

    @property
    def n_tokens(self) -> int:
        return int(self.valid.sum())

    def activation(self, neuron: int) -> Float[torch.Tensor, "batch pos"]:
        if neuron not in self.tracked:
            raise KeyError(f"neuron {neuron} was not tracked in this clean run; pass it in run_clean(neurons=...).")
        return self.activations[..., self.tracked.index(neuron)]


def special_token_ids(model: Any) -> list[int]:
    """The BOS and end-of-text ids of ``model``'s tokenizer (not counted as text)."""
    tok = model.tokenizer
    return sorted({i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None})


def _chunk_rows(model: Any, n_pos: int, batch_size: int | None) -> int:
    """``batch_size`` checked, or the memory budget's rows per forward pass when it is ``None``."""
    if batch_size is None:
        return rows_per_forward(model, n_pos)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int (sequences per forward pass) or None (from the "
                         f"memory budget), got {batch_size!r}.")
    return batch_size


@torch.no_grad()
def run_clean(
    model: Any,
    batch: TokenBatch,
    neurons: Sequence[int],
    *,
    log_unigram: Float[torch.Tensor, "d_vocab"] | None = None,
    batch_size: int | None = None,
    check_readout: bool = True,
) -> CleanRun:
    """Run ``batch`` once, caching the final residual stream, the final norm's scale and the
    activations of ``neurons`` (final layer); compute entropy, loss and KL to the unigram distribution.

    The batch must have no padding (corpus windows from :func:`helpers.corpus.load_corpus_tokens`).
    With ``check_readout`` the first chunk's logits are recomputed from the cached stream with
    :class:`FinalReadout` and must match the model's (else the cache-based effects would be wrong).
    ``batch_size`` (sequences per forward pass) defaults to what :data:`helpers.batching.FORWARD_BUDGET_BYTES`
    allows for this model's vocabulary and the windows' length (8 windows of 256 tokens for SmolLM2,
    1 for Gemma-3's 262k-token vocabulary).
    """
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"batch must be a TokenBatch (e.g. from helpers.corpus.load_corpus_tokens), got {type(batch).__name__}.")
    if not bool((batch.attention_mask == 1).all()):
        raise ValueError("run_clean needs unpadded windows (attention_mask all ones): use helpers.corpus.load_corpus_tokens.")
    batch_size = _chunk_rows(model, batch.tokens.shape[1], batch_size)
    layer = model.cfg.n_layers - 1
    neurons = [int(n) for n in neurons]
    if any(not 0 <= n < model.cfg.d_mlp for n in neurons):
        raise ValueError(f"neurons must be in 0..{model.cfg.d_mlp - 1}, got {neurons}.")
    readout = final_readout(model)
    names = (f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.mlp.hook_post", "ln_final.hook_scale")
    post_norm = post_sublayer_norm(model, layer, "mlp") is not None
    if post_norm:  # the final MLP's output before and after its post-feedforward norm
        names += (f"blocks.{layer}.mlp.hook_out", f"blocks.{layer}.hook_mlp_out")
    special = torch.tensor(special_token_ids(model))
    log_q = None if log_unigram is None else log_unigram.float().cpu()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("resid", "scale", "acts", "entropy", "loss", "kl", "raw", "out")}
    act_sum = torch.zeros(model.cfg.d_mlp, dtype=torch.float64)
    act_count = 0
    for start in tqdm(range(0, len(batch), batch_size), desc="clean run", leave=False):
        chunk = batch[start : start + batch_size]
        logits, cache = model.run_with_cache(chunk.tokens, attention_mask=chunk.attention_mask, names_filter=lambda n: n in names)
        resid = cache[names[0]].float().cpu()
        scale = cache[names[2]].float().cpu()[..., 0]
        post = cache[names[1]].float().cpu()
        logits = logits.float().cpu()
        if check_readout and start == 0:
            recomputed = readout.logits(resid[:1])
            error = (recomputed - logits[:1]).abs().max().item()
            tolerance = 1e-3 * max(1.0, logits[:1].abs().max().item())
            if error > tolerance:
                raise NotImplementedError(
                    f"Recomputing the logits from the final residual stream differs from the model's by {error:.3g}: "
                    "this model's final norm/unembedding is not the LayerNorm/RMSNorm + W_U that FinalReadout assumes."
                )
        tokens = chunk.tokens.cpu()
        next_tokens = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)
        entropy, loss, kl = _per_token_stats(logits, next_tokens, log_q)
        non_bos = tokens != (model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else -1)
        act_sum += (post * non_bos[..., None]).sum(dim=(0, 1)).double()
        act_count += int(non_bos.sum())
        raw = cache[names[3]].float().cpu() if post_norm else None
        out = cache[names[4]].float().cpu() if post_norm else None
        for key, value in (("resid", resid), ("scale", scale), ("acts", post[..., neurons]), ("entropy", entropy), ("loss", loss),
                           ("kl", kl), ("raw", raw), ("out", out)):
            if value is not None:
                parts[key].append(value)
        del cache, logits
    tokens = batch.tokens.cpu()
    next_tokens = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)
    valid = ~torch.isin(tokens, special) & ~torch.isin(next_tokens, special) & (next_tokens >= 0)
    return CleanRun(
        tokens=tokens,
        valid=valid,
        resid=torch.cat(parts["resid"]),
        scale=torch.cat(parts["scale"]),
        activations=torch.cat(parts["acts"]),
        tracked=neurons,
        neuron_means=(act_sum / max(act_count, 1)).float(),
        entropy=torch.cat(parts["entropy"]),
        loss=torch.cat(parts["loss"]),
        kl_unigram=torch.cat(parts["kl"]) if parts["kl"] else None,
        log_unigram=log_q,
        mlp_raw=torch.cat(parts["raw"]) if parts["raw"] else None,
        mlp_out=torch.cat(parts["out"]) if parts["out"] else None,
    )


# --------------------------------------------------------------------------------------------------
# Total vs direct effect of mean-ablating final-layer neurons
# --------------------------------------------------------------------------------------------------


@dataclass
class AblationEffects:
    """Per-token changes (ablated − clean) caused by mean-ablating each neuron, on the valid tokens.

    Every tensor is ``[n_neurons, n_tokens]``. ``total`` re-runs the final norm, ``direct`` keeps
    its clean scale; ``norm-mediated = total − direct``.
    """

    layer: int
    neurons: list[int]
    activation_delta: Float[torch.Tensor, "n_neurons n_tokens"]
    entropy_total: Float[torch.Tensor, "n_neurons n_tokens"]
    entropy_direct: Float[torch.Tensor, "n_neurons n_tokens"]
    loss_total: Float[torch.Tensor, "n_neurons n_tokens"]
    loss_direct: Float[torch.Tensor, "n_neurons n_tokens"]
    kl_total: Float[torch.Tensor, "n_neurons n_tokens"] | None = None
    kl_direct: Float[torch.Tensor, "n_neurons n_tokens"] | None = None
    loss_frozen_direction: Float[torch.Tensor, "n_neurons n_tokens"] | None = None
    """With ``frozen_logit_direction``: the total effect with the logits' component along that (vocab)
    direction reset to its clean value — the paper's "direct effect" for token-frequency neurons
    (``DE_freq``, Fig. 4c), with the direction = the centred log-unigram vector."""
    kl_frozen_direction: Float[torch.Tensor, "n_neurons n_tokens"] | None = None

    @property
    def names(self) -> list[str]:
        return [neuron_name(self.layer, n) for n in self.neurons]

    def summary(self, groups: dict[str, Sequence[int]] | None = None) -> pd.DataFrame:
        """One row per neuron: mean and mean-absolute total/direct effects on entropy and loss (and KL
        to the unigram distribution), and the norm-mediated share of each (:func:`norm_mediated_share`).
        ``groups`` maps a label (``"entropy candidate"``, ``"random"``) to neurons, for a ``group`` column.
        With a frozen logit direction also ``loss_abs_direction_frozen`` (``DE_freq``) and
        ``loss_direction_share`` = ``1 − DE_freq / TE`` (mean |Δloss|), the paper's Fig. 4c x-axis."""
        rows = []
        for i, neuron in enumerate(self.neurons):
            row: dict[str, Any] = {"neuron": neuron, "name": self.names[i]}
            if groups:
                row["group"] = next((g for g, members in groups.items() if neuron in members), "")
            metrics = [("entropy", self.entropy_total, self.entropy_direct), ("loss", self.loss_total, self.loss_direct)]
            if self.kl_total is not None and self.kl_direct is not None:
                metrics.append(("kl_unigram", self.kl_total, self.kl_direct))
            for metric, total, direct in metrics:
                row[f"{metric}_total"] = float(total[i].mean())
                row[f"{metric}_direct"] = float(direct[i].mean())
                row[f"{metric}_abs_total"] = float(total[i].abs().mean())
                row[f"{metric}_abs_direct"] = float(direct[i].abs().mean())
                row[f"{metric}_norm_share"] = float(norm_mediated_share(total[i], direct[i]))
            if self.loss_frozen_direction is not None:
                # the paper's Fig. 4c x-axis: 1 − DE_freq / TE, both mean |Δloss| over tokens
                frozen = float(self.loss_frozen_direction[i].abs().mean())
                row["loss_abs_direction_frozen"] = frozen
                row["loss_direction_share"] = 1.0 - frozen / max(row["loss_abs_total"], 1e-12)
            if self.kl_frozen_direction is not None:
                row["kl_unigram_abs_direction_frozen"] = float(self.kl_frozen_direction[i].abs().mean())
            rows.append(row)
        return pd.DataFrame(rows)


def norm_mediated_share(total: torch.Tensor, direct: torch.Tensor) -> torch.Tensor:
    """Share of an effect carried by the final norm, in [0, 1], from per-token effects:
    ``mean|total − direct| / (mean|total − direct| + mean|direct|)``.

    1: the neuron acts only through the norm's scale (a pure entropy neuron); 0: only directly. The
    paper's ``1 − direct/total`` is unbounded when the total effect is near zero (most random neurons),
    and mean signed effects cancel for neurons that fire both above and below their mean; per-token
    absolute values avoid both problems.
    """
    mediated = (total - direct).abs().mean(-1)
    direct_size = direct.abs().mean(-1)
    return mediated / (mediated + direct_size).clamp_min(1e-12)


@torch.no_grad()
def mean_ablation_effects(
    model: Any,
    clean: CleanRun,
    neurons: Sequence[int],
    *,
    values: Sequence[float] | None = None,
    clip: Sequence[ClipSide] | None = None,
    frozen_logit_direction: Float[torch.Tensor, "d_vocab"] | None = None,
    max_tokens: int | None = None,
    token_chunk: int = 512,
) -> AblationEffects:
    """Total and direct effects of mean-ablating each final-layer neuron, computed from the cache.

    For neuron ``n`` at each token: ``δx = (ā_n − a_n) w_out``. Total: logits of ``x + δx`` through the
    final norm with its new scale. Direct: the same with the norm's clean scale (frozen). Since the
    neuron is in the last layer these are exact (checked against full forward passes in the tests).
    The logits are formed as ``(s/s')·(z − c) + (δa/s')·u + c`` with ``u = (γ ⊙ w_out) W_U`` and
    ``c`` the bias logits, so each neuron costs only elementwise work over ``[tokens, d_vocab]``.

    With a post-feedforward norm (Gemma-2/3: the MLP adds ``o = g ⊙ m / r`` with ``m`` its raw output,
    ``r = rms(m)``, ``g = 1 + γ``) the neuron changes ``m`` by ``δa w_out`` and that norm is recomputed
    (it belongs to the neuron's path; only the final norm is frozen for "direct"): with
    ``r' = rms(m + δa w_out)``, ``δx = (r/r' − 1) o + (δa/r') g ⊙ w_out``, so the logits gain
    ``(r/r' − 1) L(o)`` — one extra ``[tokens, d_vocab]`` product per chunk, shared by all neurons —
    and ``u`` uses ``g ⊙ w_out``. Still exact.

    Args:
        model: the bridge the clean run came from.
        clean: from :func:`run_clean`; every neuron in ``neurons`` must have been tracked.
        neurons: final-layer neuron indices.
        values: the ablation values (default: ``clean.neuron_means``, i.e. mean ablation).
        clip: one :data:`ClipSide` per neuron (default: all ``"none"``): ``"above"`` lowers only the
            activations above the value to it (``min(a, value)``), ``"below"`` raises only those
            below it (``max(a, value)``) — the official code's *clipped* mean ablation of the
            induction case study (``strict_neurons_clipped_ablation_hook``); ``"none"`` sets every
            activation to the value.
        frozen_logit_direction: a vector over the vocabulary (e.g. the log-unigram distribution);
            when given, also the total effect with the logits' component along its centred unit
            vector reset to the clean value (``loss_frozen_direction``, ``kl_frozen_direction``;
            the official code's ``adjust_vectors_3dim`` on the ablated logits).
        max_tokens: use only the first ``max_tokens`` valid tokens (the cost is linear in tokens ×
            neurons); ``None``: all.
        token_chunk: tokens per chunk (a chunk's logits are ``token_chunk × d_vocab`` floats).
    """
    neurons = [int(n) for n in neurons]
    readout = final_readout(model)
    layer = model.cfg.n_layers - 1
    raw_w = model.W_out[layer].detach().float()[neurons]  # the MLP's raw output changes by these
    post = post_sublayer_norm(model, layer, "mlp")
    if post is not None and (clean.mlp_raw is None or clean.mlp_out is None):
        raise ValueError("This model normalises its MLP output (post-feedforward norm): the clean run must come from "
                         "run_clean on this model (it caches the final MLP's output before and after that norm).")
    gain = norm_gain(post).float() if post is not None else None
    w_out = raw_w * gain if gain is not None else raw_w  # what the stream gains per unit of activation (÷ r)
    centred_w = readout.center(w_out)  # what the norm lets through (LayerNorm removes the mean)
    direct_logits = (centred_w * readout.weight) @ readout.W_U  # [n, d_vocab]: logits per unit of x̂
    ablate_to = clean.neuron_means[neurons] if values is None else torch.as_tensor(values, dtype=torch.float32)
    if ablate_to.shape != (len(neurons),):
        raise ValueError(f"values must have one entry per neuron ({len(neurons)}), got shape {tuple(ablate_to.shape)}.")
    sides = ["none"] * len(neurons) if clip is None else list(clip)
    if len(sides) != len(neurons) or any(side not in CLIP_SIDES for side in sides):
        raise ValueError(f"clip must give one of {CLIP_SIDES} per neuron ({len(neurons)}), got {clip!r}.")
    direction = None
    if frozen_logit_direction is not None:
        direction = frozen_logit_direction.float().cpu().flatten()
        if direction.shape != (readout.W_U.shape[1],):
            raise ValueError(f"frozen_logit_direction must have d_vocab = {readout.W_U.shape[1]} entries, got {tuple(frozen_logit_direction.shape)}.")
        direction = direction - direction.mean()
        if float(direction.norm()) == 0:
            raise ValueError("frozen_logit_direction is constant over the vocabulary: it has no direction once centred.")
        direction = direction / direction.norm()
    mask = clean.valid.clone()
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}.")
        keep = torch.cumsum(mask.flatten().long(), 0) <= max_tokens
        mask &= keep.reshape(mask.shape)
    resid = clean.resid[mask]  # [T, d_model]
    scale = clean.scale[mask]
    if post is not None:
        post_eps = norm_eps(post)
        mlp_raw, mlp_out = clean.mlp_raw[mask], clean.mlp_out[mask]  # [T, d_model]
        mlp_scale = (mlp_raw.pow(2).mean(-1) + post_eps).sqrt()  # r
        centred_out = readout.center(mlp_out)
    acts = torch.stack([clean.activation(n)[mask] for n in neurons])  # [n, T]
    next_tokens = torch.cat([clean.tokens[:, 1:], torch.full_like(clean.tokens[:, :1], -1)], dim=1)[mask]
    delta = ablate_to[:, None] - acts  # [n, T]
    for i, side in enumerate(sides):  # clipped ablation: only activations on one side of the value move
        if side == "above":
            delta[i] = delta[i].clamp(max=0.0)
        elif side == "below":
            delta[i] = delta[i].clamp(min=0.0)
    bias_logits = readout.bias_logits
    log_q = clean.log_unigram
    out = {k: torch.zeros(len(neurons), resid.shape[0]) for k in ("ht", "hd", "lt", "ld", "kt", "kd", "lf", "kf")}
    base_entropy, base_loss = clean.entropy[mask], clean.loss[mask]
    base_kl = clean.kl_unigram[mask] if clean.kl_unigram is not None else None
    centred_resid = readout.center(resid)
    has_bias = bool(bias_logits.abs().max() > 0)
    # A token no neuron moves (δa = 0 for all of them: a clipped ablation leaves the tokens on the other
    # side of the value alone) keeps its clean logits, so its effects are exactly 0: only the moved
    # tokens are computed (about half of them under a clipped ablation; the vocabulary-sized work is
    # all per token).
    moved = torch.nonzero((delta != 0).any(0)).flatten()
    for start in tqdm(range(0, len(moved), token_chunk), desc="ablation effects", leave=False):
        rows = moved[start : start + token_chunk]
        x, s = resid[rows], scale[rows]
        z0 = readout.logits(x, scale=s) - bias_logits  # clean logits without the bias part
        if direction is not None:
            clean_along = (z0 + bias_logits) @ direction  # [chunk]: the clean logits' component along it
        xc = centred_resid[rows]
        if post is not None:
            out_logits = (centred_out[rows] * readout.weight) @ readout.W_U  # L(o), shared by every neuron
        for i in range(len(neurons)):
            # this neuron's moved tokens in the chunk (all of them for an unclipped ablation)
            sub = torch.nonzero(delta[i, rows] != 0).flatten()
            if len(sub) == 0:
                continue
            whole = len(sub) == len(rows)

            def pick(t: torch.Tensor) -> torch.Tensor:
                return t if whole else t[sub]

            here = pick(rows)
            d, s_i, xc_i, z0_i = delta[i, here], pick(s), pick(xc), pick(z0)
            if post is None:
                along, rescale = d, None  # δx = δa · w_out
                new_scale = ((xc_i + d[:, None] * centred_w[i]).pow(2).mean(-1) + readout.eps).sqrt()
            else:  # δx = (r/r' − 1) o + (δa/r') g ⊙ w_out
                r = mlp_scale[here]
                r_new = ((mlp_raw[here] + d[:, None] * raw_w[i]).pow(2).mean(-1) + post_eps).sqrt()
                along, rescale = d / r_new, r / r_new - 1.0
                shifted = xc_i + rescale[:, None] * centred_out[here] + along[:, None] * centred_w[i]
                new_scale = (shifted.pow(2).mean(-1) + readout.eps).sqrt()
                out_logits_i = pick(out_logits)
            for kind, (kh, kl_, kk) in (("total", ("ht", "lt", "kt")), ("direct", ("hd", "ld", "kd"))):
                divisor = new_scale if kind == "total" else s_i
                if kind == "total":  # (s/s')·z0 + (δa/s')·u + c
                    logits = (s_i / new_scale)[:, None] * z0_i
                    logits.addr_(along / new_scale, direct_logits[i])
                else:  # z0 + (δa/s)·u + c
                    logits = z0_i.clone().addr_(along / s_i, direct_logits[i])
                if rescale is not None:
                    logits.addcmul_((rescale / divisor)[:, None], out_logits_i)
                if has_bias:
                    logits += bias_logits
                h, loss, kl = _per_token_stats(logits, next_tokens[here], log_q)
                if kind == "total" and direction is not None:  # reset the component along the direction
                    logits.addr_(pick(clean_along) - logits @ direction, direction)
                    _, loss_f, kl_f = _per_token_stats(logits, next_tokens[here], log_q)
                    out["lf"][i, here] = loss_f - base_loss[here]
                    if kl_f is not None and base_kl is not None:
                        out["kf"][i, here] = kl_f - base_kl[here]
                del logits
                out[kh][i, here] = h - base_entropy[here]
                out[kl_][i, here] = loss - base_loss[here]
                if kl is not None and base_kl is not None:
                    out[kk][i, here] = kl - base_kl[here]
    has_kl = log_q is not None and base_kl is not None
    return AblationEffects(
        layer=layer,
        neurons=neurons,
        activation_delta=delta,
        entropy_total=out["ht"],
        entropy_direct=out["hd"],
        loss_total=out["lt"],
        loss_direct=out["ld"],
        kl_total=out["kt"] if has_kl else None,
        kl_direct=out["kd"] if has_kl else None,
        loss_frozen_direction=out["lf"] if direction is not None else None,
        kl_frozen_direction=out["kf"] if direction is not None and has_kl else None,
    )


# --------------------------------------------------------------------------------------------------
# The same effects with real hooks (slow; used to check the cache-based path)
# --------------------------------------------------------------------------------------------------


def token_entropy(logits: Float[torch.Tensor, "batch pos d_vocab"]) -> Float[torch.Tensor, "batch pos"]:
    """Entropy (nats) of the next-token distribution at every position."""
    logprobs = logits.float().log_softmax(-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def forward_pass_effects(
    model: Any,
    batch: TokenBatch,
    neurons: Sequence[int],
    values: Sequence[float],
) -> dict[str, Float[torch.Tensor, "n_neurons batch pos"]]:
    """Entropy effects of setting each final-layer neuron to its value, with **full forward passes**:
    :func:`helpers.effects.norm_mediated_effects` (ablation hooks from :mod:`helpers.ablation`, the
    final-norm scale frozen by :func:`helpers.effects.freeze_final_norm_scale_hooks`). Returns
    ``"total"``, ``"frozen_scale"`` (= direct), ``"norm_mediated"`` ``[neuron, batch, pos]`` and ``"clean"``.

    Slow (two forward passes per neuron); used to check :func:`mean_ablation_effects`, which gets the
    same numbers from one cached run.
    """
    from helpers.ablation import Neuron
    from helpers.effects import norm_mediated_effects

    layer = model.cfg.n_layers - 1
    components = [Neuron(layer, int(n)) for n in neurons]
    return norm_mediated_effects(model, batch, components, token_entropy,
                                 values=[torch.tensor(float(v)) for v in values], progress=False)


def cache_vs_forward_discrepancy(
    model: Any,
    batch: TokenBatch,
    neurons: Sequence[int],
    values: Sequence[float],
) -> pd.DataFrame:
    """For each neuron, the largest |difference| between :func:`mean_ablation_effects` (cache-based)
    and :func:`forward_pass_effects` (hooks, full forward passes) in the total and the direct entropy
    effect, next to the size of those effects. The two must agree to float precision."""
    clean = run_clean(model, batch, neurons)
    fast = mean_ablation_effects(model, clean, neurons, values=values)
    slow = forward_pass_effects(model, batch, neurons, values)
    rows = []
    for i, neuron in enumerate(neurons):
        total_slow = slow["total"][i][clean.valid]
        direct_slow = slow["frozen_scale"][i][clean.valid]
        rows.append({
            "name": neuron_name(fast.layer, neuron),
            "max |total effect|": float(total_slow.abs().max()),
            "max |total: cache − forward|": float((fast.entropy_total[i] - total_slow).abs().max()),
            "max |direct effect|": float(direct_slow.abs().max()),
            "max |direct: cache − forward|": float((fast.entropy_direct[i] - direct_slow).abs().max()),
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Induction case study
# --------------------------------------------------------------------------------------------------


def repeated_random_tokens(
    model: Any,
    n_sequences: int,
    half_length: int,
    *,
    seed: int = 0,
    vocabulary: Sequence[int] | torch.Tensor | None = None,
) -> TokenBatch:
    """``[BOS] r r``: ``half_length`` random tokens, then the same tokens again (no padding).

    Tokens are drawn uniformly (seeded) from ``vocabulary`` (default: every id except special
    tokens). In the second half every token is predictable by induction (copying what followed its
    previous occurrence), in the first half none is.
    """
    if n_sequences < 1 or half_length < 2:
        raise ValueError(f"need n_sequences >= 1 and half_length >= 2, got {n_sequences}, {half_length}.")
    pool = torch.as_tensor(vocabulary if vocabulary is not None else range(model.cfg.d_vocab), dtype=torch.long)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or []) | set(special_token_ids(model))
    pool = pool[~torch.isin(pool, torch.tensor(sorted(special), dtype=torch.long))]
    if len(pool) < half_length:
        raise ValueError(f"vocabulary has only {len(pool)} usable tokens; need at least half_length={half_length}.")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool), (n_sequences, half_length), generator=generator)
    half = pool[picks]
    bos = model.tokenizer.bos_token_id
    parts = ([torch.full((n_sequences, 1), bos, dtype=torch.long)] if bos is not None else []) + [half, half]
    tokens = torch.cat(parts, dim=1)
    device = getattr(model.cfg, "device", None) or "cpu"
    return TokenBatch(tokens.to(device), torch.ones_like(tokens).to(device), "right")


def repeated_text(windows: TokenBatch, half_length: int) -> TokenBatch:
    """``[BOS] t₁…tₙ t₁…tₙ`` from corpus windows ``[BOS] t₁ t₂ …``: the first ``n = half_length`` text
    tokens of each window, repeated once — the official code's induction data (``case_studies/induction.py``:
    ``cat(w[:100], w[1:100])`` of 256-token C4 windows, i.e. ``n = 99``, 199 tokens).

    Raises:
        ValueError: windows shorter than ``half_length + 1`` tokens, padded windows, or ``half_length < 2``.
    """
    if not isinstance(windows, TokenBatch):
        raise TypeError(f"windows must be a TokenBatch (helpers.corpus.load_corpus_tokens), got {type(windows).__name__}.")
    if half_length < 2 or windows.tokens.shape[1] < half_length + 1:
        raise ValueError(f"need half_length >= 2 and windows of at least half_length + 1 = {half_length + 1} tokens "
                         f"(BOS + text), got half_length={half_length} and windows of {windows.tokens.shape[1]}.")
    if not bool((windows.attention_mask == 1).all()):
        raise ValueError("windows must be unpadded (attention_mask all ones): use helpers.corpus.load_corpus_tokens.")
    tokens = torch.cat([windows.tokens[:, : half_length + 1], windows.tokens[:, 1 : half_length + 1]], dim=1)
    return TokenBatch(tokens, torch.ones_like(tokens), "right")


def _halves(half_length: int) -> tuple[slice, slice]:
    """Positions of ``[BOS] t₁…tₙ t₁…tₙ``: the first occurrence's text tokens ``1..n`` and the repeat
    ``n+1..2n`` (the tokens there have been seen before; each predicts the copy of what followed them)."""
    return slice(1, half_length + 1), slice(half_length + 1, 2 * half_length + 1)


def induction_ablation_values(clean: CleanRun, neurons: Sequence[int], half_length: int) -> tuple[list[float], list[ClipSide]]:
    """The clipped-mean ablation of the official induction code, per neuron: the value is the neuron's
    mean activation on the first occurrence (no induction there), and the side is ``"above"`` when the
    neuron fires more on the repeat than on the first occurrence (its activations above the mean are
    clipped down to it) and ``"below"`` otherwise (``strict_neurons_clipped_ablation_hook``, sign of
    ``weighted_diff``).

    Means are over sequences and the text positions ``1..n`` of the first occurrence, resp. ``n+1..2n``.
    The official code's mean also counts the BOS position; we leave it out, as everywhere in this study
    (the embedded model's final-layer activations at BOS are hundreds of times their typical size).
    """
    first, repeat = _halves(half_length)
    if clean.tokens.shape[1] != 2 * half_length + 1:
        raise ValueError(f"the clean run must be on [BOS] + 2 × {half_length} tokens (repeated_text), got {clean.tokens.shape[1]} positions.")
    values, sides = [], []
    for neuron in neurons:
        activation = clean.activation(int(neuron))
        mean_first = float(activation[:, first].mean())
        values.append(mean_first)
        sides.append("above" if float(activation[:, repeat].mean()) >= mean_first else "below")
    return values, sides


def per_position_effects(
    model: Any,
    clean: CleanRun,
    neuron: int,
    value: float,
    *,
    clip: ClipSide = "none",
) -> pd.DataFrame:
    """Per position (averaged over sequences): the neuron's activation, clean entropy and loss, the
    total and direct change in entropy and loss when it is set to ``value`` (clipped on one side with
    ``clip``, see :func:`mean_ablation_effects`), and the ratio ablated / clean entropy (total and
    direct; the mean over sequences of the per-token ratio, as the official code's Fig. 5b curve
    ``entropy_post_ablation/entropy``; ``entropy_ratio_total_min`` is the smallest over sequences).
    Uses every position that has a next token (including BOS's prediction), so positions line up
    across sequences. For several neurons use :func:`per_position_effects_of` (one pass for all)."""
    return per_position_effects_of(model, clean, [neuron], [value], clip=[clip])[0]


def per_position_effects_of(
    model: Any,
    clean: CleanRun,
    neurons: Sequence[int],
    values: Sequence[float],
    *,
    clip: Sequence[ClipSide] | None = None,
) -> list[pd.DataFrame]:
    """:func:`per_position_effects` of each neuron (one ``value`` and ``clip`` side per neuron), from one
    :func:`mean_ablation_effects` pass: the clean logits of every chunk are formed once for all neurons,
    which is most of the cost with a large vocabulary (Gemma-3's 262k tokens)."""
    neurons = [int(n) for n in neurons]
    if len(values) != len(neurons):
        raise ValueError(f"values must have one entry per neuron ({len(neurons)}), got {len(values)}.")
    valid_all = torch.ones_like(clean.valid)
    valid_all[:, -1] = False
    everything = CleanRun(**{**clean.__dict__, "valid": valid_all})
    effects = mean_ablation_effects(model, everything, neurons, values=[float(v) for v in values], clip=clip)
    n_seq, n_pos = clean.tokens.shape[0], clean.tokens.shape[1] - 1
    entropy = clean.entropy[:, :-1]

    def grid(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n_seq, n_pos)

    frames = []
    for i, neuron in enumerate(neurons):
        ratio_total = (entropy + grid(effects.entropy_total[i])) / entropy.clamp_min(1e-12)
        ratio_direct = (entropy + grid(effects.entropy_direct[i])) / entropy.clamp_min(1e-12)
        frames.append(pd.DataFrame(
            {
                "position": np.arange(n_pos),
                "activation": clean.activation(neuron)[:, :-1].mean(0).numpy(),
                "entropy": entropy.mean(0).numpy(),
                "loss": clean.loss[:, :-1].mean(0).numpy(),
                "entropy_change_total": grid(effects.entropy_total[i]).mean(0).numpy(),
                "entropy_change_direct": grid(effects.entropy_direct[i]).mean(0).numpy(),
                "loss_change_total": grid(effects.loss_total[i]).mean(0).numpy(),
                "loss_change_direct": grid(effects.loss_direct[i]).mean(0).numpy(),
                "entropy_ratio_total": ratio_total.mean(0).numpy(),
                "entropy_ratio_direct": ratio_direct.mean(0).numpy(),
                "entropy_ratio_total_min": ratio_total.min(0).values.numpy(),
            }
        ))
    return frames


def induction_summary(frame: pd.DataFrame, half_length: int) -> pd.DataFrame:
    """Means of :func:`per_position_effects` over the first half (positions predicting tokens
    ``2..half_length`` of the first occurrence — not predictable by copying) and the repeated half
    (positions ``half_length+1 ..``, predicting the copy — predictable by induction). With BOS at
    position 0, position ``p`` predicts token ``p+1``."""
    first = frame[(frame.position >= 1) & (frame.position < half_length)]
    repeated = frame[frame.position >= half_length + 1]
    summary = pd.DataFrame({"first half": first.mean(numeric_only=True), "repeated half": repeated.mean(numeric_only=True)}).drop("position")
    summary["ratio repeated/first"] = summary["repeated half"] / summary["first half"]
    return summary


def relative_entropy_change(frame: pd.DataFrame, half_length: int, column: str = "entropy_change_total") -> float:
    """Mean ``column`` over the repeated half divided by its mean clean entropy (e.g. -0.3 = the
    ablation removes 30 % of the entropy there)."""
    repeated = frame[frame.position >= half_length + 1]
    return float(repeated[column].mean() / repeated["entropy"].mean())


def largest_entropy_reduction(frame: pd.DataFrame, half_length: int) -> dict[str, float]:
    """The paper's "up to 70 %" statistic and two companions, from :func:`per_position_effects` on the
    repeat (positions ``n+1 ..``):

    * ``"curve"``: ``1 − min over positions of the mean-over-sequences ratio ablated/clean entropy``
      — the lowest point of the official Fig. 5b curve (``entropy_post_ablation/entropy`` averaged per
      position over sequences), i.e. what "reduces entropy by up to 70 %" reads off;
    * ``"token"``: ``1 − the smallest per-token ratio`` over all sequences and positions of the repeat
      (a max over tokens, larger than the curve's);
    * ``"mean"``: ``1 − the mean ratio`` over the repeat's positions.
    """
    repeated = frame[frame.position >= half_length + 1]
    if repeated.empty:
        raise ValueError(f"the frame has no position >= half_length + 1 = {half_length + 1}: wrong half_length?")
    return {"curve": float(1 - repeated["entropy_ratio_total"].min()),
            "token": float(1 - repeated["entropy_ratio_total_min"].min()),
            "mean": float(1 - repeated["entropy_ratio_total"].mean())}


def pick_induction_neuron(
    model: Any,
    clean: CleanRun,
    candidates: Sequence[int],
    values: Sequence[float],
    half_length: int,
    *,
    clip: Sequence[ClipSide] | None = None,
) -> tuple[int, pd.DataFrame]:
    """The candidate whose (clipped) ablation lowers entropy on the repeated half the most (relative to
    the clean entropy there) — the role the paper's 11.2378 plays — and a table of all candidates."""
    sides = ["none"] * len(candidates) if clip is None else list(clip)
    rows = []
    frames = per_position_effects_of(model, clean, candidates, values, clip=sides)
    for neuron, side, frame in zip(candidates, sides, frames):
        summary = induction_summary(frame, half_length)
        rows.append({
            "neuron": neuron,
            "name": neuron_name(model.cfg.n_layers - 1, neuron),
            "clip": side,
            "activation first half": summary.loc["activation", "first half"],
            "activation repeated half": summary.loc["activation", "repeated half"],
            "entropy change (total), repeated half": summary.loc["entropy_change_total", "repeated half"],
            "entropy change (direct), repeated half": summary.loc["entropy_change_direct", "repeated half"],
            "relative entropy change, repeated half": relative_entropy_change(frame, half_length),
            "largest entropy reduction (Fig. 5b curve)": largest_entropy_reduction(frame, half_length)["curve"],
        })
    table = pd.DataFrame(rows)
    best = int(table.loc[table["relative entropy change, repeated half"].idxmin(), "neuron"])
    return best, table


# --------------------------------------------------------------------------------------------------
# Induction heads and their attention to BOS (the paper's Fig. 5c)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def induction_scores(model: Any, batch: TokenBatch, half_length: int) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Induction score of every (query) head on ``[BOS] r r`` (:func:`repeated_random_tokens`): the mean
    attention from each position ``q`` of the repeat (``n+1..2n``) to ``q − n + 1``, the token that
    followed the previous occurrence of ``q``'s token — what an induction head attends to (the
    official code ranks heads by this score on repeated random tokens, ``generate_induction_df``)."""
    if batch.tokens.shape[1] != 2 * half_length + 1:
        raise ValueError(f"batch must be [BOS] + 2 × {half_length} tokens (repeated_random_tokens), got {batch.tokens.shape[1]} positions.")
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=lambda n: n in names)
    queries = torch.arange(half_length + 1, 2 * half_length + 1)
    scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float().cpu()  # [batch, head, query, key]
        scores[layer] = pattern[:, :, queries, queries - half_length + 1].mean(dim=(0, 2))
    return scores


def top_heads(scores: Float[torch.Tensor, "n_layers n_heads"], k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest score, best first, as ``(layer, head)``."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"k must be in 1..{scores.numel()}, got {k}.")
    flat = scores.flatten().topk(k).indices.tolist()
    return [divmod(int(i), scores.shape[1]) for i in flat]


def random_heads(
    n_layers_heads: tuple[int, int],
    n: int,
    *,
    seed: int,
    layers: Sequence[int],
    exclude: Sequence[tuple[int, int]] = (),
) -> list[tuple[int, int]]:
    """``n`` distinct heads drawn uniformly (seeded) from ``layers``, skipping ``exclude`` — baselines for
    :func:`bos_ablation` (the official code's baselines are non-induction heads of the induction heads' layers)."""
    n_layers, n_heads = n_layers_heads
    excluded = {tuple(h) for h in exclude}
    pool = [(int(l), h) for l in sorted(set(layers)) for h in range(n_heads) if (int(l), h) not in excluded]
    if any(not 0 <= int(l) < n_layers for l in layers) or not 1 <= n <= len(pool):
        raise ValueError(f"cannot draw {n} heads from layers {list(layers)} ({len(pool)} left after excluding {len(excluded)}).")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(pool[i] for i in order.tolist())


@torch.no_grad()
def bos_ablation(
    model: Any,
    batch: TokenBatch,
    heads: Sequence[tuple[int, int]],
    neurons: Sequence[int],
    *,
    positions: Sequence[int] | None = None,
    copies_per_pass: int = 16,
) -> dict[str, torch.Tensor]:
    """BOS ablation of ``heads`` (the paper's Fig. 5c; official ``bos_ablate_attn_heads``): at one query
    position ``p`` the heads attend only to BOS (their pattern row ``p`` becomes one-hot on key 0), every
    other position runs clean, and the activations of the final-layer ``neurons`` and the entropy are read
    at ``p``. One forward pass per (sequence, position) in the official code; here each sequence runs as
    a batch of copies, copy ``i`` ablating position ``positions[i]`` and cut after the last position
    its chunk needs (causal attention: later tokens cannot change position ``p``).

    Returns ``"activation"`` ``[batch, n_positions, n_neurons]``, ``"entropy"`` ``[batch, n_positions]``
    (ablated) and the same for the clean run (``"clean_activation"``, ``"clean_entropy"``), plus
    ``"positions"``.
    """
    if not bool((batch.attention_mask == 1).all()):
        raise ValueError("bos_ablation needs unpadded sequences (attention_mask all ones).")
    n_pos = batch.tokens.shape[1]
    positions = list(range(1, n_pos)) if positions is None else [int(p) for p in positions]
    if not positions or any(not 1 <= p < n_pos for p in positions):
        raise ValueError(f"positions must be in 1..{n_pos - 1} (0 is BOS itself), got {positions}.")
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads or any(not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads) for l, h in heads):
        raise ValueError(f"heads must be (layer, head) pairs of this model ({model.cfg.n_layers} × {model.cfg.n_heads}), got {heads}.")
    neurons = [int(n) for n in neurons]
    final = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post"
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    index = torch.tensor(positions)
    store: dict[str, torch.Tensor] = {}

    def keep(post: torch.Tensor, hook: Any) -> torch.Tensor:
        store["post"] = post[..., neurons].detach().float().cpu()
        return post

    logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=lambda n: n == final)
    clean_activation = cache[final][:, index][..., neurons].float().cpu()
    clean_entropy = token_entropy(logits[:, index]).cpu()
    del cache, logits
    activation = torch.zeros(len(batch), len(positions), len(neurons))
    entropy = torch.zeros(len(batch), len(positions))
    chunks = [list(range(i, min(i + copies_per_pass, len(positions)))) for i in range(0, len(positions), copies_per_pass)]
    for seq in tqdm(range(len(batch)), desc="BOS ablation", leave=False):
        for chunk in chunks:
            chunk_positions = index[chunk]
            length = int(chunk_positions.max()) + 1
            tokens = batch.tokens[seq : seq + 1, :length].repeat(len(chunk), 1)
            rows = torch.arange(len(chunk))

            def to_bos(pattern: torch.Tensor, hook: Any, layer_heads: list[int] = []) -> torch.Tensor:
                pattern = pattern.clone()
                for head in layer_heads:  # [batch, head, query, key]: row p of copy i -> one-hot on BOS
                    pattern[rows, head, chunk_positions] = 0.0
                    pattern[rows, head, chunk_positions, 0] = 1.0
                return pattern

            hooks = [(f"blocks.{layer}.attn.hook_pattern", partial(to_bos, layer_heads=layer_heads))
                     for layer, layer_heads in by_layer.items()]
            out = model.run_with_hooks(tokens, fwd_hooks=hooks + [(final, keep)])
            activation[seq, chunk] = store["post"][rows, chunk_positions]
            entropy[seq, chunk] = token_entropy(out[rows, chunk_positions][:, None])[:, 0].cpu()
    return {"positions": index, "activation": activation, "entropy": entropy,
            "clean_activation": clean_activation, "clean_entropy": clean_entropy}


def bos_ablation_summary(results: dict[str, dict[str, torch.Tensor]], neuron_index: int = 0) -> pd.DataFrame:
    """One row per ablated head set (label → :func:`bos_ablation` output): the mean activation of neuron
    ``neuron_index`` (of the ones passed) over the ablated positions, clean and ablated, its change, and
    the mean entropy change."""
    rows = []
    for label, result in results.items():
        clean = float(result["clean_activation"][..., neuron_index].mean())
        ablated = float(result["activation"][..., neuron_index].mean())
        rows.append({"heads": label, "activation clean": clean, "activation ablated": ablated,
                     "activation change": ablated - clean,
                     "entropy change": float((result["entropy"] - result["clean_entropy"]).mean())})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def spectrum_figure(spectrum: UnembeddingSpectrum, null_space_dim: int, *, title: str = "") -> Any:
    """Singular values of the effective unembedding (log scale), the bottom ``k`` marked."""
    import plotly.graph_objects as go

    values = spectrum.singular_values.numpy()
    index = np.arange(len(values))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=index, y=values, mode="lines", name="singular value"))
    fig.add_trace(go.Scatter(x=index[-null_space_dim:], y=values[-null_space_dim:], mode="markers",
                             marker=dict(color="#EF553B", size=7), name=f"effective null space (bottom {null_space_dim})"))
    fig.update_layout(title=title or "Singular values of the effective unembedding diag(γ) W_U (vocab-centred)",
                      xaxis_title="index (descending)", yaxis_title="singular value", yaxis_type="log", template="plotly_white")
    return fig


def geometry_figure(geometry: NeuronGeometry, highlight: dict[str, Sequence[int]], *, title: str = "") -> Any:
    """The paper's Figure 2: ‖w_out‖ against LogitVar (log scale) for every final-layer neuron, coloured
    by ρ; the neurons in ``highlight`` (label → neurons) drawn on top and named."""
    import plotly.graph_objects as go

    frame = geometry.to_frame()
    fig = go.Figure(go.Scatter(
        x=frame["norm"], y=frame["logit_var"], mode="markers", name="all neurons", text=frame["name"],
        marker=dict(size=5, color=frame["rho"], colorscale="Viridis", showscale=True, colorbar=dict(title="ρ"), opacity=0.7),
        hovertemplate="%{text}<br>‖w_out‖=%{x:.2f}<br>LogitVar=%{y:.2e}<extra></extra>"))
    palette = ["#EF553B", "#FFA15A", "#00CC96", "#AB63FA"]
    for (label, members), colour in zip(highlight.items(), palette):
        sub = frame.loc[list(members)]
        fig.add_trace(go.Scatter(x=sub["norm"], y=sub["logit_var"], mode="markers+text", name=label, text=sub["name"],
                                 textposition="top center", textfont=dict(color=colour, size=10),
                                 marker=dict(size=10, color=colour, symbol="diamond", line=dict(width=1, color="black"))))
    fig.update_layout(title=title or "Final-layer neurons: output norm vs. LogitVar (colour: null-space fraction ρ)",
                      xaxis_title="‖w_out‖", yaxis_title="LogitVar(w_out)", yaxis_type="log", template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def effects_figure(summary: pd.DataFrame, metric: str = "entropy", *, title: str = "") -> Any:
    """Per neuron: mean |total| and mean |direct| effect of mean ablation on ``metric`` (bars, left axis
    label) and the norm-mediated share (right panel), neurons grouped as in ``summary["group"]``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [f"{g}: {n}" for g, n in zip(summary.get("group", [""] * len(summary)), summary["name"])]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=(f"mean |Δ{metric}| per token", "norm-mediated share"))
    fig.add_trace(go.Bar(x=names, y=summary[f"{metric}_abs_total"], name="total (norm re-run)", marker_color="#636EFA"), 1, 1)
    fig.add_trace(go.Bar(x=names, y=summary[f"{metric}_abs_direct"], name="direct (norm scale frozen)", marker_color="#FFA15A"), 1, 1)
    fig.add_trace(go.Bar(x=names, y=summary[f"{metric}_norm_share"], name="share through the final norm", marker_color="#EF553B"), 1, 2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_layout(title=title or f"Mean ablation of final-layer neurons: effect on {metric}", barmode="group",
                      template="plotly_white", legend=dict(orientation="h", y=-0.45), height=520)
    return fig


def induction_figure(frame: pd.DataFrame, half_length: int, name: str, *, title: str = "") -> Any:
    """The paper's Fig. 5a/b on ``[BOS] t t``, per position (means over sequences): the neuron's
    activation; the clean entropy and loss; and the ratio ablated / clean entropy with the neuron
    (clipped-)mean-ablated, total and direct (final-norm scale frozen). The repeat starts at the dashed line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        subplot_titles=(f"activation of {name}", "clean entropy and loss (nats)",
                                        "entropy after ablation / clean entropy"))
    fig.add_trace(go.Scatter(x=frame["position"], y=frame["activation"], mode="lines", name=f"{name} activation"), 1, 1)
    fig.add_trace(go.Scatter(x=frame["position"], y=frame["entropy"], mode="lines", name="entropy"), 2, 1)
    fig.add_trace(go.Scatter(x=frame["position"], y=frame["loss"], mode="lines", name="loss"), 2, 1)
    fig.add_trace(go.Scatter(x=frame["position"], y=frame["entropy_ratio_total"], mode="lines",
                             name=f"{name} ablated (total)"), 3, 1)
    fig.add_trace(go.Scatter(x=frame["position"], y=frame["entropy_ratio_direct"], mode="lines", line=dict(dash="dot"),
                             name=f"{name} ablated (direct: norm scale frozen)"), 3, 1)
    for row in (1, 2, 3):
        fig.add_vline(x=half_length + 0.5, line_dash="dash", line_color="grey", row=row, col=1)
    fig.add_hline(y=1.0, line_color="lightgrey", row=3, col=1)
    fig.update_layout(title=title or f"Induction on repeated text: {name}", template="plotly_white",
                      xaxis3_title="position", height=750, legend=dict(orientation="h", y=-0.12))
    return fig


def bos_ablation_figure(results: dict[str, dict[str, torch.Tensor]], name: str, *, half_length: int | None = None,
                        neuron_index: int = 0, title: str = "") -> Any:
    """The paper's Fig. 5c: per position, the neuron's mean activation (over sequences) clean and with each
    head set BOS-ablated (label → :func:`bos_ablation` output)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    first = next(iter(results.values()))
    x = first["positions"].numpy()
    fig.add_trace(go.Scatter(x=x, y=first["clean_activation"][..., neuron_index].mean(0).numpy(), mode="lines",
                             name="clean", line=dict(color="black")))
    for label, result in results.items():
        fig.add_trace(go.Scatter(x=result["positions"].numpy(), y=result["activation"][..., neuron_index].mean(0).numpy(),
                                 mode="lines", name=f"BOS-ablated: {label}"))
    if half_length is not None:
        fig.add_vline(x=half_length + 0.5, line_dash="dash", line_color="grey")
    fig.update_layout(title=title or f"{name} activation with induction heads' attention sent to BOS",
                      xaxis_title="position", yaxis_title=f"{name} activation", template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig


# --------------------------------------------------------------------------------------------------
# Small conveniences for the notebook
# --------------------------------------------------------------------------------------------------


def rank_of(neuron: int, ranking: Sequence[int]) -> int | None:
    """1-based rank of ``neuron`` in ``ranking`` (``None`` if absent)."""
    ranking = list(ranking)
    return ranking.index(neuron) + 1 if neuron in ranking else None


def parse_neuron_name(name: str) -> tuple[int, int]:
    """``"11.584"`` → ``(11, 584)``."""
    try:
        layer, neuron = name.split(".")
        return int(layer), int(neuron)
    except ValueError:
        raise ValueError(f"neuron names look like '11.584' (layer.neuron), got {name!r}.") from None

