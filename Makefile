# make run  : create .venv if needed, install, run the main job on this machine
# make test : same set-up, then the test suite (fast by default; `make test-slow` for long validation)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test test-slow test-cluster bench clean

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
	    $(VPY) -m pytest -q -m cluster -s -p no:cacheprovider tests/test_slurm_cluster.py \
	    || { tail -n 40 $(SLURM_DIR)/slurmctld.log $(SLURM_DIR)/slurmd.log 2>/dev/null; exit 1; }

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(VPY) $$b; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
