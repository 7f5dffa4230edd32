"""Fourier analysis of the grokking model and the paper's progress measures.

Nanda et al. (2023) show that the trained model computes ``a + b mod p`` with a few *key
frequencies* ``w_k = 2πk/p``: it embeds ``a`` and ``b`` as ``cos/sin(w_k a)``, multiplies them in
the attention and MLP into ``cos/sin(w_k (a + b))``, and reads off
``logit(c) ≈ Σ_k α_k cos(w_k (a + b − c))``. Everything here works in the Fourier basis of
functions on ``{0, …, p−1}``:

* :func:`fourier_basis` – the orthonormal basis ``1, cos(w_1 x), sin(w_1 x), …`` (``p`` vectors).
* :func:`fourier_component_norms` / :func:`frequency_norms` – how much of a weight matrix
  (e.g. ``W_E``) lives in each component / frequency.
* :func:`neuron_frequency_fractions` and :func:`cluster_neurons` – for every neuron, the fraction
  of the variance of its activation over all ``p²`` inputs explained by each frequency (its
  constant, linear and quadratic 2-D Fourier terms); :func:`find_key_frequencies` keeps the
  frequencies that dominate enough neurons. Nothing is typed in.
* :func:`restricted_logits` / :func:`excluded_logits` – keep only / remove the key-frequency
  ``cos(w_k(a+b))``, ``sin(w_k(a+b))`` terms of the logits (as functions of the input pair).
* :func:`progress_measures` – the paper's measures at every snapshot, vectorised over snapshots and
  models: train/test loss and accuracy, restricted loss (all inputs, with the paper's bias
  correction), excluded loss (training inputs), Gini coefficients of the Fourier-component norms of
  ``W_E`` and ``W_L = W_out W_U``, and the sum of squared weights.
* :func:`locate_phases` – memorisation / circuit formation / cleanup boundaries from the train and
  test loss curves, by a rule stated in its docstring.
* :func:`ablate_embedding_frequencies`, :func:`neuron_ablation_logits`, :func:`loss_and_accuracy` –
  causal checks on the final model (the paper's §4.4 ablations); :func:`cos_terms_logits` – the
  §4.2 approximation ``Σ_k α_k cos(w_k(a+b−c))`` of the logits.
* :func:`phase_changes` – a progress measure at the phase boundaries and its rate of change per phase.
* :func:`train_and_measure` / :func:`measure_run` / :func:`load_committed_result` – the whole
  pipeline, returning a :class:`GrokkingResult` (what the notebook uses in every profile).

Choices follow the paper's code (``progress-measures-paper/transformers.py``): the restricted loss
is evaluated on all ``p²`` inputs, the excluded loss on the training inputs, both on the ``p``
number logits, with the key frequencies of the *final* model at every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float

from helpers.studies.grokking.training import (
    GrokkingTransformer,
    ModularAdditionData,
    TrainingRun,
    accuracy,
    cross_entropy_float64,
    forward,
)


# --------------------------------------------------------------------------------------------------
# The basis
# --------------------------------------------------------------------------------------------------


def fourier_basis(p: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                  ) -> tuple[Float[torch.Tensor, "p p"], list[str]]:
    """Orthonormal Fourier basis of functions on ``{0, …, p−1}`` (``p`` odd), one vector per row.

    Rows: ``const``, ``cos 1``, ``sin 1``, …, ``cos (p−1)/2``, ``sin (p−1)/2``, so frequency ``k``
    has rows ``2k − 1`` (cos) and ``2k`` (sin). Returns ``(basis, names)``.
    """
    if p < 3 or p % 2 == 0:
        raise ValueError(f"fourier_basis(p=...) expects an odd p >= 3 (e.g. the prime 113), got {p}.")
    x = torch.arange(p, dtype=torch.float64)
    rows, names = [torch.ones(p, dtype=torch.float64)], ["const"]
    for k in range(1, p // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
        names += [f"cos {k}", f"sin {k}"]
    basis = torch.stack(rows)
    basis = basis / basis.norm(dim=1, keepdim=True)
    return basis.to(device=device, dtype=dtype), names


def n_frequencies(p: int) -> int:
    """Number of non-zero frequencies, ``(p − 1) / 2`` (56 for p = 113)."""
    return p // 2


def fourier_component_norms(weights: Float[torch.Tensor, "... p d"], basis: torch.Tensor) -> Float[torch.Tensor, "... p"]:
    """Norm of each Fourier component of ``weights`` along its ``p`` axis (e.g. ``W_E[:p]``)."""
    return torch.einsum("fx,...xd->...fd", basis.to(weights.dtype), weights).norm(dim=-1)


def frequency_norms(component_norms: Float[torch.Tensor, "... p"]) -> Float[torch.Tensor, "... n_freq"]:
    """Combine cos and sin components: ``sqrt(‖cos k‖² + ‖sin k‖²)`` for ``k = 1 … (p−1)/2``."""
    squared = component_norms[..., 1:].pow(2)
    return (squared[..., 0::2] + squared[..., 1::2]).sqrt()


def gini(values: Float[torch.Tensor, "... n"]) -> Float[torch.Tensor, "..."]:
    """Gini coefficient of non-negative ``values`` along the last axis (0: uniform, → 1: sparse)."""
    sorted_values = values.double().sort(dim=-1).values
    n = sorted_values.shape[-1]
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    total = sorted_values.sum(dim=-1).clamp_min(1e-300)
    return 2 * (ranks * sorted_values).sum(dim=-1) / (n * total) - (n + 1) / n


# --------------------------------------------------------------------------------------------------
# Neurons and key frequencies
# --------------------------------------------------------------------------------------------------


def frequency_masks_2d(p: int, device: str | torch.device = "cpu") -> Float[torch.Tensor, "n_freq p p"]:
    """For each frequency ``k``, the 2-D Fourier components ``(i, j)`` that belong to it.

    Those are the linear terms ``(const, cos/sin k)``, ``(cos/sin k, const)`` and the four
    quadratic terms ``(cos/sin k, cos/sin k)``: 8 components per frequency.
    """
    masks = torch.zeros(n_frequencies(p), p, p, device=device)
    for k in range(1, n_frequencies(p) + 1):
        index = torch.tensor([0, 2 * k - 1, 2 * k], device=device)
        masks[k - 1][index[:, None], index[None, :]] = 1.0
        masks[k - 1, 0, 0] = 0.0
    return masks


def neuron_frequency_fractions(
    activations: Float[torch.Tensor, "p_sq n"], p: int
) -> Float[torch.Tensor, "n_freq n"]:
    """Fraction of each unit's variance over the ``p²`` inputs explained by each frequency.

    ``activations[a * p + b]`` is the unit's value on input ``(a, b)``. The activations are centred
    over inputs, transformed with the 2-D Fourier basis over ``(a, b)``, and the power in the
    components of :func:`frequency_masks_2d` is divided by the total power.
    """
    if activations.shape[0] != p * p:
        raise ValueError(f"neuron_frequency_fractions expects p² = {p * p} rows (one per input), "
                         f"got {activations.shape[0]}.")
    basis, _ = fourier_basis(p, activations.device, torch.float64)
    grid = activations.double().reshape(p, p, -1)
    grid = grid - grid.mean(dim=(0, 1), keepdim=True)
    power = torch.einsum("ia,jb,abn->ijn", basis, basis, grid).pow(2)
    total = power.sum(dim=(0, 1)).clamp_min(1e-30)
    masks = frequency_masks_2d(p, activations.device).double()
    return (torch.einsum("kij,ijn->kn", masks, power) / total).float()


@dataclass
class NeuronClusters:
    """Each neuron's dominant frequency and the fraction of its variance that frequency explains.

    Attributes:
        frequency: ``[n]`` dominant frequency (1 … (p−1)/2) of each neuron.
        fraction: ``[n]`` fraction of the neuron's variance explained by that frequency.
        threshold: a neuron is *explained* by its frequency when ``fraction >= threshold``.
    """

    frequency: np.ndarray
    fraction: np.ndarray
    threshold: float

    @property
    def explained(self) -> np.ndarray:
        return self.fraction >= self.threshold

    def counts(self, frequencies: Sequence[int]) -> dict[int | str, int]:
        """Explained neurons per frequency in ``frequencies``, plus ``"unexplained"`` (all others)."""
        out: dict[int | str, int] = {int(k): int(((self.frequency == k) & self.explained).sum()) for k in frequencies}
        out["unexplained"] = int(len(self.frequency) - sum(out.values()))
        return out


def cluster_neurons(activations: Float[torch.Tensor, "p_sq n"], p: int, threshold: float = 0.85) -> NeuronClusters:
    """Assign every neuron to the frequency that explains most of its variance (see
    :func:`neuron_frequency_fractions`). ``threshold`` only decides which neurons count as explained."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"cluster_neurons(threshold=...) must be in (0, 1], got {threshold}.")
    fractions = neuron_frequency_fractions(activations, p)
    best_fraction, best = fractions.max(dim=0)
    return NeuronClusters((best + 1).cpu().numpy(), best_fraction.cpu().numpy(), threshold)


