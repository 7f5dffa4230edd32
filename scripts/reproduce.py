"""Execute the study notebooks headless and collect their results (what `make reproduce` runs).

For each notebook, serially (two torch processes on 2 cores slow each other several times over):
  * execute it cell by cell with a progress bar, in the profile given by MI_PROFILE;
  * write the executed notebook back in place (committed outputs come from the `embedded` run)
    and a copy into figures/executed/;
  * the notebook itself saves its figures (PNG + HTML) and its "paper vs. this run" table under figures/.
Then write figures/RESULTS.md: every notebook's table, stamped with profile, models, device, package
versions, machine and git commit.

Usage: python scripts/reproduce.py [notebooks/01_….ipynb ...]   (default: every notebook)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformer-lens", "transformers", "circuitsvis", "plotly", "einops", "gguf", "peft",
            "nbval", "jupyterlab", "kaleido", "numpy")
MAX_NOTEBOOK_BYTES = 2_000_000


def execute(path: Path, timeout: int) -> tuple[bool, float, str]:
    """Run every cell of ``path`` in place; return (ok, seconds, error summary)."""
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
                error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                break
    seconds = time.perf_counter() - started
    nbformat.write(notebook, path)
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


def write_results(figures: Path, runs: list[tuple[Path, bool, float, str]]) -> Path:
    profile = os.environ.get("MI_PROFILE", "paper")
    lines = [
        "# Results: paper vs. this run",
        "",
        "Written by `make reproduce` (scripts/reproduce.py); every number below comes from that run.",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- profile: `{profile}`",
        f"- device: {device()}",
        f"- git commit: {git_commit()}",
        f"- python {platform.python_version()} on {platform.platform()}",
        f"- packages: {versions()}",
        "",
        "| notebook | status | wall time |",
        "|---|---|---|",
    ]
    for path, ok, seconds, error in runs:
        status = "ran" if ok else f"FAILED: {error[:120]}"
        lines.append(f"| {path.stem} | {status} | {seconds / 60:.1f} min |")
    for path, ok, _, _ in runs:
        table = figures / "results" / f"{path.stem}.md"
        lines += ["", f"## {path.stem}", ""]
        if table.is_file() and ok:
            lines.append(table.read_text(encoding="utf-8").strip())
        else:
            lines.append("_No results table: the notebook did not finish in this run._")
    target = figures / "RESULTS.md"
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


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
    figures = Path(os.environ.setdefault("MI_FIGURES_DIR", str(ROOT / "figures")))
    (figures / "executed").mkdir(parents=True, exist_ok=True)

    runs = []
    for number, path in enumerate(paths, start=1):
        print(f"\n[{number}/{len(paths)}] {path.name} (profile {os.environ['MI_PROFILE']})", flush=True)
        ok, seconds, error = execute(path, args.timeout)
        shutil.copy2(path, figures / "executed" / path.name)
        size = path.stat().st_size
        print(f"    {'done' if ok else 'FAILED'} in {seconds / 60:.1f} min; notebook size {size / 1e6:.2f} MB"
              + (f"; error: {error}" if error else ""), flush=True)
        if size > MAX_NOTEBOOK_BYTES:
            print(f"    !! {path.name} is over {MAX_NOTEBOOK_BYTES / 1e6:.0f} MB with outputs", flush=True)
        runs.append((path, ok, seconds, error))
    target = write_results(figures, runs)
    print(f"\nwrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    return 0 if all(ok for _, ok, _, _ in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
