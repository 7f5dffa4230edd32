"""Figures of the grokking study (plotly; show them with ``run.show(fig, name)``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from helpers.studies.grokking.fourier import NeuronClusters, Phases
from helpers.plotting import heatmap

def to_numpy(values: Any) -> np.ndarray:
    """Tensors (on any device) and arrays alike as a NumPy array."""
    if hasattr(values, "detach"):
        return values.detach().float().cpu().numpy()
    return np.asarray(values)


PHASE_COLOURS = {"memorisation": "rgba(99, 110, 250, 0.10)", "circuit formation": "rgba(0, 204, 150, 0.12)",
                 "cleanup": "rgba(239, 85, 59, 0.12)"}


def _add_phases(fig: go.Figure, phases: Phases | None, last_epoch: float, **where: Any) -> None:
    if phases is None:
        return
    spans = (("memorisation", 0, phases.memorisation_end), ("circuit formation", phases.memorisation_end, phases.cleanup_start),
             ("cleanup", phases.cleanup_start, phases.cleanup_end))
    for number, (name, start, end) in enumerate(spans, start=1):
        fig.add_vrect(x0=start, x1=end, fillcolor=PHASE_COLOURS[name], line_width=0, layer="below",
                      annotation_text=str(number), annotation_position="top left", annotation_font_size=11, **where)


PHASE_LEGEND = "shaded: 1 memorisation, 2 circuit formation, 3 cleanup"


def loss_curves(history: Mapping[str, np.ndarray], phases: Phases | None = None, *, title: str) -> go.Figure:
    """Train and test loss (log scale) and accuracy over training, phases shaded."""
    epochs = history["epoch"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cross-entropy loss", "accuracy"))
    if "train_loss_every_epoch" in history:
        every = history["train_loss_every_epoch"]
        stride = max(1, len(every) // 2000)
        fig.add_trace(go.Scatter(x=np.arange(0, len(every), stride), y=every[::stride], name="train (every epoch)",
                                 line=dict(color="rgba(99,110,250,0.35)", width=1)), row=1, col=1)
    fig.add_trace(go.Scatter(x=epochs, y=history["train_loss"], name="train", line=dict(color="#636efa")), row=1, col=1)
    fig.add_trace(go.Scatter(x=epochs, y=history["test_loss"], name="test", line=dict(color="#ef553b")), row=1, col=1)
    fig.add_trace(go.Scatter(x=epochs, y=history["train_accuracy"], name="train acc", line=dict(color="#636efa", dash="dot")), row=1, col=2)
    fig.add_trace(go.Scatter(x=epochs, y=history["test_accuracy"], name="test acc", line=dict(color="#ef553b", dash="dot")), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="epoch")
    _add_phases(fig, phases, float(epochs[-1]), row=1, col=1)
    fig.update_layout(title=title + (f"<br><sup>{PHASE_LEGEND}</sup>" if phases is not None else ""),
                      template="plotly_white", height=460)
    return fig


def progress_measure_curves(history: Mapping[str, np.ndarray], phases: Phases | None = None, *, title: str) -> go.Figure:
    """The paper's Figure 7 layout: losses incl. restricted/excluded; Gini of W_E and W_L; weight norm."""
    epochs = history["epoch"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("loss (log)", "Gini of Fourier-component norms",
                                                        "sum of squared weights"))
    for name, colour in (("train_loss", "#636efa"), ("test_loss", "#ef553b"), ("restricted_loss", "#00cc96"),
                         ("excluded_loss", "#ab63fa")):
        fig.add_trace(go.Scatter(x=epochs, y=history[name], name=name.replace("_", " "), line=dict(color=colour)), row=1, col=1)
    fig.add_trace(go.Scatter(x=epochs, y=history["gini_W_E"], name="Gini W_E", line=dict(color="#ffa15a")), row=1, col=2)
    fig.add_trace(go.Scatter(x=epochs, y=history["gini_W_L"], name="Gini W_L", line=dict(color="#19d3f3")), row=1, col=2)
    fig.add_trace(go.Scatter(x=epochs, y=history["sum_squared_weights"], name="Σ w²", line=dict(color="#7f7f7f")), row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="epoch")
    for col in (1, 2, 3):
        _add_phases(fig, phases, float(epochs[-1]), row=1, col=col)
    fig.update_layout(title=title + (f"<br><sup>{PHASE_LEGEND}</sup>" if phases is not None else ""),
                      template="plotly_white", height=460)
    return fig


def frequency_bars(norms: Any, key_frequencies: Sequence[int], *, title: str, y_label: str = "norm") -> go.Figure:
    """One bar per frequency 1 … (p−1)/2, key frequencies highlighted."""
    values = to_numpy(norms)
    freqs = np.arange(1, len(values) + 1)
    colours = ["#ef553b" if k in set(key_frequencies) else "#9da5b4" for k in freqs]
    fig = go.Figure(go.Bar(x=freqs, y=values, marker_color=colours,
                           hovertemplate="frequency %{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="frequency k", yaxis_title=y_label, template="plotly_white")
    return fig


def neuron_clusters_figure(clusters: NeuronClusters, key_frequencies: Sequence[int], *, title: str) -> go.Figure:
    """Each neuron's dominant frequency vs the fraction of its variance that frequency explains."""
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(clusters.frequency))
    colours = np.where(clusters.explained, "#ef553b", "#9da5b4")
    fig = go.Figure(go.Scatter(
        x=clusters.frequency + jitter, y=clusters.fraction, mode="markers", marker=dict(size=5, color=colours, opacity=0.7),
        text=[f"neuron {i}" for i in range(len(clusters.frequency))],
        hovertemplate="%{text}: frequency %{x:.0f}, fraction %{y:.3f}<extra></extra>"))
    fig.add_hline(y=clusters.threshold, line_dash="dot", line_color="grey",
                  annotation_text=f"explained ≥ {clusters.threshold}", annotation_position="bottom right")
    fig.update_layout(title=title, xaxis_title="dominant frequency (jittered)", yaxis_title="fraction of variance explained",
                      template="plotly_white")
    for k in key_frequencies:
        fig.add_vline(x=k, line_color="rgba(239,85,59,0.25)", line_width=6)
    return fig


def input_grid(values: Any, p: int, *, title: str, signed: bool = True) -> go.Figure:
    """A quantity over all inputs as a ``p × p`` heatmap: ``a`` down, ``b`` across."""
    grid = to_numpy(values).reshape(p, p)
    ticks = list(range(p))
    return heatmap(grid, title=title, x_label="b", y_label="a", x_ticks=ticks, y_ticks=ticks, signed=signed)


def seed_frequencies_figure(key_frequencies: Sequence[Sequence[int]], seeds: Sequence[int], n_frequencies: int,
                            *, title: str) -> go.Figure:
    """Which key frequencies each seed picked (a seed × frequency grid)."""
    grid = np.zeros((len(seeds), n_frequencies))
    for row, keys in enumerate(key_frequencies):
        for k in keys:
            grid[row, k - 1] = 1.0
    fig = go.Figure(go.Heatmap(z=grid, x=list(range(1, n_frequencies + 1)), y=[f"seed {s}" for s in seeds],
                               colorscale=[[0, "#f4f4f4"], [1, "#ef553b"]], showscale=False,
                               hovertemplate="%{y}, frequency %{x}: %{z}<extra></extra>", xgap=1, ygap=2))
    fig.update_layout(title=title, xaxis_title="frequency k", template="plotly_white", height=300)
    fig.update_yaxes(autorange="reversed")
    return fig
