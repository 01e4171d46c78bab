# The two commands a new machine needs: `make run` and `make test`. Both install what they use.
PYTHON ?= python3
PYTHON_VERSION := 3.11
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?=

# The locks: every dependency, direct and indirect, pinned with its hashes. `make lock` makes
# them from pyproject.toml with pip-tools, which lives in a venv of its own (not a project
# dependency); LOCK_ARGS=--upgrade (or --upgrade-package NAME) moves the pins on.
LOCK := requirements.txt
DEV_LOCK := requirements-dev.txt
LOCK_VENV := .venv-lock
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
LOCK_ARGS ?=
# pip-compile locks for the Python it runs on, and leaves out what a dependency needs on other
# 3.11 releases only: redis needs async-timeout before 3.11.3 (Debian 12's python3 is 3.11.2).
# Such packages are locked for every 3.11 here (tests/deploy checks the locks are complete).
LOCK_ALSO := async-timeout
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet \
	--generate-hashes --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host $(LOCK_ARGS)

# major.minor of the Python that made .venv (empty when there is none): any other than
# $(PYTHON_VERSION) and .venv is made again.
VENV_PYTHON_VERSION := $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)

# Stops the recipe, in one line, unless $(PYTHON) is Python $(PYTHON_VERSION) with its venv module.
define check-python
found=$$($(PYTHON) -c 'import sys, venv, ensurepip; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
if [ "$$found" != "$(PYTHON_VERSION)" ]; then \
	echo "make: $(PYTHON) is $${found:+Python }$${found:-missing or lacks the venv module}, not Python $(PYTHON_VERSION): install Python $(PYTHON_VERSION) (with venv) and run make PYTHON=python$(PYTHON_VERSION) $(MAKECMDGOALS)" >&2; \
	exit 1; \
fi
endef

# $(call apt-tool,COMMANDS,PACKAGE,WHAT SKIPS WITHOUT IT[,SHELL AFTER THE INSTALL]): when one of
# COMMANDS is neither on PATH nor in /usr/bin, install Debian's PACKAGE if we are root (apt-get
# update only then); else say in one line what skips and go on. No test is stopped by a missing
# tool (.ci/run fails on the skip instead).
define apt-tool
missing=; for tool in $(1); do \
	command -v $$tool >/dev/null 2>&1 || [ -x /usr/bin/$$tool ] || missing="$$missing $$tool"; \
done; \
if [ -z "$$missing" ]; then \
	:; \
elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	echo "installing Debian's $(2) package (missing:$$missing)"; \
	if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; then \
		:; $(4) \
	else \
		echo "make: installing $(2) failed: $(3) will skip"; \
	fi; \
else \
	echo "make: no$$missing here and installing Debian's $(2) needs root: $(3) will skip"; \
fi
endef

# The prometheus package's init script starts a server on :9090 where policy-rc.d lets it
# (this machine's forbids it; no systemd): stop that one, by its pid file and nothing else,
# and keep it from starting at boot.
define stop-prometheus-service
/etc/init.d/prometheus stop >/dev/null 2>&1 || true; \
if [ -d /run/systemd/system ]; then systemctl disable --quiet prometheus.service || true; fi;
endef

.DEFAULT_GOAL := help
.PHONY: FORCE help install lock wrk prometheus run test lint typecheck pytest audit bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Made again whenever the lock or pyproject.toml changes; a .venv of another Python is replaced.
ifneq ($(VENV_PYTHON_VERSION),$(PYTHON_VERSION))
$(BIN)/.installed: FORCE
endif
$(BIN)/.installed: $(DEV_LOCK) pyproject.toml
ifneq ($(VENV_PYTHON_VERSION),$(PYTHON_VERSION))
	@$(check-python)
	$(PYTHON) -m venv --clear $(VENV)
endif
	$(BIN)/python -m pip install --quiet --require-hashes --requirement $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	@$(BIN)/python -m pip check \
		|| { echo "make: the installed packages disagree; if pyproject.toml changed, run make lock" >&2; exit 1; }
	touch $@

install: $(BIN)/.installed ## Create .venv from requirements-dev.txt (hashed pins) and the project

FORCE:

$(LOCK_VENV)/.pip-tools-$(PIP_TOOLS_VERSION):
	@$(check-python)
	$(PYTHON) -m venv --clear $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	touch $@

lock: $(LOCK_VENV)/.pip-tools-$(PIP_TOOLS_VERSION) ## Regenerate requirements.txt and requirements-dev.txt from pyproject.toml
	printf '%s\n' $(LOCK_ALSO) | $(PIP_COMPILE) --output-file $(LOCK) pyproject.toml -
	printf '%s\n' $(LOCK_ALSO) \
		| $(PIP_COMPILE) --extra dev --constraint $(LOCK) --output-file $(DEV_LOCK) pyproject.toml -

run: install ## Migrate, seed and serve on the embedded SQLite file (WALLET_DATABASE_URL overrides)
	$(BIN)/wallet migrate
	$(BIN)/wallet seed
	$(BIN)/wallet serve --host $(HOST) --port $(PORT) $(if $(WORKERS),--workers $(WORKERS))

lint: install ## ruff (lint and format) and the layer contract
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

typecheck: install ## mypy --strict
	$(BIN)/mypy

wrk: ## wrk, the load client of `wallet bench` (Debian's package; installed only as root)
	@$(call apt-tool,wrk,wrk,the benchmark smoke test)

prometheus: ## prometheus and promtool (Debian's package; installed only as root), for the alerting tests
	@$(call apt-tool,prometheus promtool,prometheus,the tests that run promtool and Prometheus,$(stop-prometheus-service))

pytest: install wrk prometheus ## The suite on SQLite and PostgreSQL, then its PostgreSQL part under SERIALIZABLE
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

clean: ## Remove the virtualenvs, caches and the local database
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache .test-results wallet.db wallet.db-*
