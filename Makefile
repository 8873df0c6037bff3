# Every target sets up its own virtual environment; torch==2.13.0 (CPU wheel) is installed first so that
# the torch range in pyproject.toml never resolves to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# What `make test` runs, in this order; every check runs even when an earlier one fails.
CHECKS := ruff-check format-check typecheck docs pytest
SOURCES := lightning_chaos tests examples benchmarks docs

.PHONY: setup demo test lint $(CHECKS) package bench clean

# One environment for every target: the package in editable mode with all its features (`all`, in
# `dev`), the test and lint tools (`dev`) and the docs tools (`docs`).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,docs]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# CI's test command (.ci/run). Runs every check, then fails if any failed and names them.
test: $(STAMP)
	@failed=""; \
	for check in $(CHECKS); do \
		echo "== make $$check"; \
		$(MAKE) --no-print-directory $$check || failed="$$failed $$check"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: all checks passed ($(CHECKS))"

lint: ruff-check format-check

ruff-check: $(STAMP)
	$(BIN)/ruff check $(SOURCES)

format-check: $(STAMP)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy lightning_chaos

# The API reference, warnings as errors, nitpicky about the project's own cross-references. Built from
# scratch each time: autosummary leaves pages of modules that no longer exist behind, and an incremental
# build does not repeat the warnings of pages it does not rebuild.
docs: $(STAMP)
	rm -rf docs/_build docs/api
	$(BIN)/sphinx-build -W --keep-going -n -b html docs docs/_build/html

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

# sdist + wheel into dist/, then the wheel installed into a clean virtual environment and imported there.
package: $(STAMP)
	bash .ci/package $(BIN)/python

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) lightning_logs chaos_logs .pytest_cache .mypy_cache build dist lightning_chaos.egg-info docs/_build docs/api
