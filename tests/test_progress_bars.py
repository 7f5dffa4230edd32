"""scripts/progress_bars.py + reproduce.execute: committed outputs show where each progress bar ended."""

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest
from tqdm.std import Bar

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "scripts"))
import progress_bars  # noqa: E402  (scripts/progress_bars.py, as reproduce.py imports it)

spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

LOOPS = '''from tqdm.auto import tqdm
import time
for _ in tqdm(range(90), desc="sweep"):
    pass
for _ in tqdm(range(7), desc="hidden", leave=False):
    pass
for _ in tqdm(range(40), total=80, desc="stopped"):
    pass
for _ in tqdm(iter(range(12)), desc="no total"):
    pass
'''


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.123, 0.5, 0.999, 1.0])
def test_text_bar_matches_tqdms_own_bar(fraction):
    assert progress_bars.text_bar(fraction) == format(Bar(fraction, 10, charset=Bar.UTF), "")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """A small notebook run through reproduce.execute (nbclient, a real kernel, tqdm.auto widgets)."""
    folder = tmp_path_factory.mktemp("bars")
    source, output = folder / "bars.ipynb", folder / "bars.executed.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LOOPS), nbformat.v4.new_code_cell("1 + 1")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, source)
    ok, _, error = reproduce.execute(source, timeout=120, output=output)
    assert ok, error
    return nbformat.read(output, as_version=4)


def _texts(notebook):
    return [o["data"]["text/plain"] for o in notebook.cells[0].outputs if "data" in o]


def test_executed_bars_show_their_final_count(executed):
    assert executed.metadata["widgets"][progress_bars.WIDGET_STATE]["state"], "widget state was not saved"
    texts = _texts(executed)
    assert len(texts) == 3, texts  # the leave=False bar was hidden when it closed: dropped
    sweep, stopped, no_total = texts
    assert sweep.startswith("sweep: 100%|██████████| 90/90 ["), sweep
    assert stopped.startswith("stopped:  50%|█████     | 40/80 ["), stopped
    assert no_total.startswith("no total: 12/? ["), no_total  # no bar drawn for an unknown total
    assert not any("0/90" in t and "90/90" not in t for t in texts)
    assert "&lt;" not in sweep and "\u2007" not in sweep  # plain text, not tqdm's html
    assert executed.cells[1].outputs[0]["data"]["text/plain"] == "2"  # other outputs untouched
    # only the shown bars' widgets are kept: 3 bars x (HBox, 2 HTML, FloatProgress + their layouts/styles)
    states = executed.metadata["widgets"][progress_bars.WIDGET_STATE]["state"]
    boxes = [m for m in states.values() if m["model_name"] == "HBoxModel"]
    assert len(boxes) == 3 and all(m["model_name"] != "IntSliderModel" for m in states.values())
    assert all(progress_bars.progress_bar_text(states, k) for k, m in states.items() if m["model_name"] == "HBoxModel")


def test_without_saved_state_the_widget_outputs_are_dropped(executed):
    notebook = nbformat.from_dict(json.loads(nbformat.writes(executed)))
    notebook.cells[0].outputs.append(nbformat.v4.new_output(
        "display_data", data={progress_bars.WIDGET_VIEW: {"model_id": "unknown", "version_major": 2, "version_minor": 0},
                              "text/plain": "  0%|          | 0/5 [00:00<?, ?it/s]"}))
    del notebook.metadata["widgets"]
    summary = progress_bars.finish_progress_bars(notebook)
    assert summary.dropped == 4 and summary.rewritten == 0
    assert not any("data" in o and progress_bars.WIDGET_VIEW in o["data"] for o in notebook.cells[0].outputs)


def test_a_widget_that_is_not_a_progress_bar_keeps_its_fallback(executed):
    notebook = nbformat.from_dict(json.loads(nbformat.writes(executed)))
    states = notebook.metadata["widgets"][progress_bars.WIDGET_STATE]["state"]
    states["slider"] = {"model_name": "IntSliderModel", "model_module": "@jupyter-widgets/controls",
                        "model_module_version": "2.0.0", "state": {"value": 3}}
    notebook.cells[1].outputs.append(nbformat.v4.new_output(
        "display_data", data={progress_bars.WIDGET_VIEW: {"model_id": "slider", "version_major": 2, "version_minor": 0},
                              "text/plain": "IntSlider(value=3)"}))
    progress_bars.finish_progress_bars(notebook)
    assert notebook.cells[1].outputs[-1]["data"]["text/plain"] == "IntSlider(value=3)"
