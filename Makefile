# segmill: `make run` (main job on the embedded default) and `make test` (whole suite) set up what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segmill-installed
STATE ?= .segmill
PYTEST_ARGS ?=

.PHONY: run test test-slow test-gpu bench experiment venv clean

venv: $(STAMP)

# Reinstalls only when the dependency declarations change; quick otherwise.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip check
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/segmill demo --state $(STATE)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# Long-running checks left out of `make test` (marked `slow`).
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# On a machine with CUDA: the device-only checks (they are skipped, not run, by `make test`).
test-gpu: $(STAMP)
	$(PY) -m pytest -m "gpu" $(PYTEST_ARGS)

# Throughput: segmill against a bare loop, a tuned DataLoader and Ray's documented pattern (a few minutes on
# 2 cores; options: `$(PY) -m bench.throughput --help`, e.g. BENCH_ARGS="--synthetic 1000,10000").
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench.throughput $(BENCH_ARGS)

# Hard-class bootstrapping measured: the same U-Net trained without and with it through the retraining job,
# per-class IoU side by side on held-out scenes (about 10 minutes on 2 cores; options: --help).
EXPERIMENT_ARGS ?=
experiment: $(STAMP)
	$(PY) -m bench.bootstrap_experiment $(EXPERIMENT_ARGS)

clean:
	rm -rf $(STATE) .pytest_cache
