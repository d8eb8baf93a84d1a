# Day-to-day targets; the README's two commands are the canonical install + run and install + test.
PY ?= .venv/bin/python

.PHONY: install test test-fast lint format default bench
install:
	python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e ".[test]"

test:
	$(PY) -m pytest

test-fast:   # the in-process tests only (no launcher processes)
	$(PY) -m pytest -m "not slow"

lint:
	$(PY) -m ruff check src tests launch bench && $(PY) -m ruff format --check src tests launch bench

format:
	$(PY) -m ruff format src tests launch bench && $(PY) -m ruff check --fix src tests launch bench

default:     # the embedded default run
	$(PY) launch/mlm.py --ds ds_configs/zero2_bf16.json

bench:       # benchmarks against their baselines; results in bench/results/
	$(PY) bench/data_bench.py
