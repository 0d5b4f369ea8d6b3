# make run  : create .venv if needed, install, run the main job on this machine
# make test : same set-up, then the test suite (fast by default; `make test-slow` for long validation)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test test-slow test-cluster test-browser docs notebooks notebooks-outputs lint bench clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, pinned, so that the package's `torch>=` requirement is already met
# and no CUDA build is ever pulled from the registry.
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# the main job: reproduce the paper's Fig. 1 in quick mode (theory lines, D = 80 simulation
# markers, Bayes-optimal line, baselines); prints where the picture is. Resumable.
run: $(STAMP)
	$(VENV)/bin/hdlora figure 1 --quick --out results/figures

test: $(STAMP)
	$(VPY) -m pytest -q

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

# a real single-node SLURM on this machine (Debian slurm-wlm + munge, installed if missing; root),
# the SLURM test through it (--cluster slurm), and SLURM stopped again, also when the test fails
SLURM_DIR ?= /tmp/hdlora-slurm
test-cluster: $(STAMP)
	$(VPY) -m pip install -q -e '.[test,cluster]'
	trap 'scripts/slurm_down.sh $(SLURM_DIR)' EXIT; \
	scripts/slurm_up.sh $(SLURM_DIR) && \
	SLURM_CONF=$(SLURM_DIR)/slurm.conf HDLORA_REQUIRE_SLURM=1 \
	    $(VPY) -m pytest -q -m cluster -s -p no:cacheprovider tests/experiments/test_slurm_cluster.py \
	    || { tail -n 40 $(SLURM_DIR)/slurmctld.log $(SLURM_DIR)/slurmd.log 2>/dev/null; exit 1; }
# the explorer in a real browser: Debian's Chromium (scripts/install_browser.sh) driven by Playwright;
# skipped with the reason only where Chromium cannot be installed, otherwise it must run and pass.
BROWSER_STAMP := $(VENV)/.browser-installed
$(BROWSER_STAMP): $(STAMP) pyproject.toml
	$(VPY) -m pip install -q -e '.[test,browser]'
	touch $(BROWSER_STAMP)

test-browser: $(BROWSER_STAMP)
	if bash scripts/install_browser.sh; then export HDLORA_REQUIRE_BROWSER=1; \
	else echo "test-browser: Chromium could not be installed: the browser test is skipped" >&2; fi; \
	$(VPY) -m pytest -q -m browser tests/explore/test_browser.py
# the documentation site and the notebooks: the `docs` extra (mkdocs, mkdocstrings, jupytext, nbclient, ipykernel)
DOCSTAMP := $(VENV)/.installed-docs
$(DOCSTAMP): $(STAMP) pyproject.toml
	$(VPY) -m pip install -q -e '.[test,docs]'
	touch $(DOCSTAMP)

# the site (README, gallery, VALIDATION, studies, notebooks with their stored outputs, API reference
# from the docstrings) into site/; --strict: any warning, e.g. a docstring that disagrees with its
# signature, fails the build
docs: $(DOCSTAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# executes COPIES of docs/notebooks/*.ipynb at small sizes (HDLORA_NB_SMALL=1); the stored outputs are not touched
notebooks: $(DOCSTAMP)
	$(VPY) scripts/run_notebooks.py

# rebuilds docs/notebooks/*.ipynb from their paired .py files and stores their outputs (modest sizes, minutes)
notebooks-outputs: $(DOCSTAMP)
	$(VPY) scripts/run_notebooks.py --update

# ruff (lint, then the format check) and mypy, configured in pyproject.toml; the `lint` extra
LINTSTAMP := $(VENV)/.installed-lint
LINT_PATHS := src tests benchmarks scripts
$(LINTSTAMP): $(STAMP) pyproject.toml
	$(VPY) -m pip install -q -e '.[test,lint]'
	touch $(LINTSTAMP)

lint: $(LINTSTAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(VPY) $$b; done

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info
