# segmill: `make run` (main job on the embedded default) and `make test` (whole suite) set up what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segmill-installed
STATE ?= .segmill
PYTEST_ARGS ?=

.PHONY: run test test-slow test-gpu bench bench-train experiment venv browser clean

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

test: $(STAMP) browser
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# Debian's Chromium, for the tests that open the HTML reports: installed once where root and apt-get are (a
# minute); elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the report tests (once)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
			echo "chromium could not be installed: the report tests will skip"; \
	else echo "no chromium here (apt-get install chromium): the report tests will skip"; fi

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

# Training throughput: the retraining job against a plain PyTorch loop of the same model and recipe, side by side.
BENCH_TRAIN_ARGS ?=
bench-train: $(STAMP)
	$(PY) -m bench.training $(BENCH_TRAIN_ARGS)

# Hard-class training measured on CamVid (../shared/datasets/camvid): every method against the baseline at equal
# samples, two seeds, through the retraining job (hours on 2 cores; options: `$(PY) -m bench.hard_classes --help`).
EXPERIMENT_ARGS ?=
experiment: $(STAMP)
	$(PY) -m bench.hard_classes $(EXPERIMENT_ARGS)

clean:
	rm -rf $(STATE) .pytest_cache
