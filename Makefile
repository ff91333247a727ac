# The two commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# Pinned: an unpinned torch (or a range admitting newer) pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pipec-installed
PYTEST_TIMEOUT ?= 300

.PHONY: demo test lint typecheck clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,hf]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/demo.py

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --timeout=$(PYTEST_TIMEOUT) -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pipec tests examples benchmarks
	$(VENV)/bin/mypy pipec

typecheck: lint

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
