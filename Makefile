# Two commands for a fresh machine with Python 3.11+ and make: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Starts an embedded PostgreSQL for the command unless PGPOOL_DSN names a server.
WITH_SERVER := $(PY) tests/embedded_pg.py run --

.PHONY: install demo test test-fast lint format clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

demo: install
	$(WITH_SERVER) $(PY) examples/demo.py

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check pgpool tests examples
	$(VENV)/bin/ruff format --check pgpool tests examples
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix pgpool tests examples
	$(VENV)/bin/ruff format pgpool tests examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
