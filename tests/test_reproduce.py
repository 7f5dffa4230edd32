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


def _results(folder: Path, notebook: str, model: str, rows: list[tuple[str, str, str, str]]) -> None:
    (folder / "results").mkdir(parents=True, exist_ok=True)
    payload = {"notebook": notebook, "profile": "embedded", "model": f"{model} (some detail)", "device": "cpu",
               "seed": 0, "rows": [dict(zip(("quantity", "paper", "this_run", "note"), r)) for r in rows]}
    (folder / "results" / f"{notebook}.json").write_text(json.dumps(payload))
    (folder / "results" / f"{notebook}.md").write_text("| quantity | paper | this run | note |\n|---|---|---|---|\n")


def test_results_gain_a_cross_model_table_matched_by_quantity(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PROFILE", "embedded")
    monkeypatch.setenv("MI_MODEL", "gemma-3-270m")  # as in the Gemma run, which rewrites both RESULTS.md files
    figures = tmp_path / "figures"
    notebook = Path("05_x.ipynb")
    _results(figures, "05_x", "SmolLM2-135M-Instruct",
             [("top head DE", "2.7", "2.8", "L26H8"), ("LN share", "0.32", "0.22", "from the arrays"), ("only smol", "1", "3", "")])
    _results(figures / "gemma-3-270m", "05_x", "Gemma-3-270M",
             [("top head DE", "2.7", "1.9", "L15H2"), ("LN share", "0.32", "0.41", "from the arrays"), ("only gemma", "–", "7", "")])
    reproduce.record_run(figures, notebook, True, 60.0, "")
    reproduce.record_run(figures / "gemma-3-270m", notebook, False, 60.0, "AssertionError: no self-repair",
                         table_written=True)
    base_text = reproduce.write_results(figures, [notebook]).read_text()
    assert "| quantity | paper | SmolLM2-135M-Instruct | Gemma-3-270M | notes |" in base_text
    assert "| top head DE | 2.7 | 2.8 | 1.9 | SmolLM2-135M-Instruct: L26H8; Gemma-3-270M: L15H2 |" in base_text
    assert "| LN share | 0.32 | 0.22 | 0.41 | from the arrays |" in base_text  # one note shared by both: once
    assert "| only smol | 1 | 3 | – |" in base_text and "| only gemma | – | – | 7 |" in base_text
    assert "assertion failed: AssertionError: no self-repair" in base_text
    assert "These runs used `MI_MODEL=" not in base_text  # the default model's file says nothing of the kind
    # the other model's own RESULTS.md lists its table under the failure, and has no cross-model table
    other_text = reproduce.write_results(figures / "gemma-3-270m", [notebook]).read_text()
    assert "**The run stopped with:** `AssertionError: no self-repair`" in other_text
    assert "across models" not in other_text
    assert "These runs used `MI_MODEL=gemma-3-270m`" in other_text


def test_no_cross_model_table_for_one_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PROFILE", "embedded")
    figures = tmp_path / "figures"
    _results(figures, "05_x", "SmolLM2-135M-Instruct", [("a", "1", "2", "")])
    reproduce.record_run(figures, Path("05_x.ipynb"), True, 60.0, "")
    assert "across models" not in reproduce.write_results(figures, [Path("05_x.ipynb")]).read_text()


def test_a_cell_that_runs_too_long_is_a_failed_run_not_a_crash(tmp_path):
    import nbformat

    source = tmp_path / "slow.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import time; time.sleep(30)")]), source)
    ok, _, error = reproduce.execute(source, timeout=2, output=tmp_path / "out.ipynb")
    assert not ok and error.startswith("CellTimeoutError: code cell 0")
    assert (tmp_path / "out.ipynb").is_file()


def test_colour_codes_are_stripped_from_errors():
    assert reproduce.plain("\x1b[31mAssertionError\x1b[39m: no self-repair") == "AssertionError: no self-repair"


def test_another_models_run_that_stopped_before_its_table_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PROFILE", "ci")
    figures = tmp_path / "figures"
    _results(figures, "02_x", "SmolLM2-135M-Instruct", [("a", "1", "2", "")])
    reproduce.record_run(figures, Path("02_x.ipynb"), True, 60.0, "")
    reproduce.record_run(figures / "gemma-3-270m", Path("02_x.ipynb"), False, 60.0, "AssertionError: no name mover")
    text = reproduce.write_results(figures, [Path("02_x.ipynb")]).read_text()
    assert "gemma-3-270m: profile `ci`" in text and "AssertionError: no name mover" in text
