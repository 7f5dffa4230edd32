"""Execute the study notebooks headless and collect their results (what `make reproduce` runs).

For each notebook, serially (two torch processes on 2 cores slow each other several times over):
  * execute it cell by cell with a progress bar, in the profile given by MI_PROFILE;
  * write the executed notebook back in place (committed outputs come from the `embedded` run)
    and a copy into figures/executed/, with the widget state saved and each progress bar's text
    fallback showing where it ended (scripts/progress_bars.py);
  * the notebook itself saves its figures (PNG + HTML) and its "paper vs. this run" table under figures/.
Each run is stamped (profile, model switch, date, git commit, device, package versions) in
figures/results/<notebook>.run.json; figures/RESULTS.md is then rebuilt from the latest run of every
notebook, so notebooks can also be reproduced one at a time (make reproduce NOTEBOOKS=notebooks/….ipynb).

The model switch MI_MODEL (helpers.profiles.get_embedded_model): a run on a model other than the
default SmolLM2 (e.g. MI_MODEL=gemma-3-270m) leaves the committed notebooks untouched and writes
everything under figures/<model>/ instead: executed/<notebook>.ipynb, the notebooks' figures,
results/<notebook>.{md,json,run.json} and its own RESULTS.md. figures/RESULTS.md then gains, per study,
a cross-model table (paper | default model | each other model) built from those results files.

A notebook whose assertion fails (a paper's claim that does not hold on this model) is reported as
FAILED with the assertion's message; its results table, which the notebooks show before asserting,
is still listed, under that message.

Usage: python scripts/reproduce.py [notebooks/01_….ipynb ...]   (default: every notebook)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.profiles import EMBEDDED_MODELS, get_embedded_model, get_profile, output_subdir  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from progress_bars import finish_progress_bars  # noqa: E402
PACKAGES = ("torch", "transformer-lens", "transformers", "circuitsvis", "plotly", "einops", "gguf", "peft",
            "nbval", "jupyterlab", "kaleido", "numpy")
MAX_NOTEBOOK_BYTES = 2_000_000
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without terminal colour codes (IPython colours the exception names in tracebacks)."""
    return _ANSI.sub("", text)