def find_key_frequencies(clusters: NeuronClusters, min_share: float = 0.02) -> list[int]:
    """The key frequencies: those that explain at least ``min_share`` of all neurons.

    A frequency counts a neuron when it is the neuron's dominant frequency with a fraction of
    variance at least ``clusters.threshold``. With 512 neurons, ``min_share=0.02`` asks for 11
    neurons; the paper's key frequencies have 44–145 each, noise frequencies a handful at most.
    """
    if not 0.0 < min_share < 1.0:
        raise ValueError(f"find_key_frequencies(min_share=...) must be in (0, 1), got {min_share}.")
    n_neurons = len(clusters.frequency)
    explained = clusters.frequency[clusters.explained]
    values, counts = np.unique(explained, return_counts=True)
    return sorted(int(k) for k, c in zip(values, counts) if c >= min_share * n_neurons)


def mlp_activations(model: GrokkingTransformer, data: ModularAdditionData, index: int = 0) -> torch.Tensor:
    """``[p², d_mlp]`` post-ReLU neuron activations of model ``index`` at the last position."""
    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        forward({k: v[index:index + 1] for k, v in model.params.items()}, data.tokens, cache=cache)
    return cache["mlp_post"][0]


def key_frequencies_of(model: GrokkingTransformer, data: ModularAdditionData, index: int = 0,
                       threshold: float = 0.85, min_share: float = 0.02) -> tuple[list[int], NeuronClusters]:
    """Cluster model ``index``'s neurons and return ``(key_frequencies, clusters)``."""
    clusters = cluster_neurons(mlp_activations(model, data, index), data.p, threshold)
    return find_key_frequencies(clusters, min_share), clusters


# --------------------------------------------------------------------------------------------------
# Logits in the Fourier basis
# --------------------------------------------------------------------------------------------------


