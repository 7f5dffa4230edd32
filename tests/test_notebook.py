import json

import torch

from helpers.models import EMBEDDED_DISPLAY_NAME
from helpers.notebook import ResultsTable, start


def test_start_prints_profile_model_device_and_seed(capsys):
    run = start("00_test", paper_model="gpt2", seed=7, profile="ci")
    out = capsys.readouterr().out
    for expected in ("profile:  ci", EMBEDDED_DISPLAY_NAME, f"device:   {run.device}", "seed:     7"):
        assert expected in out
    assert run.model_name == "embedded"
    assert start("00_test", paper_model="gpt2", profile="paper").model_name == "gpt2"


def test_start_seeds_torch():
    start("00_test", paper_model=None, seed=3, profile="ci")
    a = torch.rand(3)
    start("00_test", paper_model=None, seed=3, profile="ci")
    assert torch.equal(a, torch.rand(3))


def test_results_table_is_displayed_and_written(monkeypatch, tmp_path):
    monkeypatch.setenv("MI_FIGURES_DIR", str(tmp_path))
    monkeypatch.setattr("IPython.display.display", lambda obj: None)
    run = start("00_test", paper_model="gpt2", profile="ci")
    table = ResultsTable(run)
    table.add("mean logit diff", paper=3.56, this_run=torch.tensor(4.2345), note="a | b")
    table.add("heads", paper=["9.9", "10.0"], this_run=None)
    table.show()
    markdown = (tmp_path / "results" / "00_test.md").read_text()
    assert "| mean logit diff | 3.56 | 4.234 | a \\| b |" in markdown or "| mean logit diff | 3.56 | 4.235 | a \\| b |" in markdown
    assert "| heads | 9.9, 10.0 | – |" in markdown
    assert "profile `ci`" in markdown
    payload = json.loads((tmp_path / "results" / "00_test.json").read_text())
    assert payload["profile"] == "ci" and len(payload["rows"]) == 2
