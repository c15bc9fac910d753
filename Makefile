# mergesmith developer tasks. Everything runs inside ./.venv.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
LINT_PATHS := src tests bench scripts

.PHONY: help venv install demo test lint format clean

help:
	@echo "make install  create .venv and install mergesmith (editable, with dev extras)"
	@echo "make test     run the test suite"
	@echo "make demo     build two tiny models, merge them with the CLI, load and generate"
	@echo "make lint     ruff check + ruff format --check"
	@echo "make format   ruff format + ruff check --fix"
	@echo "make clean    remove caches, build output and ./demo"

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned: the local CPU wheel satisfies it; an unpinned torch could pull CUDA.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

install: venv

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check $(wildcard $(LINT_PATHS))
	$(PY) -m ruff format --check $(wildcard $(LINT_PATHS))

format: install
	$(PY) -m ruff format $(wildcard $(LINT_PATHS))
	$(PY) -m ruff check --fix $(wildcard $(LINT_PATHS))

clean:
	rm -rf build dist demo .pytest_cache .ruff_cache .hypothesis src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
