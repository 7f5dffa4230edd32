"""scripts/browser_check.py: what it expects to see is read from the committed notebook files."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("browser_check", ROOT / "scripts" / "browser_check.py")
browser_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(browser_check)


def test_expected_outputs_counts_plotly_circuitsvis_and_widgets(tmp_path):
    def output(data):
        return {"output_type": "display_data", "data": data, "metadata": {}}

    cells = [{"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1, "outputs": [
        output({browser_check.PLOTLY: {"data": []}, "image/png": "", "text/plain": "fig"}),
        output({browser_check.PLOTLY: {"data": []}}),
        output({"text/html": ["<div id=\"circuits-vis-1\">", "<script>// circuitsvis render</script>"]}),
        output({"text/html": "<table class='dataframe'></table>"}),
        output({browser_check.WIDGET: {"model_id": "x"}, "text/plain": "0%"}),
    ]}, {"cell_type": "markdown", "source": "plotly", "metadata": {}}]
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert browser_check.expected_outputs(path) == {"plotly": 2, "circuitsvis": 1, "widgets": 1}


def test_makefile_has_the_target_and_make_test_does_not_run_it():
    makefile = (ROOT / "Makefile").read_text()
    assert "browser-check: setup\n\t$(PY) scripts/browser_check.py $(NOTEBOOKS)" in makefile
    test_recipe = makefile.split("\ntest: setup\n", 1)[1].split("\n\n", 1)[0]
    assert "browser_check" not in test_recipe
