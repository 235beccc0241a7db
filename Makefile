# The front door: `make run` starts the embedded gateway, `make test` runs every check.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system run test lint typecheck unit clean grafana prometheus bench rehearse

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
	$(BIN)/ruff check gateway tests loadtest grafana

typecheck: setup
	$(BIN)/mypy --strict gateway

unit: setup
	$(BIN)/pytest -q

test: lint typecheck unit

# Dashboards as code: rewrite grafana/dashboards/*.json from grafana/generate.py (SDK pinned).
grafana: setup
	$(BIN)/pip install --quiet -r grafana/requirements.txt
	$(BIN)/python grafana/generate.py

# Prometheus with deploy/prometheus/ on 127.0.0.1:9090, scraping `make run` (127.0.0.1:8080).
prometheus: system
	./scripts/prometheus

# The benchmark of the claim endpoint against a hello endpoint (see docs/performance.md).
bench: setup
	$(BIN)/python -m loadtest.bench --workers 2 --runs 3 --duration 10

# A Locust release rehearsal ending in the verifier's verdict (see docs/loadtest.md).
SCENARIO ?= release
rehearse: setup
	$(BIN)/python -m loadtest.run $(SCENARIO)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