def sum_directions(p: int, frequencies: Sequence[int], device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float64) -> Float[torch.Tensor, "two_k p_sq"]:
    """Unit vectors over the ``p²`` inputs: ``cos(w_k(a+b))`` and ``sin(w_k(a+b))`` for each ``k``.

    They are orthonormal (``p`` odd, ``0 < k < p/2``), so ``D.T @ (D @ x)`` projects onto their span.
    """
    for k in frequencies:
        if not 1 <= int(k) <= n_frequencies(p):
            raise ValueError(f"frequency {k} is not in 1 … {n_frequencies(p)} for p = {p}.")
    a = torch.arange(p, dtype=torch.float64)
    total = (a[:, None] + a[None, :]).flatten()
    rows = []
    for k in frequencies:
        angle = 2 * math.pi * int(k) * total / p
        rows += [torch.cos(angle), torch.sin(angle)]
    if not rows:
        return torch.zeros(0, p * p, dtype=dtype, device=device)
    directions = torch.stack(rows)
    return (directions / directions.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)


def _padded_directions(p: int, key_frequencies: Sequence[Sequence[int]], device: Any) -> torch.Tensor:
    width = 2 * max(1, max(len(k) for k in key_frequencies))
    out = torch.zeros(len(key_frequencies), width, p * p, dtype=torch.float64, device=device)
    for i, freqs in enumerate(key_frequencies):
        out[i, : 2 * len(freqs)] = sum_directions(p, freqs, device)
    return out


def restricted_logits(logits: Float[torch.Tensor, "... p_sq c"], directions: Float[torch.Tensor, "... two_k p_sq"]
                      ) -> torch.Tensor:
    """Keep only the logits' components along ``directions`` (plus the paper's bias correction:
    the per-output mean over inputs of what was removed is added back)."""
    logits = logits.double()
    kept = directions.transpose(-1, -2) @ (directions @ logits)
    return kept + (logits - kept).mean(dim=-2, keepdim=True)


def excluded_logits(logits: Float[torch.Tensor, "... p_sq c"], directions: Float[torch.Tensor, "... two_k p_sq"]
                    ) -> torch.Tensor:
    """Remove the logits' components along ``directions`` (the key-frequency ``cos/sin(w(a+b))``)."""
    logits = logits.double()
    return logits - directions.transpose(-1, -2) @ (directions @ logits)


def cos_difference_coefficients(logits: Float[torch.Tensor, "p_sq p"], p: int) -> Float[torch.Tensor, "n_freq"]:
    """Coefficient of the logits on the unit vector ``cos(w_k(a + b − c))`` (over all ``p³`` entries),
    for each frequency ``k``. The directions are orthogonal, so squared coefficients add up to
    the variance they explain."""
    x = torch.arange(p, dtype=torch.float64, device=logits.device)
    phase = (x[:, None, None] + x[None, :, None] - x[None, None, :]).reshape(p * p, p)
    coefficients = []
    values = logits.double()
    for k in range(1, n_frequencies(p) + 1):
        direction = torch.cos(2 * math.pi * k * phase / p)
        coefficients.append((direction * values).sum() / direction.norm())
    return torch.stack(coefficients)


def cos_terms_variance_explained(logits: Float[torch.Tensor, "p_sq p"], p: int, frequencies: Sequence[int]) -> float:
    """Fraction of the variance of the logits (over inputs and outputs) explained by the
    ``cos(w_k(a + b − c))`` terms of ``frequencies`` (the paper's logit approximation)."""
    coefficients = cos_difference_coefficients(logits, p)
    centred = logits.double() - logits.double().mean()
    chosen = torch.tensor([int(k) - 1 for k in frequencies], dtype=torch.long)
    return float(coefficients[chosen].pow(2).sum() / centred.pow(2).sum())


def cos_terms_logits(logits: Float[torch.Tensor, "p_sq p"], p: int, frequencies: Sequence[int]
                     ) -> Float[torch.Tensor, "p_sq p"]:
    """The paper's logit approximation ``Σ_k α_k cos(w_k(a + b − c))`` over ``frequencies`` (§4.2),
    with ``α_k`` fitted by least squares on all ``p² × p`` entries.

    The ``cos(w_k(a + b − c))`` vectors are orthogonal to each other and to the constant, so the
    least-squares coefficients (with or without an intercept) are the projections of
    :func:`cos_difference_coefficients`; the returned logits are that fit (no constant: a constant
    does not change the softmax)."""
    for k in frequencies:
        if not 1 <= int(k) <= n_frequencies(p):
            raise ValueError(f"frequency {k} is not in 1 … {n_frequencies(p)} for p = {p}.")
    if logits.shape != (p * p, p):
        raise ValueError(f"cos_terms_logits expects logits of shape [p², p] = [{p * p}, {p}] (all inputs, the p "
                         f"number outputs), got {tuple(logits.shape)}.")
    coefficients = cos_difference_coefficients(logits, p)
    x = torch.arange(p, dtype=torch.float64, device=logits.device)
    phase = (x[:, None, None] + x[None, :, None] - x[None, None, :]).reshape(p * p, p)
    out = torch.zeros(p * p, p, dtype=torch.float64, device=logits.device)
    for k in frequencies:
        direction = torch.cos(2 * math.pi * int(k) * phase / p)
        out += coefficients[int(k) - 1] * direction / direction.norm()
    return out


# --------------------------------------------------------------------------------------------------
# Progress measures over training
# --------------------------------------------------------------------------------------------------


