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


def test_run_stamp_names_the_model_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PROFILE", "ci")
    monkeypatch.setenv("MI_MODEL", "gemma3")
    reproduce.record_run(tmp_path, Path("02_x.ipynb"), True, 60.0, "")
    assert json.loads((tmp_path / "results" / "02_x.run.json").read_text())["mi_model"] == "gemma-3-270m"
    monkeypatch.delenv("MI_MODEL")
    reproduce.record_run(tmp_path, Path("02_x.ipynb"), True, 60.0, "")
    assert json.loads((tmp_path / "results" / "02_x.run.json").read_text())["mi_model"] == "smollm2"
    monkeypatch.setenv("MI_PROFILE", "paper")
    reproduce.record_run(tmp_path, Path("02_x.ipynb"), True, 60.0, "")
    assert json.loads((tmp_path / "results" / "02_x.run.json").read_text())["mi_model"] is None


def test_another_models_run_leaves_the_committed_notebook_alone(tmp_path):
    import nbformat

    source = tmp_path / "nb.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(notebook, source)
    before = source.read_bytes()
    executed = tmp_path / "gemma-3-270m" / "executed" / "nb.ipynb"
    executed.parent.mkdir(parents=True)
    ok, _, error = reproduce.execute(source, timeout=120, output=executed)
    assert ok and not error
    assert source.read_bytes() == before
    assert "42" in executed.read_text()
