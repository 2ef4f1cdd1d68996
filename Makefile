# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SEEDS ?= 60

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install test lint typecheck contracts pytest demo bench sim clean etcd redis chromium

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

contracts: $(STAMP)
	$(VENV)/bin/lint-imports

# The integration tests and `loom bench kv --peer etcd` start real etcd (Debian's etcd-server).
etcd:
	@command -v etcd >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server; }

# The Celery peer of `loom bench functions` (and its test) starts a real redis-server (Debian's).
redis:
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# tests/e2e/test_demo_report.py opens the demo's HTML report in headless Chromium (Debian's).
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

pytest: $(STAMP) etcd redis chromium
	PYTHONHASHSEED=0 $(VENV)/bin/pytest

test: lint typecheck contracts pytest

sim: $(STAMP)
	PYTHONHASHSEED=0 $(VENV)/bin/loom sim --seeds 300 --faults all
	PYTHONHASHSEED=0 $(VENV)/bin/loom sim --seeds 300 --faults moves
	PYTHONHASHSEED=0 $(VENV)/bin/loom sim --seeds 300 --faults handoffs
	PYTHONHASHSEED=0 $(VENV)/bin/loom sim --functions --seeds 100

# The Threads launch, replayed on an embedded cluster (3-5 minutes); the report lands in
# loom-demo-report.html.
demo: $(STAMP)
	PYTHONHASHSEED=0 $(VENV)/bin/loom demo threads --report loom-demo-report.html

bench: $(STAMP) etcd redis
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	PYTHONHASHSEED=0 $(PY) -m bench
	PYTHONHASHSEED=0 $(PY) -m bench.wire_bench --seconds 12
	$(VENV)/bin/loom bench failover --trials 5
	$(VENV)/bin/loom bench kv --workload W --clients 64 --duration 10 --peer etcd
	$(VENV)/bin/loom bench kv --workload C --clients 64 --duration 10 --peer etcd
	$(VENV)/bin/loom bench functions --calls 5000 --peer celery
	$(VENV)/bin/loom bench tenants

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
