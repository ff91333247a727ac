# The two commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# Pinned: an unpinned torch (or a range admitting newer) pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pipec-installed
PYTEST_TIMEOUT ?= 300

.PHONY: demo test source-test wheel-check lint typecheck clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,hf]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/demo.py

# the wheel, built from this checkout and installed in a fresh venv, used from
# outside the source tree: README tutorial, CLI, then the whole suite against
# it (.ci/wheel_check.sh). `make source-test` runs the suite against the
# editable checkout instead (the same tests; no wheel).
test: wheel-check

source-test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --timeout=$(PYTEST_TIMEOUT) -p no:cacheprovider tests

wheel-check: $(STAMP)
	VENV=$(VENV) PYTEST_TIMEOUT=$(PYTEST_TIMEOUT) .ci/wheel_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check pipec tests tests/dist examples benchmarks  # tests/dist by name: ruff skips folders named dist
	$(VENV)/bin/mypy pipec

typecheck: lint

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
