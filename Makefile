# imagefab: the first two commands on a fresh machine are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint models mlflow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

models: setup
	$(BIN)/imagefab models build

# Builds the offline models if missing, runs a real bulk job on local Ray, queries the catalog.
demo: setup
	$(BIN)/imagefab demo

# The MLflow UI on the project's sqlite store: http://127.0.0.1:5000
mlflow: setup
	$(BIN)/imagefab mlflow

# Two pytest workers, a test file each at a time (module fixtures stay shared): most slow tests
# wait on Ray, subprocesses or a compiler, so two overlap well on 2 cores (measured: 15:42 serial,
# 12:30 with two, warm caches). Every test uses its own ports, folders and Ray.
# --no-loadscope-reorder: files run in tests/conftest.py's order (the longest first), not xdist's.
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
# The slowest tests are listed at the end of every run, so a slow one is seen where it is added.
DURATIONS ?= --durations=15

# ruff (lint and format) over the whole tree; runs before the tests, so a style slip fails fast.
lint: setup
	$(BIN)/ruff check app jobs analysis benchmarks tests
	$(BIN)/ruff format --check app jobs analysis benchmarks tests
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q $(XDIST) $(DURATIONS) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q $(XDIST) -m 'not slow' $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
