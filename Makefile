# make run  : create .venv if needed, install, run the main job on this machine
# make test : same set-up, then the test suite (fast by default; `make test-slow` for long validation)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test test-slow bench clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, pinned, so that the package's `torch>=` requirement is already met
# and no CUDA build is ever pulled from the registry.
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hdlora simulate --alpha 0.1 --alpha-ft 3 --tokens 3 --kappa0 1 --kappa 1 \
		--noise 0.5 --lam 0.1 --lam-ft 0.5 --dim 150 --seeds 2

test: $(STAMP)
	$(VPY) -m pytest -q

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(VPY) $$b; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
