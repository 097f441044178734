# Quick start: `make demo` runs the main job on the embedded default, `make test` runs the linters (`make lint`)
# and the test suite.
# Both create the virtual environment (.venv) first when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dp2osr-installed
# Folders ruff checks: only those present (ruff stops on a path that does not exist).
LINT_PATHS := $(wildcard src tests scripts benchmarks research)

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,lora,demo,wandb]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/dp2osr quickstart --output out/quickstart

lint: $(STAMP)
	$(BIN)/python -m ruff format --check $(LINT_PATHS)
	$(BIN)/python -m ruff check $(LINT_PATHS)

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py

clean-venv:
	rm -rf $(VENV)