def execute(path: Path, timeout: int, output: Path | None = None) -> tuple[bool, float, str]:
    """Run every cell of ``path`` and write the executed notebook to ``output`` (default: in place);
    return (ok, seconds, error summary)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    started = time.perf_counter()
    error = ""
    code_cells = [(i, c) for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    with client.setup_kernel():
        for index, cell in tqdm(code_cells, desc=path.stem, unit="cell", leave=True):
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as err:
                error = plain(str(err).strip().splitlines()[-1]) if str(err).strip() else type(err).__name__
                break
            except CellTimeoutError:  # reported like a failed cell, not a crash that loses the whole run
                error = f"CellTimeoutError: code cell {index} ran longer than --timeout={timeout} s"
                break
    seconds = time.perf_counter() - started
    # Cell by cell, nbclient does not save the widget state itself (its execute() would): keep it, so
    # JupyterLab draws the progress bars as they ended, and write each bar's text fallback from it.
    client.set_widgets_metadata()
    finish_progress_bars(notebook)
    nbformat.write(notebook, output or path)
    return not error, seconds, error


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def record_run(figures: Path, path: Path, ok: bool, seconds: float, error: str, commit: str | None = None,
               table_written: bool = False) -> None:
    """Stamp one notebook's run (kept beside its results table, so runs of single notebooks add up).

    ``commit`` is the checkout the run started from (the executed notebook itself is rewritten by the run);
    ``table_written``: this run wrote the notebook's results table (also true of a run that then failed an
    assertion).
    """
    stamp = {
        "notebook": path.stem,
        "ok": ok,
        "error": error,
        "table_written": table_written or ok,
        "minutes": round(seconds / 60, 2),
        "profile": os.environ.get("MI_PROFILE", "paper"),
        "mi_model": model_switch(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit or git_commit(),
        "device": device(),
        "python": platform.python_version(),
        "packages": versions(),
    }
    (figures / "results").mkdir(parents=True, exist_ok=True)
    (figures / "results" / f"{path.stem}.run.json").write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


def model_switch() -> str | None:
    """The MI_MODEL choice of this run (``None`` in the paper profile, where it is not used)."""
    return get_embedded_model().name if get_profile().uses_embedded_model else None


def write_results(figures: Path, notebooks: list[Path]) -> Path:
    """figures/RESULTS.md from every notebook's latest recorded run and results table."""
    stamps = {}
    for path in notebooks:
        run_file = figures / "results" / f"{path.stem}.run.json"
        stamps[path.stem] = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else None
    lines = [
        "# Results: paper vs. this run",
        "",
        "Written by `make reproduce` (scripts/reproduce.py) from each notebook's latest run; every number",
        "below comes from that run. Each table names its profile, model, device and seed.",
        "",
        # which model's folder this is, not which MI_MODEL is set: a Gemma run rewrites both RESULTS.md files
        *([f"These runs used `MI_MODEL={figures.name}`; the default model's results are in figures/RESULTS.md.", ""]
          if figures != base_figures(figures) else []),
        "| notebook | status | profile | wall time | date | git commit | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in notebooks:
        stamp = stamps[path.stem]
        if stamp is None:
            lines.append(f"| {path.stem} | not run yet | | | | | |")
            continue
        status = "ran" if stamp["ok"] else f"FAILED: {plain(stamp['error'])[:120]}"
        lines.append(f"| {path.stem} | {status} | `{stamp['profile']}` | {stamp['minutes']:.1f} min | {stamp['date']} "
                     f"| {stamp['git_commit']} | {stamp['device']} |")
    packages = sorted({(s["python"], s["packages"]) for s in stamps.values() if s})
    lines += ["", "Software: " + "; ".join(f"python {py}, {pk}" for py, pk in packages) if packages else ""]
    for path in notebooks:
        table = figures / "results" / f"{path.stem}.md"
        stamp = stamps[path.stem]
        lines += ["", f"## {path.stem}", ""]
        if stamp and stamp.get("table_written", stamp["ok"]) and table.is_file():
            if not stamp["ok"]:
                lines += [f"**The run stopped with:** `{plain(stamp['error'])}` (the table below was written before that).", ""]
            lines.append(table.read_text(encoding="utf-8").strip())
        else:
            lines.append("_No results table: the notebook has not finished a run yet._")
        if figures == base_figures(figures):
            lines += cross_model_table(figures, path.stem)
    target = figures / "RESULTS.md"
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def base_figures(figures: Path) -> Path:
    """The default model's figures folder of ``figures`` (itself, or its parent for figures/<model>/)."""
    return figures.parent if figures.name in OTHER_MODELS else figures


OTHER_MODELS = tuple(choice.name for choice in EMBEDDED_MODELS if not choice.is_default)


def _rows(results_json: Path) -> tuple[dict, dict[str, dict]] | None:
    if not results_json.is_file():
        return None
    payload = json.loads(results_json.read_text(encoding="utf-8"))
    return payload, {row["quantity"]: row for row in payload["rows"]}


def cross_model_table(figures: Path, notebook: str) -> list[str]:
    """Markdown lines: one notebook's results on every model that has a results table for it.

    Rows are matched by their quantity label (the notebooks build the same rows on every model); a
    quantity one model's run did not produce shows "–". The notes carry the model-specific details
    (which head, which neuron) and are kept per model. Empty when no other model has run the notebook.
    """
    columns = [("default", figures / "results" / f"{notebook}.json")]
    columns += [(name, figures / name / "results" / f"{notebook}.json") for name in OTHER_MODELS]
    loaded = [(name, _rows(path), figures / (name if name != "default" else "") / "results" / f"{notebook}.run.json")
              for name, path in columns]
    stopped = []  # other models whose run stopped before the table was written
    for name, rows, run_file in loaded[1:]:
        if rows is None and run_file.is_file():
            run = json.loads(run_file.read_text(encoding="utf-8"))
            if not run.get("ok", True):
                stopped.append(f"- {name}: profile `{run['profile']}`, {run['date']}, {run['git_commit']}: the run stopped "
                               f"before its results table with `{plain(run['error'])}`")
    loaded = [(name, rows, run) for name, rows, run in loaded if rows is not None]
    if len(loaded) < 2:
        return ["", f"### {notebook} across models", "", *stopped] if stopped else []
    order: list[str] = []
    for _, (_, by_quantity), _ in loaded:
        order += [q for q in by_quantity if q not in order]
    header, stamps = [], []
    for name, (payload, _), run_file in loaded:
        label = payload["model"].split(" (")[0]
        header.append(label)
        run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
        status = "ran" if run.get("ok", True) else f"assertion failed: {plain(run.get('error', ''))[:160]}"
        stamps.append(f"{label}: profile `{payload['profile']}`, {run.get('date', 'date unknown')}, "
                      f"{run.get('git_commit', 'commit unknown')}, {payload['device']}; {status}")
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")
    lines = ["", f"### {notebook} across models", "",
             *[f"- {stamp}" for stamp in stamps], "",
             "| quantity | paper | " + " | ".join(header) + " | notes |",
             "|---|---|" + "---|" * len(header) + "---|"]
    for quantity in order:
        rows = [by_quantity.get(quantity) for _, (_, by_quantity), _ in loaded]
        paper = next((r["paper"] for r in rows if r is not None), "–")
        values = [r["this_run"] if r is not None else "–" for r in rows]
        given = [(h, r["note"]) for h, r in zip(header, rows) if r is not None and r["note"]]
        if len(given) == len(loaded) and len({note for _, note in given}) == 1:
            notes = given[0][1]  # the same note on every model: once
        else:
            notes = "; ".join(f"{h}: {note}" for h, note in given)
        lines.append("| " + " | ".join(cell(c) for c in [quantity, paper, *values, notes]) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    args = parser.parse_args()
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    os.environ.setdefault("MI_PROFILE", "embedded")
    switch, subdir = model_switch(), output_subdir()  # fail at once on a bad MI_PROFILE / MI_MODEL
    base = Path(os.environ.setdefault("MI_FIGURES_DIR", str(ROOT / "figures")))
    figures = base / subdir if subdir else base  # where the notebooks' own figures_dir() writes too
    (figures / "executed").mkdir(parents=True, exist_ok=True)

    runs = []
    commit = git_commit()  # before the runs rewrite the notebooks in place
    for number, path in enumerate(paths, start=1):
        label = f"profile {os.environ['MI_PROFILE']}" + (f", MI_MODEL={switch}" if switch else "")
        print(f"\n[{number}/{len(paths)}] {path.name} ({label})", flush=True)
        executed = figures / "executed" / path.name
        started = time.time()
        if subdir:  # another model: the committed notebook (the default model's outputs) stays as it is
            ok, seconds, error = execute(path, args.timeout, output=executed)
        else:
            ok, seconds, error = execute(path, args.timeout)
            shutil.copy2(path, executed)
        size = executed.stat().st_size
        print(f"    {'done' if ok else 'FAILED'} in {seconds / 60:.1f} min; notebook size {size / 1e6:.2f} MB"
              + (f"; error: {error}" if error else ""), flush=True)
        if size > MAX_NOTEBOOK_BYTES:
            print(f"    !! {path.name} is over {MAX_NOTEBOOK_BYTES / 1e6:.0f} MB with outputs", flush=True)
        table = figures / "results" / f"{path.stem}.json"
        table_written = table.is_file() and table.stat().st_mtime >= started
        record_run(figures, path, ok, seconds, error, commit, table_written)
        runs.append(ok)
    all_notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    targets = [write_results(figures, all_notebooks)]
    if subdir:  # the default model's RESULTS.md carries the cross-model tables
        targets.append(write_results(base, all_notebooks))
    for target in targets:
        print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    return 0 if all(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
