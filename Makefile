# Two commands for a fresh machine with Python 3.11+ and make: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Starts an embedded PostgreSQL for the command unless PGPOOL_DSN names a server.
WITH_SERVER := $(PY) tests/embedded_pg.py run --

.PHONY: install install-bench demo test lint format bench bench-quick clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

BENCH_STAMP := $(VENV)/.installed-bench-stamp

install-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,lint,bench]'
	touch $(BENCH_STAMP)

demo: install
	$(WITH_SERVER) $(PY) examples/demo.py

test: install
	$(PY) -m pytest

# Against PGPOOL_DSN when set, else an embedded server the benchmark starts (and restarts) itself.
bench: install-bench
	$(PY) -m bench.run

bench-quick: install-bench
	$(PY) -m bench.run --quick --out bench/results/quick

lint: install
	$(VENV)/bin/ruff check pgpool tests examples bench
	$(VENV)/bin/ruff format --check pgpool tests examples bench
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix pgpool tests examples bench
	$(VENV)/bin/ruff format pgpool tests examples bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