def progress_measures(
    run: TrainingRun,
    key_frequencies: Sequence[Sequence[int]],
    *,
    chunk_models: int = 8,
    progress: bool = True,
    without_key_frequencies: str = "raise",
) -> dict[str, np.ndarray]:
    """The paper's progress measures at every snapshot of ``run``, for every model.

    Args:
        run: from :func:`helpers.studies.grokking.training.train` with snapshots.
        key_frequencies: one list per model (the final model's key frequencies, as in the paper).
        chunk_models: how many (snapshot, model) pairs go through one batched forward pass.
        without_key_frequencies: what to do for a model whose list is empty (no key frequency was
            found, e.g. a run stopped before the circuit forms): ``"raise"`` (default) a
            ``ValueError``; ``"nan"`` report its restricted and excluded losses as NaN (they are
            defined by the key frequencies) and every other measure as usual. Never measured
            against a frequency that was not found.

    Returns a dict of ``[n_checkpoints, n_models]`` arrays (plus ``epoch`` ``[n_checkpoints]``):
    ``train_loss``, ``test_loss``, ``train_accuracy``, ``test_accuracy`` (all ``d_vocab_out``
    logits, as trained), ``restricted_loss`` (all inputs, first ``p`` logits, keeping only the key
    ``cos/sin(w_k(a+b))`` terms with bias correction), ``excluded_loss`` (training inputs, those
    terms removed), ``gini_W_E``, ``gini_W_L`` (Gini of the ``p`` Fourier-component norms of
    ``W_E[:p]`` over tokens and of ``W_L = W_out W_U[:, :p]`` over outputs) and
    ``sum_squared_weights``.
    """
    if run.snapshots is None:
        raise ValueError("progress_measures needs a run trained with keep_snapshots=True.")
    n_checkpoints, n_models = run.snapshots["W_E"].shape[:2]
    if len(key_frequencies) != n_models:
        raise ValueError(f"progress_measures got {len(key_frequencies)} key-frequency lists for {n_models} models.")
    if without_key_frequencies not in ("raise", "nan"):
        raise ValueError(f"without_key_frequencies must be 'raise' or 'nan', got {without_key_frequencies!r}.")
    missing = [i for i, freqs in enumerate(key_frequencies) if len(freqs) == 0]
    if missing and without_key_frequencies == "raise":
        raise ValueError(
            f"progress_measures: model(s) {missing} (seed(s) {[run.seeds[i] for i in missing]}) have no key frequency, "
            "so the restricted and excluded losses are undefined for them. Train longer (the circuit forms before "
            "the test loss collapses), lower the key-frequency thresholds, or pass without_key_frequencies='nan'.")
    p = run.config.p
    device = run.snapshots["W_E"].device
    all_tokens = run.data[0].tokens.to(device)
    labels = run.data[0].labels.to(device)
    is_train = torch.stack([d.is_train for d in run.data]).to(device)                      # [model, p²]
    directions = _padded_directions(p, key_frequencies, device)                              # [model, 2K, p²]
    basis, _ = fourier_basis(p, device)

    flat = {name: value.flatten(0, 1) for name, value in run.snapshots.items()}               # [(ckpt model), ...]
    n_total = n_checkpoints * n_models
    names = ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "restricted_loss", "excluded_loss",
             "gini_W_E", "gini_W_L", "sum_squared_weights")
    out = {name: torch.empty(n_total, dtype=torch.float64) for name in names}
    from tqdm.auto import tqdm

    with torch.no_grad():
        for start in tqdm(range(0, n_total, chunk_models), desc="progress measures", disable=not progress):
            part = slice(start, min(start + chunk_models, n_total))
            params = {name: value[part] for name, value in flat.items()}
            model_ids = torch.arange(part.start, part.stop, device=device) % n_models
            logits = forward(params, all_tokens)                                             # [n, p², vocab_out]
            logprobs = logits.double().log_softmax(dim=-1)
            per_input = -logprobs.gather(-1, labels.expand(logits.shape[0], -1)[..., None]).squeeze(-1)
            correct = (logits.argmax(dim=-1) == labels).double()
            train_mask = is_train[model_ids].double()
            test_mask = 1.0 - train_mask
            out["train_loss"][part] = ((per_input * train_mask).sum(-1) / train_mask.sum(-1)).cpu()
            out["test_loss"][part] = ((per_input * test_mask).sum(-1) / test_mask.sum(-1)).cpu()
            out["train_accuracy"][part] = ((correct * train_mask).sum(-1) / train_mask.sum(-1)).cpu()
            out["test_accuracy"][part] = ((correct * test_mask).sum(-1) / test_mask.sum(-1)).cpu()

            number_logits = logits[..., :p]
            dirs = directions[model_ids]
            out["restricted_loss"][part] = cross_entropy_float64(restricted_logits(number_logits, dirs), labels).cpu()
            excluded = excluded_logits(number_logits, dirs).log_softmax(dim=-1)
            excluded_per_input = -excluded.gather(-1, labels.expand(logits.shape[0], -1)[..., None]).squeeze(-1)
            out["excluded_loss"][part] = ((excluded_per_input * train_mask).sum(-1) / train_mask.sum(-1)).cpu()

            out["gini_W_E"][part] = gini(fourier_component_norms(params["W_E"][:, :p], basis)).cpu()
            W_L = (params["W_out"] @ params["W_U"])[..., :p]                                   # [n, d_mlp, p]
            out["gini_W_L"][part] = gini(fourier_component_norms(W_L.transpose(-1, -2), basis)).cpu()
            out["sum_squared_weights"][part] = sum(v.double().pow(2).flatten(1).sum(-1) for v in params.values()).cpu()

    history = {name: value.view(n_checkpoints, n_models).numpy() for name, value in out.items()}
    for name in ("restricted_loss", "excluded_loss"):
        history[name][:, missing] = np.nan
    history["epoch"] = np.asarray(run.checkpoint_epochs)
    return history


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


@dataclass
class Phases:
    """Epoch boundaries of the three phases (see :func:`locate_phases` for the rule)."""

    memorisation_end: int
    cleanup_start: int
    cleanup_end: int
    grokking_epoch: int | None

    def as_dict(self) -> dict[str, int | None]:
        return {"memorisation_end": self.memorisation_end, "cleanup_start": self.cleanup_start,
                "cleanup_end": self.cleanup_end, "grokking_epoch": self.grokking_epoch}


