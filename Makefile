# The README's two commands: `make demo` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
# EXTRAS empty: the extras .venv was installed with, else cpu,dev; cpu and gpu never mix (scripts/extras.sh)
EXTRAS ?=
ENV := source scripts/env.sh &&
PY := .venv/bin/python
CONFIG ?= jobs/configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format clean

install:
	@EXTRAS=$(EXTRAS) bash scripts/install.sh

demo: install
	@$(ENV) $(PY) -m jobs.pipeline --config $(CONFIG)

test: install
	@$(ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	@$(ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	@.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: install
	@.venv/bin/ruff check --fix . && .venv/bin/ruff format .

clean:
	rm -rf .venv .cache runs .pytest_cache
