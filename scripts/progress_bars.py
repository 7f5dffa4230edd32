"""Finished progress bars in executed notebooks, for viewers that do not run widgets.

A ``tqdm.auto`` bar in a notebook is an ipywidgets ``HBox(HTML prefix, FloatProgress, HTML suffix)``.
Its output cell stores the widget's model id plus a ``text/plain`` fallback that tqdm wrote when the bar
was *created* ("  0%|          | 0/90 [00:00<?, ?it/s]"). JupyterLab draws the widget from the widget
state saved in the notebook's metadata (nbclient collects it; ``set_widgets_metadata``), but GitHub and
other plain viewers show the fallback, so a finished run reads "0%".

:func:`finish_progress_bars` rewrites each bar's fallback from the saved state — the prefix, a text bar
of the FloatProgress value/max and the suffix, as tqdm prints it ("100%|██████████| 90/90 [00:01<00:00]").
A widget output without saved state (it cannot be drawn anywhere) is dropped, and so is a bar that tqdm
hid when it closed (``leave=False``), as JupyterLab hides it too; the saved state of widgets that no
output shows any more is dropped with them (about 9 kB per bar).

    python scripts/progress_bars.py notebooks/02_ioi_circuit.ipynb   # rewrite in place (already executed)
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BAR_WIDTH = 10  # tqdm's text bar in a notebook's fallback (no terminal width)
BAR_CHARSET = " ▏▎▍▌▋▊▉█"  # tqdm.std.Bar.UTF


@dataclass
class Summary:
    rewritten: int = 0  # tqdm bars whose text fallback now shows their last state
    dropped: int = 0  # widget outputs removed (no saved state, or a bar hidden when it closed)


def text_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """tqdm's unicode bar for ``fraction`` (clipped to [0, 1]) in ``width`` characters."""
    fraction = min(max(fraction, 0.0), 1.0)
    steps = len(BAR_CHARSET) - 1
    full, partial = divmod(int(fraction * width * steps), steps)
    bar = BAR_CHARSET[-1] * full
    if full < width:
        bar += BAR_CHARSET[partial] + BAR_CHARSET[0] * (width - full - 1)
    return bar


def _plain(value: str) -> str:
    # tqdm html-escapes the text and swaps spaces for U+2007 (figure space) to keep its padding.
    return html.unescape(value or "").replace("\u2007", " ")


def _model(states: dict, reference) -> dict | None:
    if not isinstance(reference, str) or not reference.startswith("IPY_MODEL_"):
        return None
    return states.get(reference.removeprefix("IPY_MODEL_"))


def progress_bar_text(states: dict, model_id: str) -> str | None:
    """The text a tqdm bar's widget ``model_id`` shows in the saved ``states``; ``None`` if it is not one."""
    box = states.get(model_id)
    if not box or box.get("model_name") != "HBoxModel":
        return None
    children = [_model(states, ref) for ref in box.get("state", {}).get("children", [])]
    if len(children) != 3 or any(c is None for c in children):
        return None
    names = [c.get("model_name") for c in children]
    if names != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, progress, right = (c.get("state", {}) for c in children)
    prefix, suffix = _plain(left.get("value", "")), _plain(right.get("value", ""))
    if not prefix or re.match(r"\s*\S+/\?", suffix):  # unknown total ("12/?"): the widget's bar is only a marker
        return (prefix + suffix.strip()).strip()
    maximum = float(progress.get("max", 100.0) or 0.0)
    fraction = float(progress.get("value", 0.0)) / maximum if maximum > 0 else 0.0
    return f"{prefix}|{text_bar(fraction)}|{suffix}"


def _hidden(states: dict, model_id: str) -> bool:
    box = states.get(model_id, {}).get("state", {})
    layout = _model(states, box.get("layout"))
    return box.get("visible") is False or bool(layout and layout.get("state", {}).get("visibility") == "hidden")


def finish_progress_bars(notebook: nbformat.NotebookNode) -> Summary:
    """Rewrite (in place) every widget output of ``notebook`` from its metadata's saved widget state."""
    states = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    summary = Summary()
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW) if output.get("output_type") in (
                "display_data", "execute_result") else None
            if view is None:
                kept.append(output)
                continue
            model_id = view.get("model_id")
            if model_id not in states or _hidden(states, model_id):
                summary.dropped += 1
                continue
            text = progress_bar_text(states, model_id)
            if text is not None:
                output["data"]["text/plain"] = text
                summary.rewritten += 1
            kept.append(output)
        cell["outputs"] = kept
    _keep_only_shown_widgets(notebook, states)
    return summary


def _references(value) -> list[str]:
    if isinstance(value, str):
        return [value.removeprefix("IPY_MODEL_")] if value.startswith("IPY_MODEL_") else []
    if isinstance(value, dict):
        return [ref for v in value.values() for ref in _references(v)]
    if isinstance(value, list):
        return [ref for v in value for ref in _references(v)]
    return []


def _keep_only_shown_widgets(notebook: nbformat.NotebookNode, states: dict) -> None:
    """Drop the saved state of widgets no output shows (closed bars, inner loops): ~9 kB per bar."""
    shown = [o["data"][WIDGET_VIEW]["model_id"] for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.get("outputs", []) if WIDGET_VIEW in o.get("data", {})]
    needed, todo = set(), [m for m in shown if m in states]
    while todo:
        model_id = todo.pop()
        if model_id in needed or model_id not in states:
            continue
        needed.add(model_id)
        todo += _references(states[model_id].get("state", {}))
    for model_id in set(states) - needed:
        del states[model_id]
    if not states and "widgets" in notebook.metadata:
        del notebook.metadata["widgets"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    for path in parser.parse_args().notebooks:
        notebook = nbformat.read(path, as_version=4)
        summary = finish_progress_bars(notebook)
        nbformat.write(notebook, path)
        print(f"{path}: {summary.rewritten} progress bars finished, {summary.dropped} widget outputs dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