def first_epoch(epochs: np.ndarray, condition: np.ndarray, after: int = 0) -> int | None:
    """First epoch ``>= after`` where ``condition`` holds (``None`` if never)."""
    hits = np.nonzero(condition & (epochs >= after))[0]
    return int(epochs[hits[0]]) if len(hits) else None


def locate_phases(
    epochs: np.ndarray,
    train_loss: np.ndarray,
    test_loss: np.ndarray,
    test_accuracy: np.ndarray | None = None,
    *,
    drop_fraction: float = 0.1,
) -> Phases:
    """Locate memorisation, circuit formation and cleanup from the loss curves.

    The rule (on checkpoints, i.e. every ``checkpoint_every`` epochs), the same for both drops —
    a drop is measured on a log scale, from a curve's start (or peak) to its end value:

    * **cleanup** is the collapse of the test loss. Let ``high`` be the log test loss at its maximum
      and ``low`` its final value. Cleanup starts at the first epoch after the maximum where the log
      test loss has fallen ``drop_fraction`` (10%) of the way from ``high`` to ``low``, and ends at
      the first epoch where it has fallen ``1 − drop_fraction`` (90%) of the way.
    * **memorisation** ends when the training loss has made ``1 − drop_fraction`` (90%) of its log
      drop from its initial value to its lowest value before cleanup.
    * **circuit formation** lies in between; the excluded and restricted losses are *not* used here,
      so what they do in each phase can be checked against the paper independently.
    * the **grokking epoch** is the first epoch with test accuracy ≥ 99% (if accuracies are given).
    """
    epochs = np.asarray(epochs)
    log_train = np.log10(np.asarray(train_loss, dtype=np.float64))
    log_test = np.log10(np.asarray(test_loss, dtype=np.float64))
    if not len(epochs) == len(log_train) == len(log_test):
        raise ValueError("locate_phases: epochs, train_loss and test_loss must have the same length.")
    if not 0.0 < drop_fraction < 0.5:
        raise ValueError(f"locate_phases(drop_fraction=...) must be in (0, 0.5), got {drop_fraction}.")
    peak = int(np.argmax(log_test))
    high, low = log_test[peak], log_test[-1]
    if high - low < 1.0:
        raise ValueError(
            f"The test loss never collapsed (max {10 ** high:.3g}, final {10 ** low:.3g}): the model did not "
            "grok in this run, so there are no phases to locate. Train longer (the paper uses 40,000 epochs).")
    start = first_epoch(epochs, log_test <= high - drop_fraction * (high - low), after=int(epochs[peak]))
    end = first_epoch(epochs, log_test <= low + drop_fraction * (high - low), after=start)
    before = epochs < start
    train_start, train_low = log_train[0], log_train[before].min()
    memorisation_end = first_epoch(epochs, before & (log_train <= train_low + drop_fraction * (train_start - train_low)))
    grokked = None
    if test_accuracy is not None:
        grokked = first_epoch(epochs, np.asarray(test_accuracy) >= 0.99)
    return Phases(int(memorisation_end), int(start), int(end), grokked)


PHASE_NAMES = ("memorisation", "circuit formation", "cleanup")


