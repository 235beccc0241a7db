# The front door: `make run` starts the embedded gateway, `make test` runs every check.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system run test lint typecheck unit clean

setup: system $(STAMP)

# Debian packages the gateway and its tests run against; fail loudly when they cannot be had.
system:
	@./scripts/system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/flashclaim run --demo

lint: setup
	$(BIN)/ruff check gateway tests

typecheck: setup
	$(BIN)/mypy --strict gateway

unit: setup
	$(BIN)/pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
