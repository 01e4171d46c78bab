# The two commands a new machine needs: `make run` and `make test`. Both install what they use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1

.DEFAULT_GOAL := help
.PHONY: help install wrk run test lint typecheck pytest audit bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed ## Create .venv with the service and its pinned development tools

run: install ## Migrate, seed and serve on the embedded SQLite file (WALLET_DATABASE_URL overrides)
	$(BIN)/wallet migrate
	$(BIN)/wallet seed
	$(BIN)/wallet serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

lint: install ## ruff (lint and format) and the layer contract
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

typecheck: install ## mypy --strict
	$(BIN)/mypy

wrk: ## wrk, the load client of `wallet bench` (Debian's package; needs root to install)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }

pytest: install wrk ## The suite on SQLite and PostgreSQL, then its PostgreSQL part under SERIALIZABLE
	$(BIN)/pytest --junitxml=.test-results/junit.xml
	WALLET_DATABASE_ISOLATION=serializable $(BIN)/pytest -k "not sqlite" \
		--junitxml=.test-results/junit-serializable.xml

test: lint typecheck pytest ## Everything CI runs: lint, types, tests

# Not part of `make test`: pip-audit needs PyPI's JSON API or OSV, which this workplace's
# network does not reach (--strict makes that a failure rather than a silent pass).
audit: install ## Known vulnerabilities in the pinned dependencies (needs network to PyPI/OSV)
	$(BIN)/pip-audit --strict --skip-editable

bench: install wrk ## Start a server, load it with wrk, print the table; WALLET_DATABASE_URL (scratch!), BENCH_ARGS=
	$(BIN)/wallet bench $(BENCH_ARGS)

clean: ## Remove the virtualenv, caches and the local database
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .test-results wallet.db wallet.db-*
