# mailauto: `make run` for the whole loop on this machine, `make test` for the suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.installed-base
STAMP_DEV := $(VENV)/.installed-dev

# The test suite runs on the production stack: Postgres and Redis at their local
# default addresses unless DATABASE_URL / REDIS_URL say otherwise.
TEST_DATABASE_URL ?= $(or $(DATABASE_URL),postgres://postgres@127.0.0.1:5432/mailauto)
TEST_REDIS_URL ?= $(or $(REDIS_URL),redis://127.0.0.1:6379/15)

.PHONY: run install install-dev migrate demo test services lint format bench clean

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null || { echo "mailauto needs Python 3.11 ($(PYTHON) not found); set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_BASE): requirements/base.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements/base.txt
	touch $@

$(STAMP_DEV): requirements/base.txt requirements/dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@ $(STAMP_BASE)

install: $(STAMP_BASE)
install-dev: $(STAMP_DEV)

migrate: install
	$(PY) manage.py migrate --noinput

# Everything on the embedded defaults (SQLite, a filesystem broker, the ESP sandbox)
# unless DATABASE_URL / REDIS_URL are set. Ctrl-C stops all processes.
run: migrate
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(PY) manage.py ensure_admin
	$(PY) manage.py load_demo
	$(VENV)/bin/honcho start -f Procfile

# Starts Postgres and Redis when they are installed but stopped; otherwise stops with
# a message naming what is missing. Tests are never skipped for a missing service.
services:
	@bash mailauto/scripts/ensure_services.sh "$(TEST_DATABASE_URL)" "$(TEST_REDIS_URL)"

test: install-dev services
	DATABASE_URL="$(TEST_DATABASE_URL)" REDIS_URL="$(TEST_REDIS_URL)" $(VENV)/bin/pytest --create-db $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DATABASE_URL="$(TEST_DATABASE_URL)" $(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/mypy campaigns/events.py campaigns/processing.py campaigns/delivery.py campaigns/rules.py campaigns/schemas.py campaigns/rendering suppression/ mailauto/lib/ campaigns/esp_batch.py campaigns/selectors.py campaigns/tasks.py \
		campaigns/throttle campaigns/broadcasts campaigns/esp_idempotency.py campaigns/services.py mailauto/sandbox

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Throughput benchmarks (bench/README.md): their own databases on the test Postgres
# server, and a Redis database of their own that they flush. BENCH_ARGS="--quick" for a
# smoke run. Prints figures; never fails on the clock.
$(VENV)/.installed-bench: requirements/base.txt requirements/dev.txt requirements/bench.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements/bench.txt
	touch $@ $(STAMP_DEV) $(STAMP_BASE)

bench: $(VENV)/.installed-bench services
	DATABASE_URL="$(TEST_DATABASE_URL)" BENCH_REDIS_URL="$(or $(BENCH_REDIS_URL),redis://127.0.0.1:6379/10)" \
		$(PY) bench/pipeline.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
