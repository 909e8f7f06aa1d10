# Quick start: `make demo` (embedded end-to-end demo) and `make test` (the whole suite).
# Both create .venv. On CPU, torch is pinned and installed first so pip never pulls a multi-GB CUDA
# build; on a GPU machine run e.g. `make test TORCH=torch`. `make demo` installs only what the demo
# needs (opd and torch); `make test` adds the dev extra. Each install has its own stamp file, so
# `make demo` after `make test` installs nothing, and `make test` after `make demo` adds the extra.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.opd-installed
DEV_STAMP := $(VENV)/.opd-dev-installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) -e ".[dev]"
	touch $(DEV_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
