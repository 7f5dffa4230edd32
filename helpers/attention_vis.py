"""The project's one way to show attention patterns: light in notebooks, interactive on demand.

circuitsvis draws the best interactive attention views, but its ``_repr_html_`` inlines its whole
JavaScript bundle (~1.3 MB) into *every* figure when offline, which makes committed notebooks huge
(and it probes google.com on each display to decide). So :func:`show_attention` does three things:

1. displays a compact **static plotly heatmap grid** (one panel per head, query × key, padding
   stripped) through :func:`helpers.plotting.show`: plotly JSON + PNG, a few tens of kB, renders on
   GitHub;
2. writes the **circuitsvis** view as a standalone, offline HTML file next to the figure
   (``<figures>/<name>.circuitsvis.html``, JavaScript inlined once per file, never in the notebook)
   and prints its path;
3. optionally (``interactive="cdn"``) also displays the circuitsvis view in the notebook with its
   JavaScript loaded from the unpkg CDN: only the data goes into the notebook (a few kB), but it
   needs internet where the notebook is *viewed*. ``interactive="inline"`` is the heavy circuitsvis
   default (1.3 MB per figure) for offline interactive use; never commit a notebook with it.

Typical use::

    from helpers.attention_vis import show_attention
    show_attention(model, data.batch, prompt_index=0, heads=[(9, 9), (9, 6)], name="02_ioi_circuit/name_movers")

or, with patterns you already have (``[head, query, key]`` for one prompt)::

    fig = attention_grid(patterns, tokens, head_labels)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots

from helpers.plotting import save_html_page, show
from helpers.prompts import TokenBatch

Interactive = Literal["file", "cdn", "inline", "none"]

__all__ = ["attention_patterns", "attention_grid", "circuitsvis_html", "save_circuitsvis", "show_attention", "token_labels"]


def _parse_heads(model: Any, heads: Sequence[Any]) -> list[tuple[int, int]]:
    parsed = []
    for item in heads:
        layer, head = (item.layer, item.head) if hasattr(item, "layer") and hasattr(item, "head") else item
        layer, head = int(layer), int(head)
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise ValueError(
                f"head ({layer}, {head}) does not exist: the model has {model.cfg.n_layers} layers × "
                f"{model.cfg.n_heads} query heads (0-indexed)."
            )
        parsed.append((layer, head))
    if not parsed:
        raise ValueError("heads=[] is empty: pass (layer, head) pairs, e.g. heads=[(9, 9)].")
    return parsed


def token_labels(model: Any, token_ids: Sequence[int]) -> list[str]:
    """Readable, unique-per-position labels for tokens (``"3: ␣Mary"``), as plotly axis ticks."""
    labels = []
    for i, token in enumerate(token_ids):
        text = model.tokenizer.decode([int(token)]).replace(" ", "␣").replace("\n", "↵")
        labels.append(f"{i}: {text}")
    return labels


@torch.no_grad()
def attention_patterns(
    model: Any, batch: TokenBatch, prompt_index: int, heads: Sequence[Any]
) -> tuple[Float[torch.Tensor, "head query key"], list[int]]:
    """Attention patterns of ``heads`` on one prompt of ``batch``, padding removed.

    Runs one forward pass with a cache restricted to the needed ``hook_pattern``s (query heads;
    with grouped-query attention each query head has its own pattern).

    Returns:
        ``(patterns [head, query, key], token_ids)`` over the prompt's real tokens only.
    """
    if not 0 <= prompt_index < len(batch):
        raise IndexError(f"prompt_index={prompt_index} is out of range for a batch of {len(batch)} prompts.")
    parsed = _parse_heads(model, heads)
    row = batch[prompt_index : prompt_index + 1]
    names = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in parsed}
    _, cache = model.run_with_cache(row.tokens, attention_mask=row.attention_mask, names_filter=lambda n: n in names)
    real = row.attention_mask[0].bool()
    patterns = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, head] for layer, head in parsed])
    patterns = patterns[:, real][:, :, real]
    return patterns.float().cpu(), row.tokens[0, real].tolist()


def attention_grid(
    patterns: Float[torch.Tensor, "head query key"],
    tokens: Sequence[str],
    head_labels: Sequence[str],
    *,
    title: str = "Attention patterns",
    columns: int = 3,
    panel_px: int = 300,
) -> go.Figure:
    """A static-friendly grid of attention heatmaps (one panel per head; rows = query, cols = key).

    Colour is the attention probability on a fixed 0..1 scale, so panels are comparable.
    """
    patterns = torch.as_tensor(patterns).float().cpu()
    if patterns.ndim != 3 or patterns.shape[1] != patterns.shape[2] or patterns.shape[1] != len(tokens):
        raise ValueError(
            f"patterns must be [head, query, key] with query = key = len(tokens) = {len(tokens)}, "
            f"got shape {tuple(patterns.shape)}."
        )
    if len(head_labels) != patterns.shape[0]:
        raise ValueError(f"{len(head_labels)} head_labels for {patterns.shape[0]} patterns.")
    n = patterns.shape[0]
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=list(head_labels),
                        horizontal_spacing=0.12 / columns * 2, vertical_spacing=0.25 / max(rows, 1))
    ticks = list(tokens)
    for index in range(n):
        r, c = divmod(index, columns)
        fig.add_trace(
            go.Heatmap(
                z=patterns[index].numpy().round(3), x=ticks, y=ticks, zmin=0.0, zmax=1.0, colorscale="Blues",
                showscale=index == 0, colorbar=dict(title="attn", len=0.6) if index == 0 else None,
                hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.2f}<extra></extra>",
            ),
            row=r + 1, col=c + 1,
        )
        # token labels only on the outer axes, so the panels keep their room
        fig.update_yaxes(autorange="reversed", tickfont=dict(size=7), showticklabels=c == 0, row=r + 1, col=c + 1)
        fig.update_xaxes(tickfont=dict(size=7), tickangle=-60, showticklabels=index >= n - columns,
                         row=r + 1, col=c + 1)
    fig.update_layout(title=title, template="plotly_white", width=panel_px * columns + 120,
                      height=panel_px * rows + 140, margin=dict(t=80, l=60, r=20, b=40))
    return fig


def circuitsvis_html(
    patterns: Float[torch.Tensor, "head query key"], tokens: Sequence[str], head_labels: Sequence[str], *, cdn: bool
) -> str:
    """circuitsvis' ``attention_heads`` view as an HTML fragment (JS from the CDN, or inlined)."""
    import circuitsvis as cv

    rendered = cv.attention.attention_heads(
        attention=torch.as_tensor(patterns).float().cpu(), tokens=list(tokens), attention_head_names=list(head_labels)
    )
    return rendered.cdn_src if cdn else rendered.local_src


