"""The project's own plumbing: pins agree, Colab links are in sync, CI calls the README's command."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements):
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s;]+)\s*", requirement)
        assert match, f"{requirement!r} is not pinned with =="
        pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_ranges() -> dict[str, SpecifierSet]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        ranges[_normalise(requirement.name)] = requirement.specifier
    return ranges


def _lock() -> dict[str, str]:
    lines = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    return _pins([line for line in lines if line and not line.startswith("#")])


# Direct dependencies whose lower bound is one minor release below the locked version, so the package
# installs beside the numpy / pandas Colab ships (the unit tests that use them were run on those).
ADMITS_PREVIOUS_MINOR = {"numpy", "pandas"}


def test_every_direct_dependency_is_a_range_with_a_lower_and_an_upper_bound():
    for name, spec in _pyproject_ranges().items():
        operators = sorted(s.operator for s in spec)
        assert operators == ["<", ">="], f"{name}: expected '>=tested,<next breaking release', got {str(spec)!r}"


def test_lock_file_lies_in_the_pyproject_ranges_at_their_lower_bounds():
    lock = _lock()
    for name, spec in _pyproject_ranges().items():
        assert name in lock, f"{name} is a direct dependency but not in requirements/lock.txt"
        locked = Version(lock[name])
        assert locked in spec, f"{name}: locked {locked} is outside pyproject's {spec}"
        lower = next(Version(s.version) for s in spec if s.operator == ">=")
        upper = next(Version(s.version) for s in spec if s.operator == "<")
        if name in ADMITS_PREVIOUS_MINOR:
            assert (lower.major, lower.minor) == (locked.major, locked.minor - 1) and lower.micro == 0, (
                f"{name}: lower bound {lower} should be the previous minor release of the locked {locked}")
        else:
            assert lower == locked, f"{name}: lower bound {lower} must be the tested (locked) version {locked}"
        # The upper bound is the next release that may break the API: next major, next minor for 0.x
        # (gensim, whose shipped data file may change in any minor release, next minor too).
        next_minor = locked.major == 0 or name == "gensim"
        breaking = Version(f"{locked.major}.{locked.minor + 1}" if next_minor else f"{locked.major + 1}")
        assert upper == breaking, f"{name}: upper bound {upper}, expected {breaking} for locked {locked}"


def test_environment_yml_pins_the_locked_versions_of_every_direct_dependency():
    # environment.yml creates a fresh, dedicated environment (nothing preinstalled to keep), so it pins
    # the tested stack exactly: the lock file's versions, which lie in pyproject's ranges.
    text = (ROOT / "environment.yml").read_text()
    pip_lines = re.findall(r"^\s+- ([A-Za-z0-9_.\-]+==\S+)\s*$", text, flags=re.M)
    pins, lock, ranges = _pins(pip_lines), _lock(), _pyproject_ranges()
    assert set(pins) == set(ranges), f"environment.yml vs pyproject: {set(pins) ^ set(ranges)}"
    for name, version in pins.items():
        assert version == lock[name], f"environment.yml {name}=={version}, lock {lock[name]}"
    python = re.search(r"^\s+- python=(\S+)\s*$", text, flags=re.M)
    assert python and Version(python.group(1)) in SpecifierSet(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])


def test_requires_python_has_no_upper_cap_below_4():
    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    for python in ("3.11", "3.12", "3.13", "3.14"):
        assert Version(python) in spec, f"requires-python {spec} refuses Python {python}"
    assert Version("3.10") not in spec  # numpy, pandas, transformers and jaxtyping need 3.11


def test_required_stack_is_declared():
    ranges = _pyproject_ranges()
    for name in ("torch", "transformer-lens", "transformers", "circuitsvis", "plotly", "nbval", "einops", "gguf", "jupyterlab"):
        assert name in ranges, f"{name} must be a dependency in pyproject.toml"


def test_make_setup_installs_with_the_lock_as_constraints():
    setup = (ROOT / "Makefile").read_text().split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    installs = [line for line in setup.splitlines() if "$(PIP) install" in line and "--upgrade" not in line]
    pinned = [line for line in installs if "-e \".[dev]\"" in line or "torch==" in line]
    assert pinned and all("-c requirements/lock.txt" in line for line in pinned), setup


def test_colab_links_and_setup_cells_are_in_sync():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "colab.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ci[-1] == "make test"
    assert "make test" in (ROOT / "README.md").read_text()
    assert re.search(r"^test: setup$", (ROOT / "Makefile").read_text(), flags=re.M)


def test_make_benchmarks_runs_every_benchmark_script():
    target = (ROOT / "Makefile").read_text().split("\nbenchmarks: setup\n", 1)[1].split("\n\n", 1)[0]
    scripts = {path.name for path in (ROOT / "benchmarks").glob("*.py")}
    run = set(re.findall(r"benchmarks/(\w+\.py)", target))
    assert scripts and run == scripts, f"`make benchmarks` runs {sorted(run)}, benchmarks/ has {sorted(scripts)}"


def test_every_notebook_starts_with_the_setup_cell_and_stays_small():
    import json

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        first = "".join(notebook["cells"][0]["source"])
        assert 'if "google.colab" in sys.modules:' in first, f"{path.name}: first cell must be the setup cell"
        assert path.stat().st_size < 2_000_000, f"{path.name} is over 2 MB"
        code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
        assert "/work/shared" not in code and "../shared" not in code, f"{path.name} reads shared/ at run time"


def test_every_notebook_is_valid_nbformat_with_unique_cell_ids():
    """nbformat 4.5 requires an id on every cell (a missing one is a warning today, an error in later nbformat)."""
    import warnings

    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
            nbformat.validate(notebook)
        ids = [cell.get("id") for cell in notebook.cells]
        assert None not in ids and len(set(ids)) == len(ids), f"{path.name}: missing or repeated cell ids"


def _helpers_modules() -> dict[str, Path]:
    """Every module of ``helpers`` by its dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted((ROOT / "helpers").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the ``helpers`` modules it imports, parsed with ``ast`` (nothing is imported).

    Every import statement counts, at module level or inside a function: a deferred import only moves
    the failure of a cycle from import time to call time, and still ties the two modules together.
    ``from a.b import c`` is an import of the module ``a.b.c`` when there is one, else of ``a.b``.
    Importing a module also runs the packages above it, so those count too, except the importing
    module's own packages (they are already being imported when it runs)."""
    import ast

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        explicit: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                explicit |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x, from ..a import y
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    explicit.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        edges = set()
        for target in explicit:
            if target.split(".")[0] != "helpers":
                continue
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in own_packages}
            edges.add(target)
        graph[name] = {target for target in edges if target in modules and target != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_finds_and_names_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_every_module_and_function_level_imports():
    modules = _helpers_modules()
    for name in ("helpers.models", "helpers.patching", "helpers.patching.engine", "helpers.labelled_tensor",
                 "helpers.studies.grokking.fourier", "helpers.studies.refusal.safety_tuning", "helpers.studies.ioi"):
        assert name in modules, name
    graph = _import_graph(modules)
    assert "helpers.studies.refusal.data" in graph["helpers.studies.refusal.safety_tuning"]  # module level
    assert "helpers.studies.refusal.safety_tuning" in graph["helpers.studies.refusal.direction"]  # in a function
    assert "helpers.plotting" in graph["helpers.labelled_tensor"]  # in a method
    # importing helpers.patching.engine runs helpers.patching's __init__ first
    assert {"helpers.patching", "helpers.patching.engine"} <= graph["helpers.attribution"]
    assert "helpers.patching" not in graph["helpers.patching.engine"]  # its own package: already importing


def test_no_import_cycle_in_helpers():
    """No module of ``helpers`` (studies and subpackages included) imports another that, directly or
    not, imports it back — counting the imports inside functions too (see :func:`_import_graph`). The
    refusal study and its safety tuning, for instance, share their data through
    ``helpers.studies.refusal.data`` instead of importing each other."""
    cycle = _find_cycle(_import_graph(_helpers_modules()))
    assert cycle is None, "import cycle in helpers: " + " -> ".join(cycle)


def test_toolkit_does_not_import_the_studies():
    """The toolkit (``helpers.<module>``) is what a researcher imports for their own work: it must not
    depend on any study's code (``helpers.studies``); studies import the toolkit."""
    graph = _import_graph(_helpers_modules())
    offenders = {name: sorted(t for t in targets if t.startswith("helpers.studies"))
                 for name, targets in graph.items() if not name.startswith("helpers.studies")}
    assert not {name: t for name, t in offenders.items() if t}, offenders


def test_committed_progress_bars_are_finished_or_absent():
    """A tqdm bar whose widget state was not saved shows its creation-time fallback ("0%| 0/90") on GitHub
    and in JupyterLab alike: scripts/progress_bars.py (run by scripts/reproduce.py) finishes or drops them."""
    import json

    view = "application/vnd.jupyter.widget-view+json"
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        state = notebook.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
        saved = set(state.get("state", {}))
        for index, cell in enumerate(notebook["cells"]):
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if view in data:
                    assert data[view]["model_id"] in saved, f"{path.name} cell {index}: a widget output without saved state"
                    assert not re.search(r"\b0%\|", "".join(data.get("text/plain", ""))), (
                        f"{path.name} cell {index}: a progress bar reads 0%; run scripts/progress_bars.py on it")


def test_importing_every_helpers_module_emits_no_warning():
    """A warning at import time (a stray decorator, a deprecated API) reaches every user; none is allowed."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    modules = sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in (root / "helpers").rglob("*.py"))
    modules = [m.removesuffix(".__init__") for m in modules]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def _load_file(path: Path, name: str):
    """The Python file at ``path`` imported as a module called ``name`` (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _safety_recipes_script():
    return _load_file(ROOT / "scripts" / "safety_recipes.py", "safety_recipes")


def test_safety_recipes_table_is_built_from_every_shipped_evaluation():
    """helpers/data/refusal/safety_recipes.md is what scripts/safety_recipes.py builds from the shipped
    helpers/data/refusal/recipes/<name>/ copies (not from build/, which a fresh checkout lacks): every
    evaluated recipe has its row, so evaluating one recipe cannot drop the others'."""
    recipes = _safety_recipes_script()
    assert recipes.SHIPPED == ROOT / "helpers" / "data" / "refusal" / "recipes"
    committed = recipes.TABLE.read_text()
    assert committed == recipes.table_text(), "safety_recipes.md is stale: run python scripts/safety_recipes.py --table-only"
    shipped = sorted(p.parent.name for p in recipes.SHIPPED.glob("*/eval.json"))
    assert len(shipped) >= 2
    for name in shipped:
        assert name in recipes.RECIPES, f"shipped recipe {name} is no longer defined in scripts/safety_recipes.py"
        assert f"| **{name}**:" in committed, f"evaluated recipe {name} has no row in safety_recipes.md"


def test_the_shipped_recipe_is_what_make_safety_adapter_trains():
    """The recipe the table marks as shipped is SafetyTuningConfig()'s defaults (what `make safety-adapter`
    trains), and the shipped adapter's training report was made with exactly that configuration."""
    from dataclasses import asdict

    from helpers.studies.refusal.safety_tuning import REPORT_JSON_PATH, SafetyTuningConfig, config_from_report

    recipes = _safety_recipes_script()
    shipped = asdict(recipes.RECIPES[recipes.SHIPPED_RECIPE][1])
    assert shipped == asdict(SafetyTuningConfig()), "SHIPPED_RECIPE and SafetyTuningConfig()'s defaults differ"
    report = config_from_report(json.loads(REPORT_JSON_PATH.read_text())["config"])
    assert report == SafetyTuningConfig(), "the shipped adapter was not trained with SafetyTuningConfig()"
    assert f"| **{recipes.SHIPPED_RECIPE}**: **the shipped adapter**" in recipes.TABLE.read_text()


def _full_direction_search_script():
    return _load_file(ROOT / "scripts" / "full_direction_search.py", "full_direction_search")


def test_full_direction_search_summary_counts_the_paper_filters():
    """scripts/full_direction_search.py's summary: pruned (unscored) rows are not counted, KL and steering
    filters inclusive at their thresholds, the steering candidates' KL range."""
    import pandas as pd

    search = _full_direction_search_script()
    nan = float("nan")
    table = pd.DataFrame({
        "position": [-1, -1, -2, -2, -3],
        "layer": [10, 20, 10, 20, 29],
        "kl": [0.05, 0.30, 0.10, 0.60, nan],  # the last one is pruned: never scored
        "steering_score": [-2.0, 0.5, 0.0, 1.0, nan],
        "ablation_refusal_score": [1.0, -3.0, 0.5, -1.0, nan],
    })
    summary = search.summarize(table, kl_threshold=0.1, steering_threshold=0.0)
    assert summary["n_scored"] == 4
    assert summary["n_passing_kl"] == 2  # 0.05 and 0.10 (inclusive)
    assert summary["n_steering"] == 3  # 0.5, 0.0 (inclusive), 1.0
    assert summary["n_passing_both"] == 1  # (-2, 10)
    assert summary["steering_score_range_of_kl_passing"] == [-2.0, 0.0]
    assert summary["kl_range_of_steering"] == [0.1, 0.6]
    assert summary["steering_candidates"] == [(-1, 20), (-2, 10), (-2, 20)]
    none_steer = search.summarize(table.assign(steering_score=-1.0), kl_threshold=0.1, steering_threshold=0.0)
    assert none_steer["n_steering"] == 0 and none_steer["kl_range_of_steering"] is None


def test_committed_full_direction_search_agrees_with_its_table():
    """helpers/data/refusal/full_direction_search.json (quoted by the refusal notebook and README) is the
    summary of the table committed beside it, for the adapter shipped now."""
    import pandas as pd

    search = _full_direction_search_script()
    folder = ROOT / "helpers" / "data" / "refusal"
    result = json.loads((folder / "full_direction_search.json").read_text())
    table = pd.read_csv(folder / "full_direction_search.csv")
    summary = search.summarize(table, kl_threshold=result["kl_filter"], steering_threshold=result["steering_filter"])
    summary["steering_candidates"] = [list(c) for c in summary["steering_candidates"]]
    assert {k: result[k] for k in summary} == summary
    assert (result["n_train"], result["n_val"], result["kl_filter"]) == (search.N_TRAIN, search.N_VAL, 0.1)
    assert result["adapter_sha256"] == search.adapter_sha256(folder / "adapter"), (
        "full_direction_search.json was run on another adapter: re-run scripts/full_direction_search.py (~33 min)")


def test_safety_recipes_table_lists_only_what_the_given_folder_holds(tmp_path):
    recipes = _safety_recipes_script()
    one = next(iter(sorted(p.parent.name for p in recipes.SHIPPED.glob("*/eval.json"))))
    (tmp_path / one).mkdir()
    for file in recipes.SHIPPED_FILES:
        (tmp_path / one / file).write_bytes((recipes.SHIPPED / one / file).read_bytes())
    text = recipes.table_text(tmp_path)
    assert sum(line.startswith("| **") for line in text.splitlines()) == 1 and f"| **{one}**:" in text
    assert "not evaluated yet" in text


def test_recipes_with_fewer_general_requests_train_on_the_first_of_the_shipped_draw(monkeypatch):
    """A draw of n general requests is the first n of a larger draw with the same seed, so a recipe that asks for
    fewer than the shipped file holds reads its head instead of sampling; the shipped file holds what the shipped
    recipe asks for."""
    from helpers.studies.refusal import safety_tuning as S

    recipes = _safety_recipes_script()
    shipped = S.read_general_requests(recipes.GENERAL_REQUESTS)
    assert len(shipped) == recipes.SHIPPED_GENERAL_REQUESTS == S.SafetyTuningConfig().general_requests
    monkeypatch.setattr(S, "general_requests_data", lambda *a, **k: pytest.fail("must not sample"))
    config = S.SafetyTuningConfig(general_requests=300)
    assert recipes.general_requests_for("x", config, None, None) == shipped[:300]
    assert recipes.general_requests_for("x", S.SafetyTuningConfig(general_requests=0), None, None) == []
    asked = {}
    monkeypatch.setattr(S, "general_requests_data", lambda hf, tok, c, *, exclude, path, reuse: asked.update(
        n=c.general_requests, path=path, reuse=reuse, n_exclude=len(exclude)) or [])
    recipes.general_requests_for("more", S.SafetyTuningConfig(general_requests=len(shipped) + 1), None, None)
    assert asked["n"] == len(shipped) + 1 and asked["reuse"] and asked["path"] == recipes.OUT / "more" / S.GENERAL_DATA_NAME
    assert asked["n_exclude"] == sum(len(v) for v in S.load_instructions()["train"].values())


def test_the_selection_rule_needs_harmful_refusal_on_both_sets_then_takes_the_least_over_refusal():
    recipes = _safety_recipes_script()

    def rates(vh, vl, wh, wl):
        return {"val harmful": vh, "val harmless": vl, "voice-val harmful": wh, "voice-val harmless": wl}

    results = {"a": rates(0.95, 0.30, 0.95, 0.40),  # eligible, score 0.35
               "b": rates(0.91, 0.20, 0.90, 0.30),  # eligible, score 0.25: chosen
               "c": rates(0.99, 0.00, 0.89, 0.00)}  # no over-refusal, but refuses too few voice-val harmful requests
    assert recipes.selection_score(results["c"]) is None
    assert recipes.selection_score(results["b"]) == pytest.approx(0.25)
    assert recipes.chosen_by_selection(results) == "b"
    assert recipes.chosen_by_selection({"c": results["c"]}) is None


def test_the_shipped_recipe_is_the_one_the_selection_rule_chooses():
    """The shipped recipe was chosen on the selection sets (val split + voice_val) by the stated rule, not by hand."""
    recipes = _safety_recipes_script()
    results = recipes.screened()
    assert recipes.SHIPPED_RECIPE in results, "the shipped recipe has no selection.json (run safety_recipes.py --screen)"
    assert recipes.chosen_by_selection(results) == recipes.SHIPPED_RECIPE


def test_nbval_waits_longer_than_5_s_for_cell_outputs(tmp_path):
    """The root conftest.py raises nbval's fixed 5-s wait for a cell's outputs, also in a run that is given
    a notebook alone (make test's second-model run): collect one notebook in a fresh pytest and read every
    cell item's output_timeout back through a probe plugin."""
    import os
    import subprocess
    import sys

    root_conftest = _load_file(ROOT / "conftest.py", "root_conftest")
    assert root_conftest.NBVAL_OUTPUT_TIMEOUT_S > 5

    (tmp_path / "nbval_probe.py").write_text(
        "def pytest_collection_finish(session):\n"
        "    print('OUTPUT_TIMEOUTS', sorted({getattr(i, 'output_timeout', None) for i in session.items}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "notebooks/05_self_repair.ipynb", "--nbval-lax", "--collect-only", "-q",
         "-p", "no:cacheprovider", "-p", "nbval_probe"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("OUTPUT_TIMEOUTS"))
    assert line == f"OUTPUT_TIMEOUTS [{root_conftest.NBVAL_OUTPUT_TIMEOUT_S}]", line
