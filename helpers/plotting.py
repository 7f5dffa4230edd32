"""Plotly figures with consistent labels, shown interactively and kept as static PNGs.

* :func:`heatmap`, :func:`line`, :func:`scatter` build figures with the project's conventions
  (layer on the y axis, heads/positions on the x axis, a diverging colour scale centred on zero for
  signed effects).
* :func:`show` displays a figure as one output bundle holding the interactive plotly figure (for
  JupyterLab, VS Code and, via HTML, Colab) *and* a static PNG (what GitHub renders).
* :func:`save_figure` writes ``<name>.html`` (interactive) and ``<name>.png`` into the figures
  directory (:func:`figures_dir`).

Static export uses kaleido, which needs a Chrome/Chromium (``make setup`` installs Debian's
``chromium`` where it can). Without one, figures degrade to HTML-only and a single clear message
says why and how to fix it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from helpers.profiles import output_subdir

_PNG_WIDTH, _PNG_HEIGHT = 900, 520
_static_export: bool | None = None  # None: not tried yet
_static_export_reason = ""


# --------------------------------------------------------------------------------------------------
# Where figures go
# --------------------------------------------------------------------------------------------------


def repo_root(start: Path | None = None) -> Path | None:
    """The checkout's root (the folder whose pyproject.toml names mechinterp-repro), if inside one."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        project = folder / "pyproject.toml"
        if project.is_file() and 'name = "mechinterp-repro"' in project.read_text(encoding="utf-8"):
            return folder
    return None


def figures_dir() -> Path:
    """``$MI_FIGURES_DIR`` if set, else ``figures/`` at the repository root (or the working dir).

    Runs of the ``embedded``/``ci`` profiles on a model other than the default (``MI_MODEL``, see
    :func:`helpers.profiles.output_subdir`) get a subfolder named after the model, e.g.
    ``figures/gemma-3-270m/``, so their figures and results never overwrite the default model's.
    """
    configured = os.environ.get("MI_FIGURES_DIR")
    if configured:
        path = Path(configured)
    else:
        root = repo_root()
        path = (root if root is not None else Path.cwd()) / "figures"
    subdir = output_subdir()
    if subdir:
        path = path / subdir
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Figure builders
# --------------------------------------------------------------------------------------------------


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values)


def heatmap(
    values: Any,
    *,
    title: str,
    x_label: str = "head",
    y_label: str = "layer",
    x_ticks: Sequence[Any] | None = None,
    y_ticks: Sequence[Any] | None = None,
    colorbar_title: str = "",
    signed: bool = True,
    zmax: float | None = None,
) -> go.Figure:
    """A 2-D heatmap, ``values[y, x]`` (by default layer × head), layer 0 at the top.

    Args:
        signed: diverging red/blue scale centred on 0 (for effects); otherwise a sequential scale.
        zmax: symmetric colour limit; defaults to the largest absolute value.
    """
    z = _to_numpy(values)
    if z.ndim != 2:
        raise ValueError(f"heatmap expects a 2-D array, got shape {z.shape}.")
    x_ticks = list(x_ticks) if x_ticks is not None else list(range(z.shape[1]))
    y_ticks = list(y_ticks) if y_ticks is not None else list(range(z.shape[0]))
    limit = zmax if zmax is not None else float(np.nanmax(np.abs(z))) if z.size else 1.0
    colour = dict(colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit) if signed else dict(colorscale="Viridis")
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[str(t) for t in x_ticks], y=[str(t) for t in y_ticks],
            colorbar=dict(title=colorbar_title), hovertemplate=f"{y_label} %{{y}}, {x_label} %{{x}}: %{{z:.3f}}<extra></extra>",
            **colour,
        )
    )
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white")
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def line(
    series: dict[str, Any],
    *,
    title: str,
    x: Sequence[Any] | None = None,
    x_label: str = "",
    y_label: str = "",
    log_x: bool = False,
    log_y: bool = False,
) -> go.Figure:
    """One line per entry of ``series`` (name → values), sharing the x values ``x``."""
    fig = go.Figure()
    for name, values in series.items():
        y = _to_numpy(values)
        fig.add_trace(go.Scatter(x=_to_numpy(x) if x is not None else np.arange(len(y)), y=y, mode="lines", name=name))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white")
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def scatter(
    x: Any,
    y: Any,
    *,
    title: str,
    x_label: str = "",
    y_label: str = "",
    labels: Sequence[str] | None = None,
    color: Any = None,
    color_label: str = "",
    diagonal: bool = False,
    hline: float | None = None,
) -> go.Figure:
    """A scatter plot; ``labels`` become hover text, ``diagonal`` draws y = x, ``hline`` a flat line."""
    xs, ys = _to_numpy(x), _to_numpy(y)
    marker: dict[str, Any] = dict(size=7, opacity=0.8)
    if color is not None:
        marker.update(color=_to_numpy(color), colorscale="Viridis", showscale=True, colorbar=dict(title=color_label))
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers", text=list(labels) if labels is not None else None,
                               marker=marker, name="", hovertemplate="%{text}<br>x=%{x:.3f}, y=%{y:.3f}<extra></extra>"
                               if labels is not None else None))
    if diagonal and xs.size:
        lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="grey"), name="y = x"))
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white")
    return fig