def save_circuitsvis(
    patterns: Float[torch.Tensor, "head query key"], tokens: Sequence[str], head_labels: Sequence[str], name: str,
    *, title: str = "Attention patterns",
) -> Path:
    """Write the circuitsvis view as a standalone offline HTML page ``<figures>/<name>.circuitsvis.html``."""
    if not name or name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"name must be relative like '02_ioi_circuit/name_movers', got {name!r}.")
    return save_html_page(circuitsvis_html(patterns, tokens, head_labels, cdn=False), f"{name}.circuitsvis", title=title)


def show_attention(
    model: Any,
    batch: TokenBatch,
    *,
    heads: Sequence[Any],
    prompt_index: int = 0,
    name: str | None = None,
    title: str | None = None,
    interactive: Interactive = "file",
    columns: int = 3,
) -> Float[torch.Tensor, "head query key"]:
    """Show the attention patterns of ``heads`` on one prompt (see the module doc for what goes where).

    Args:
        model: the bridge.
        batch: a :class:`~helpers.prompts.TokenBatch`; padding is stripped from the picture.
        heads: ``(layer, head)`` pairs (or :class:`helpers.ablation.Head`).
        prompt_index: which prompt of the batch.
        name: figure name under the figures dir (``"02_ioi_circuit/name_movers"``): saves the PNG and
            plotly HTML (via :func:`helpers.plotting.show`) and, unless ``interactive="none"``, the
            circuitsvis page ``<name>.circuitsvis.html``.
        title: figure title (default: the heads).
        interactive: ``"file"`` (default: circuitsvis page written to disk, nothing heavy in the
            notebook), ``"cdn"`` (also display circuitsvis inline with JS from the unpkg CDN — a few kB,
            needs internet to view), ``"inline"`` (display circuitsvis with its 1.3 MB bundle inlined —
            offline, do not commit), ``"none"`` (static figure only).
        columns: panels per row in the static grid.

    Returns:
        The patterns ``[head, query, key]`` (real tokens only) that were drawn.
    """
    from IPython.display import HTML, display

    if interactive not in ("file", "cdn", "inline", "none"):
        raise ValueError(f"interactive must be 'file', 'cdn', 'inline' or 'none', got {interactive!r}.")
    parsed = _parse_heads(model, heads)
    patterns, token_ids = attention_patterns(model, batch, prompt_index, parsed)
    labels = [f"L{layer}H{head}" for layer, head in parsed]
    tokens = token_labels(model, token_ids)
    title = title or f"Attention of {', '.join(labels)} (prompt {prompt_index})"
    show(attention_grid(patterns, tokens, labels, title=title, columns=columns), name)
    plain_tokens = [model.tokenizer.decode([t]) for t in token_ids]
    if name is not None and interactive != "none":
        path = save_circuitsvis(patterns, plain_tokens, labels, name, title=title)
        print(f"interactive circuitsvis view (offline HTML): {path}")
    if interactive == "cdn":
        display(HTML(circuitsvis_html(patterns, plain_tokens, labels, cdn=True)))
    elif interactive == "inline":
        display(HTML(circuitsvis_html(patterns, plain_tokens, labels, cdn=False)))
    return patterns
