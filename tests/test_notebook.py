import json

import pytest
import torch

from helpers.models import EMBEDDED_DISPLAY_NAME, GEMMA_DISPLAY_NAME
from helpers.notebook import ResultsTable, start


def test_start_prints_profile_model_device_and_seed(capsys, monkeypatch):
    monkeypatch.delenv("MI_MODEL", raising=False)
    run = start("00_test", paper_model="gpt2", seed=7, profile="ci")
    out = capsys.readouterr().out
    for expected in ("profile:  ci", EMBEDDED_DISPLAY_NAME, "MI_MODEL: smollm2 (default)", f"device:   {run.device}",
                     "seed:     7"):
        assert expected in out
    assert run.model_name == "embedded"
    assert start("00_test", paper_model="gpt2", profile="paper").model_name == "gpt2"


def test_start_seeds_torch():
    start("00_test", paper_model=None, seed=3, profile="ci")
    a = torch.rand(3)
    start("00_test", paper_model=None, seed=3, profile="ci")
    assert torch.equal(a, torch.rand(3))


def test_results_table_is_displayed_and_written(monkeypatch, tmp_path):
    monkeypatch.delenv("MI_MODEL", raising=False)
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


def test_model_switch_picks_gemma_prints_it_and_sends_outputs_to_its_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MI_MODEL", "gemma-3-270m")
    monkeypatch.setenv("MI_PROFILE", "ci")
    monkeypatch.setenv("MI_FIGURES_DIR", str(tmp_path))
    monkeypatch.setattr("IPython.display.display", lambda obj: None)
    run = start("00_test", paper_model="gpt2")
    out = capsys.readouterr().out
    assert run.model_name == "gemma-3-270m" and run.embedded_model == "gemma-3-270m"
    assert GEMMA_DISPLAY_NAME in out and "MI_MODEL: gemma-3-270m (outputs under figures/gemma-3-270m/)" in out
    ResultsTable(run).add("x", paper=1, this_run=2).show()
    payload = json.loads((tmp_path / "gemma-3-270m" / "results" / "00_test.json").read_text())
    assert payload["mi_model"] == "gemma-3-270m" and GEMMA_DISPLAY_NAME in payload["model"]
    assert not (tmp_path / "results").exists(), "a Gemma run must not write where SmolLM2's results are"
    paper = start("00_test", paper_model="gpt2", profile="paper")
    assert paper.model_name == "gpt2" and paper.embedded_model is None
    assert "MI_MODEL: not used in the paper profile" in capsys.readouterr().out


def test_bad_model_switch_stops_start_with_the_choices(monkeypatch):
    from helpers.profiles import ModelChoiceError

    monkeypatch.setenv("MI_MODEL", "gemma-7b")
    with pytest.raises(ModelChoiceError, match="smollm2.*gemma-3-270m"):
        start("00_test", paper_model="gpt2", profile="ci")