# --------------------------------------------------------------------------------------------------
# Static export, display, saving
# --------------------------------------------------------------------------------------------------


def _find_chrome() -> str | None:
    for candidate in (os.environ.get("BROWSER_PATH"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


def _ensure_static_export() -> bool:
    """Start kaleido's browser once per process; remember (and say once) if that is impossible."""
    global _static_export, _static_export_reason
    if _static_export is not None:
        return _static_export
    chrome = _find_chrome()
    if chrome is None:
        _static_export, _static_export_reason = False, (
            "no Chrome/Chromium found, so figures are kept as interactive HTML only (no PNG). "
            "Install one (Debian/Ubuntu: `apt-get install chromium`; or run `make setup`) or set BROWSER_PATH."
        )
    else:
        os.environ.setdefault("BROWSER_PATH", chrome)
        try:
            import kaleido

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kaleido.start_sync_server(silence_warnings=True)
            atexit.register(lambda: kaleido.stop_sync_server(silence_warnings=True))
            _static_export = True
        except Exception as err:  # kaleido/Chrome failing to start must not stop the study
            _static_export, _static_export_reason = False, (
                f"kaleido could not start {chrome} ({type(err).__name__}: {err}); figures are kept as HTML only."
            )
    if not _static_export:
        print(f"[helpers.plotting] Static PNG export is off: {_static_export_reason}", file=sys.stderr)
    return _static_export


def to_png(fig: go.Figure, *, width: int | None = None, height: int | None = None) -> bytes | None:
    """The figure as PNG bytes, or ``None`` when static export is unavailable (see module doc).

    The size is ``width``/``height`` if given, else the figure's own layout size, else 900 × 520.
    """
    if not _ensure_static_export():
        return None
    width = width or fig.layout.width or _PNG_WIDTH
    height = height or fig.layout.height or _PNG_HEIGHT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fig.to_image(format="png", width=width, height=height, scale=1)


def _in_colab() -> bool:
    return "google.colab" in sys.modules


def show(fig: go.Figure, name: str | None = None) -> None:
    """Display ``fig`` interactively with a static PNG alongside; with ``name``, also save it.

    The output bundle carries the plotly JSON (rendered interactively by JupyterLab/VS Code), the
    PNG (rendered by GitHub and anything without plotly), and on Colab an HTML version.
    """
    from IPython.display import display

    png = to_png(fig)
    bundle: dict[str, Any] = {
        "application/vnd.plotly.v1+json": fig.to_plotly_json(),
        "text/plain": f"<plotly figure: {fig.layout.title.text or name or ''}>",
    }
    if png is not None:
        bundle["image/png"] = png
    if _in_colab() or png is None:
        bundle["text/html"] = fig.to_html(include_plotlyjs="cdn", full_html=False)
    display(bundle, raw=True)
    if name is not None:
        save_figure(fig, name, png=png)


def save_figure(fig: go.Figure, name: str, *, png: bytes | None = None) -> list[Path]:
    """Write ``<name>.html`` and (if static export works) ``<name>.png`` into :func:`figures_dir`.

    ``name`` may contain a sub-folder, e.g. ``"02_ioi/head_dla"``. Returns the written paths.
    """
    if not name or name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"save_figure(name=...) expects a relative name like '02_ioi/head_dla', got {name!r}.")
    base = figures_dir() / name
    base.parent.mkdir(parents=True, exist_ok=True)
    html_path = base.with_suffix(".html")
    fig.write_html(html_path, include_plotlyjs="cdn", full_html=True)
    written = [html_path]
    png = png if png is not None else to_png(fig)
    if png is not None:
        png_path = base.with_suffix(".png")
        png_path.write_bytes(png)
        written.append(png_path)
    return written


def save_html_page(body: str, name: str, *, title: str) -> Path:
    """Write an HTML fragment (a circuitsvis view, say) as a standalone page ``<figures>/<name>.html``.

    ``name`` is relative like :func:`save_figure`'s (``"07_sparse_autoencoders/latent_tokens.circuitsvis"``).
    """
    import html

    if not name or name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"save_html_page(name=...) expects a relative name like '02_ioi/name_movers', got {name!r}.")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>"
        f"{html.escape(title)}</title></head>\n<body>\n<h3>{html.escape(title)}</h3>\n{body}\n</body></html>\n"
    )
    path = figures_dir() / f"{name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
