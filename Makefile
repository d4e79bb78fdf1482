# ltcore: `make demo` runs the main job on the embedded data; `make test` runs the test suite.
# Both build .venv (python3 -m venv + pip) when it is missing.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ltcore-installed
PYTEST_ARGS ?=

.PHONY: demo test test-all lint typecheck bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml docker/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	# the same install script as the cluster image (docker/Dockerfile): one source of truth
	sh docker/install.sh $(PY) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/two_stage.py

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/train_overhead.py

clean:
	rm -rf ltcore-runs .pytest_cache