def seed_summary(history: Mapping[str, np.ndarray], seeds: Sequence[int],
                 key_frequencies: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """One row per seed of a multi-seed run: key frequencies, phase boundaries, final test metrics.

    ``history`` holds ``[n_checkpoints, n_seeds]`` arrays (as :func:`progress_measures` returns for
    several seeds). The phases come from :func:`locate_phases` on each seed's own curves; a seed whose
    test loss never collapsed gets ``None`` boundaries and ``grokked=False`` (its row says so instead
    of the seed being dropped).
    """
    epochs = np.asarray(history["epoch"])
    n = len(seeds)
    for name in ("train_loss", "test_loss", "test_accuracy"):
        shape = np.shape(history[name])
        if shape != (len(epochs), n):
            raise ValueError(f"seed_summary: history[{name!r}] has shape {shape}; expected [n_checkpoints, n_seeds] = "
                             f"[{len(epochs)}, {n}] (pass the history of a run trained with all of these seeds).")
    if len(key_frequencies) != n:
        raise ValueError(f"seed_summary got {len(key_frequencies)} key-frequency lists for {n} seeds.")
    rows = []
    for i, seed in enumerate(seeds):
        try:
            phases: Phases | None = locate_phases(epochs, history["train_loss"][:, i], history["test_loss"][:, i],
                                                  history["test_accuracy"][:, i])
        except ValueError:  # the test loss never collapsed: no phases to locate
            phases = None
        bounds = phases.as_dict() if phases is not None else dict.fromkeys(Phases.__dataclass_fields__)
        rows.append({"seed": int(seed), "key_frequencies": [int(k) for k in key_frequencies[i]],
                     "grokked": phases is not None, **bounds,
                     "final_test_accuracy": float(history["test_accuracy"][-1, i]),
                     "final_test_loss": float(history["test_loss"][-1, i])})
    return rows


def phase_changes(epochs: np.ndarray, values: np.ndarray, phases: Phases) -> dict[str, Any]:
    """A progress measure at the phase boundaries and its change within each phase.

    Returns ``at``: the value at epoch 0 and at the end of memorisation, start and end of cleanup
    (the checkpoint at or after each epoch); ``change``: the change within memorisation,
    circuit formation and cleanup (:data:`PHASE_NAMES`); ``rate``: that change per 1,000 epochs,
    so that phases of different lengths can be compared ("rises sharply during cleanup").
    """
    epochs = np.asarray(epochs)
    values = np.asarray(values, dtype=np.float64)
    if epochs.ndim != 1 or values.shape != epochs.shape:
        raise ValueError(f"phase_changes expects one value per checkpoint epoch: epochs {epochs.shape}, "
                         f"values {values.shape}.")
    bounds = [0, phases.memorisation_end, phases.cleanup_start, phases.cleanup_end]
    if not all(a < b for a, b in zip(bounds, bounds[1:])) or bounds[-1] > epochs[-1] or epochs[0] > 0:
        raise ValueError(f"phase_changes: the phase boundaries {bounds} must increase and lie within the "
                         f"checkpoints (epochs {epochs[0]} … {epochs[-1]}).")
    at = [float(values[np.searchsorted(epochs, e)]) for e in bounds]
    change = {name: at[i + 1] - at[i] for i, name in enumerate(PHASE_NAMES)}
    rate = {name: 1000.0 * change[name] / (bounds[i + 1] - bounds[i]) for i, name in enumerate(PHASE_NAMES)}
    return {"epochs": bounds, "at": at, "change": change, "rate": rate}


# --------------------------------------------------------------------------------------------------
# Ablations on the trained model
# --------------------------------------------------------------------------------------------------


def ablate_embedding_frequencies(params: Mapping[str, torch.Tensor], p: int, frequencies: Sequence[int],
                                 *, keep_only: bool = False) -> dict[str, torch.Tensor]:
    """A copy of ``params`` whose number embeddings ``W_E[:, :p]`` lose Fourier components.

    ``keep_only=False`` removes the ``cos k`` and ``sin k`` components of every ``k`` in
    ``frequencies`` (projects them out along the token axis); ``keep_only=True`` removes every
    *other* non-constant component instead. The "=" embedding and all other weights are unchanged.
    """
    basis, _ = fourier_basis(p, params["W_E"].device)
    rows = sorted({0} | {r for k in frequencies for r in (2 * int(k) - 1, 2 * int(k))}) if keep_only else \
        sorted({r for k in frequencies for r in (2 * int(k) - 1, 2 * int(k))})
    chosen = basis[rows]                                                         # [n_rows, p]
    projected = torch.einsum("rx,ry,myd->mxd", chosen, chosen, params["W_E"][:, :p])
    new_numbers = projected if keep_only else params["W_E"][:, :p] - projected
    out = dict(params)
    out["W_E"] = torch.cat([new_numbers, params["W_E"][:, p:]], dim=1)
    return out


def loss_and_accuracy(params: Mapping[str, torch.Tensor], data: ModularAdditionData, split: str = "test",
                      ) -> tuple[float, float]:
    """Cross-entropy (float64) and accuracy of model 0 of ``params`` on ``split`` (train|test|all)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    index = {"train": data.train_indices, "test": data.test_indices, "all": slice(None)}[split]
    with torch.no_grad():
        logits = forward({k: v[:1] for k, v in params.items()}, data.tokens[index])[0]
    labels = data.labels[index]
    return float(cross_entropy_float64(logits, labels)), float(accuracy(logits, labels))


def neuron_ablation_logits(model: GrokkingTransformer, data: ModularAdditionData, frequencies: Sequence[int],
                           *, mode: str, index: int = 0, ablate_skip_path: bool = False
                           ) -> Float[torch.Tensor, "p_sq p"]:
    """Number logits of model ``index`` on all ``p²`` inputs with its MLP neurons ablated in the
    Fourier basis over inputs (the paper's §4.4 neuron-level ablations).

    Each neuron's activation, as a function of ``(a, b)`` over all inputs, is split into its mean,
    its components along ``cos(w_k(a+b))`` and ``sin(w_k(a+b))`` for ``k`` in ``frequencies``, and
    the rest. ``mode="keep"`` keeps the mean and those components ("restrict each neuron's activation
    to just the components ... of the form cos(w_k(a+b)) and sin(w_k(a+b)) in the key frequencies");
    ``mode="remove"`` removes those components and keeps everything else. The neurons reach the
    logits through the neuron-logit map ``W_L = W_out W_U``; the rest of the residual stream
    (embedding + attention, and ``b_out``) is left as it is unless ``ablate_skip_path=True``, which
    applies the same ablation to it — then the result equals :func:`restricted_logits` /
    :func:`excluded_logits` of the full logits (the projection over inputs commutes with linear maps).

    ``data.tokens`` must hold all ``p²`` inputs in the order ``a * p + b`` (as
    :func:`~helpers.studies.grokking.training.make_dataset` builds them).
    """
    if mode not in ("keep", "remove"):
        raise ValueError(f"neuron_ablation_logits(mode=...) must be 'keep' (only the frequencies' cos/sin(w(a+b)) "
                         f"terms) or 'remove' (those terms ablated), got {mode!r}.")
    p = data.p
    if data.tokens.shape[0] != p * p:
        raise ValueError(f"neuron_ablation_logits needs all p² = {p * p} inputs in data.tokens, got "
                         f"{data.tokens.shape[0]}.")
    if not frequencies:
        raise ValueError("neuron_ablation_logits(frequencies=...) is empty: give the key frequencies to keep or remove.")
    directions = sum_directions(p, frequencies, device=data.tokens.device)                    # [2K, p²]
    cache: dict[str, torch.Tensor] = {}
    params = {k: v[index:index + 1].detach() for k, v in model.params.items()}
    with torch.no_grad():
        forward(params, data.tokens, cache=cache)
    W_U = params["W_U"][0, :, :p].double()
    neurons = cache["mlp_post"][0].double()                                                   # [p², d_mlp]
    skip = (cache["resid_mid"][0].double() + params["b_out"][0].double()) @ W_U             # [p², p]
    W_L = params["W_out"][0].double() @ W_U                                                   # [d_mlp, p]

    def ablate(values: torch.Tensor) -> torch.Tensor:
        kept = directions.T @ (directions @ values)
        return values.mean(dim=0, keepdim=True) + kept if mode == "keep" else values - kept

    return (ablate(skip) if ablate_skip_path else skip) + ablate(neurons) @ W_L


def ablation_summary(model: GrokkingTransformer, data: ModularAdditionData, key_frequencies: Sequence[int],
                     index: int = 0) -> list[dict[str, Any]]:
    """Loss and accuracy of model ``index`` under the key-frequency ablations, one dict per row.

    Rows: the full model and the restricted / excluded logits (all inputs, ``p`` number logits),
    then the full model, ``W_E`` without the key frequencies, and ``W_E`` with *only* the key
    frequencies (and the constant), on the test inputs, then the neurons restricted to / stripped of
    the key ``cos/sin(w(a+b))`` terms (:func:`neuron_ablation_logits`, all inputs).
    """
    p = data.p
    params = {k: v[index:index + 1].detach() for k, v in model.params.items()}
    with torch.no_grad():
        logits = forward(params, data.tokens)[0, :, :p]
    directions = sum_directions(p, key_frequencies, device=logits.device)

    def logits_row(name: str, values: torch.Tensor) -> dict[str, Any]:
        return {"intervention": name, "inputs": "all", "loss": float(cross_entropy_float64(values, data.labels)),
                "accuracy": float(accuracy(values, data.labels))}

    def params_row(name: str, values: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        loss, acc = loss_and_accuracy(values, data, "test")
        return {"intervention": name, "inputs": "test", "loss": loss, "accuracy": acc}

    return [
        logits_row("none (full model)", logits),
        logits_row("logits: key frequencies only (restricted)", restricted_logits(logits, directions)),
        logits_row("logits: key frequencies removed (excluded)", excluded_logits(logits, directions)),
        params_row("none (full model)", params),
        params_row("W_E: key frequencies removed", ablate_embedding_frequencies(params, p, key_frequencies)),
        params_row("W_E: all other frequencies removed",
                   ablate_embedding_frequencies(params, p, key_frequencies, keep_only=True)),
        logits_row("neurons: key cos/sin(w(a+b)) terms only (§4.4)",
                   neuron_ablation_logits(model, data, key_frequencies, mode="keep", index=index)),
        logits_row("neurons: key cos/sin(w(a+b)) terms removed (§4.4)",
                   neuron_ablation_logits(model, data, key_frequencies, mode="remove", index=index)),
    ]


# --------------------------------------------------------------------------------------------------
# The whole pipeline: train (or load) and measure
# --------------------------------------------------------------------------------------------------


@dataclass
class GrokkingResult:
    """A trained model with everything the analysis needs.

    Attributes:
        model: the trained models (``n_models`` of them).
        data: one dataset/split per model.
        key_frequencies: one list per model, found by :func:`key_frequencies_of`.
        clusters: one :class:`NeuronClusters` per model.
        history: progress measures, ``[n_checkpoints]`` arrays for one model or
            ``[n_checkpoints, n_models]`` for several, plus ``epoch`` (and, for a single model,
            ``train_loss_every_epoch``).
        source: how the model was obtained (printed by the notebook).
        seconds: training wall time (``None`` when loaded).
    """

    model: GrokkingTransformer
    data: list[ModularAdditionData]
    key_frequencies: list[list[int]]
    clusters: list[NeuronClusters]
    history: dict[str, np.ndarray]
    source: str
    seconds: float | None = None


def train_and_measure(config: Any, seeds: Sequence[int] = (0,), *, device: str | torch.device = "cpu",
                      n_epochs: int | None = None, threshold: float = 0.85, min_share: float = 0.02,
                      progress: bool = True) -> GrokkingResult:
    """Train with :func:`helpers.studies.grokking.training.train`, then :func:`measure_run`."""
    from helpers.studies.grokking.training import train

    run = train(config, seeds, n_epochs=n_epochs, device=device, progress=progress)
    return measure_run(run, threshold=threshold, min_share=min_share, progress=progress)


def measure_run(run: TrainingRun, *, threshold: float = 0.85, min_share: float = 0.02,
                progress: bool = True) -> GrokkingResult:
    """Find each final model's key frequencies and compute the progress measures at every snapshot
    with those frequencies (as the paper does: the final model's key frequencies throughout).

    A model with no key frequency (a short run that has not formed the circuit yet: the notebook's
    300-epoch check in the ``ci`` profile) gets ``[]`` in ``key_frequencies`` and NaN restricted and
    excluded losses, with a warning; its losses, accuracies, Gini coefficients and weight norm are
    measured as usual."""
    import warnings

    found = [key_frequencies_of(run.model, run.data[i], i, threshold, min_share) for i in range(len(run.seeds))]
    keys = [k for k, _ in found]
    missing = [seed for seed, k in zip(run.seeds, keys) if not k]
    if missing:
        warnings.warn(f"measure_run: no key frequency found for seed(s) {missing} (no frequency explains >= "
                      f"{min_share:.0%} of the neurons at threshold {threshold}); their restricted and excluded "
                      "losses are NaN.", RuntimeWarning, stacklevel=2)
    history = progress_measures(run, keys, progress=progress, without_key_frequencies="nan")
    if len(run.seeds) == 1:
        history = {name: (value[:, 0] if value.ndim == 2 else value) for name, value in history.items()}
        history["train_loss_every_epoch"] = run.train_loss[:, 0].astype(np.float32)
    epochs = run.train_loss.shape[0]
    device = run.model.W_E.device
    took = "" if run.seconds is None else f", in {run.seconds:.0f} s"
    source = f"trained from scratch here: {epochs} epochs, seed(s) {list(run.seeds)}, on {device}{took}"
    return GrokkingResult(run.model, run.data, keys, [c for _, c in found], history, source, run.seconds)


def load_committed_result(directory: Any = None, device: str | torch.device = "cpu",
                          threshold: float = 0.85, min_share: float = 0.02) -> GrokkingResult:
    """The committed checkpoint + history (``helpers/data/grokking``), as a :class:`GrokkingResult`.

    The key frequencies are recomputed from the loaded weights (and checked against the ones the
    training script stored), and so is the history's final row (every progress measure, checked
    against the stored one): a change to the measuring code shows here, not only in a new training run."""
    from pathlib import Path

    from helpers.studies.grokking.training import DATA_DIR, load_checkpoint, load_history, make_dataset

    directory = Path(directory) if directory is not None else DATA_DIR
    model, metadata = load_checkpoint(directory / "checkpoint.pt", device=device)
    history = load_history(directory / "history.npz")
    data = [make_dataset(model.config.p, model.config.frac_train, s).to(device) for s in model.seeds]
    keys, clusters = key_frequencies_of(model, data[0], 0, threshold, min_share)
    stored = metadata.get("key_frequencies")
    if stored is not None and list(stored) != keys:
        raise RuntimeError(f"Key frequencies of the loaded weights {keys} differ from those stored with the "
                           f"checkpoint {stored}: the files are inconsistent; regenerate them with "
                           "`python scripts/train_grokking_checkpoint.py`.")
    _check_final_row(model, data[0], keys, history)
    source = (f"loaded from {directory.name}/checkpoint.pt: trained by scripts/train_grokking_checkpoint.py for "
              f"{metadata.get('epochs')} epochs (seed {metadata.get('seed')}, {metadata.get('threads')} CPU "
              f"thread(s), {metadata.get('train_seconds')} s, {metadata.get('created')})")
    return GrokkingResult(model, data, [keys], [clusters], history, source, None)


def _check_final_row(model: GrokkingTransformer, data: ModularAdditionData, keys: Sequence[int],
                     history: Mapping[str, np.ndarray], rel: float = 1e-3) -> None:
    """Recompute the committed history's last row from the committed final weights and compare.

    Every progress measure (losses, accuracies, restricted / excluded loss, Gini coefficients, sum of
    squared weights) at the final epoch, with :func:`progress_measures` on a one-snapshot run — so a
    notebook that reads the committed history also exercises the measuring code. ``rel`` allows for
    float32 logits (the tiny final losses, ~1e-7, keep ~1e-4 relative precision).
    """
    from helpers.studies.grokking.training import TrainingRun

    if int(history["epoch"][-1]) != model.config.n_epochs:
        raise RuntimeError(f"The committed history ends at epoch {int(history['epoch'][-1])}, the checkpoint at "
                           f"{model.config.n_epochs}: regenerate both with `python scripts/train_grokking_checkpoint.py`.")
    snapshot = TrainingRun(model.config, model, [data], np.zeros((0, 1)), np.array([model.config.n_epochs]),
                           {name: value[None].detach() for name, value in model.params.items()}, 0.0)
    row = progress_measures(snapshot, [list(keys)], progress=False)
    off = {}
    for name, values in row.items():
        if name == "epoch":
            continue
        got, stored = float(values[0, 0]), float(np.asarray(history[name])[-1])
        if not abs(got - stored) <= rel * max(abs(stored), 1e-12):
            off[name] = (stored, got)
    if off:
        raise RuntimeError("The committed history's final row does not match a recomputation from the committed "
                           f"checkpoint (measure: (stored, recomputed)) {off}: the progress-measure code changed since "
                           "the files were made, or they are inconsistent. Regenerate them with "
                           "`python scripts/train_grokking_checkpoint.py`.")


def compare_histories(short: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                      names: Sequence[str] = ("train_loss", "test_loss", "train_accuracy", "test_accuracy"),
                      *, max_epoch: int | None = None) -> dict[str, float]:
    """Largest relative difference of each measure over the epochs both histories have.

    Used to check that a short run reproduces the start of the committed history (same code, same
    seed). Only float rounding should differ — it depends on the thread count and the machine — but
    training amplifies it: a 300-epoch run with 2 threads on the 2-core machine matched the committed
    (1-thread) history's per-epoch train loss exactly for 10 epochs, then drifted by 2e-6 relative
    at epoch 20, 7e-5 at epoch 50, 8e-4 at epoch 100 and 6e-2 by epoch 150. Pass
    ``max_epoch`` to compare only epochs ``0 .. max_epoch``, where a code change still shows and
    rounding does not.
    """
    if max_epoch is not None and max_epoch < 0:
        raise ValueError(f"max_epoch must be >= 0 (or None for every epoch), got {max_epoch}.")
    n = min(len(short["epoch"]), len(reference["epoch"]))
    if not np.array_equal(short["epoch"][:n], reference["epoch"][:n]):
        raise ValueError("compare_histories: the two histories have different checkpoint epochs.")
    keep = np.ones(n, bool) if max_epoch is None else np.asarray(reference["epoch"][:n]) <= max_epoch
    out = {}
    for name in names:
        a = np.asarray(short[name][:n], np.float64)[keep]
        b = np.asarray(reference[name][:n], np.float64)[keep]
        out[name] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if len(a) else 0.0
    if "train_loss_every_epoch" in short and "train_loss_every_epoch" in reference:
        m = min(len(short["train_loss_every_epoch"]), len(reference["train_loss_every_epoch"]))
        if max_epoch is not None:
            m = min(m, max_epoch + 1)
        a = np.asarray(short["train_loss_every_epoch"][:m], np.float64)
        b = np.asarray(reference["train_loss_every_epoch"][:m], np.float64)
        out["train_loss_every_epoch"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
    return out
