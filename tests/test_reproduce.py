"""scripts/reproduce.py: per-notebook run stamps add up to one RESULTS.md."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_results_collects_every_notebook_with_its_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PROFILE", "embedded")
    figures = tmp_path / "figures"
    (figures / "results").mkdir(parents=True)
    done, failed, never = Path("01_done.ipynb"), Path("02_failed.ipynb"), Path("03_never.ipynb")
    (figures / "results" / "01_done.md").write_text("| quantity | paper | this run | note |\n|---|---|---|---|\n| x | 1 | 2 | |\n")
    reproduce.record_run(figures, done, True, 90.0, "")
    reproduce.record_run(figures, failed, False, 30.0, "AssertionError: the science broke")
    stamp = json.loads((figures / "results" / "01_done.run.json").read_text())
    assert stamp["profile"] == "embedded" and stamp["minutes"] == 1.5 and stamp["git_commit"]
    text = reproduce.write_results(figures, [done, failed, never]).read_text()
    assert "| x | 1 | 2 | |" in text
    assert "FAILED: AssertionError: the science broke" in text
    assert "| 03_never | not run yet |" in text
    assert "torch" in text  # package versions are stamped
