"""The project's own plumbing: pins agree, Colab links are in sync, CI calls the README's command."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements):
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s;]+)\s*", requirement)
        assert match, f"{requirement!r} is not pinned with =="
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _pins(project["dependencies"] + project["optional-dependencies"]["dev"])


def test_environment_yml_lists_the_same_pins_as_pyproject():
    text = (ROOT / "environment.yml").read_text()
    pip_lines = re.findall(r"^\s+- ([A-Za-z0-9_.\-]+==\S+)\s*$", text, flags=re.M)
    assert _pins(pip_lines) == _pyproject_pins()


def test_lock_file_agrees_with_pyproject_pins():
    lock = _pins([l for l in (ROOT / "requirements" / "lock.txt").read_text().splitlines() if l and not l.startswith("#")])
    for name, version in _pyproject_pins().items():
        assert lock.get(name) == version, f"{name}: pyproject {version}, lock {lock.get(name)}"


def test_required_stack_is_pinned():
    pins = _pyproject_pins()
    for name in ("torch", "transformer-lens", "transformers", "circuitsvis", "plotly", "nbval", "einops", "gguf", "jupyterlab"):
        assert name in pins, f"{name} must be pinned in pyproject.toml"


def test_colab_links_and_setup_cells_are_in_sync():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "colab.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ci[-1] == "make test"
    assert "make test" in (ROOT / "README.md").read_text()
    assert re.search(r"^test: setup$", (ROOT / "Makefile").read_text(), flags=re.M)


def test_every_notebook_starts_with_the_setup_cell_and_stays_small():
    import json

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        first = "".join(notebook["cells"][0]["source"])
        assert 'if "google.colab" in sys.modules:' in first, f"{path.name}: first cell must be the setup cell"
        assert path.stat().st_size < 2_000_000, f"{path.name} is over 2 MB"
        code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
        assert "/work/shared" not in code and "../shared" not in code, f"{path.name} reads shared/ at run time"


def test_no_import_cycle_in_helpers():
    """No module of ``helpers`` imports another that (directly or not) imports it back, counting the
    imports inside functions too: the refusal study and its safety tuning share their data through
    ``helpers.studies.refusal.data`` instead of importing each other."""
    import ast

    modules = {p.stem: p for p in (ROOT / "helpers").glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
                parts = node.module.split(".")
                graph[name] |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                assert nxt != start, "import cycle: " + " -> ".join(path + [nxt])
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
