"""README's Python snippets run as written, against the test server.

Every fenced block whose info string starts with ``python`` runs, in README order, in one fresh
Python process that shares one namespace between blocks, as a reader pasting them one after the
other into one script would: later blocks use what earlier ones defined (the quickstart's `pool`, its
``accounts`` table). A block fenced as ``python notest`` is shown but not run; README says why next
to each one (another library's code, a port to bind).

Connection settings reach the snippets the way README tells its readers: through libpq's ``PG*``
environment variables, derived here from the test server's dsn (``base_dsn``), with the process's own
``PG*`` variables removed. The snippets create their tables in a schema of their own
(``PGOPTIONS=-c search_path=...``), dropped at the end, so they never meet a table of the same name.
A failing block is named by its line in README.md, and its traceback shows README's lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 90  # seconds for all the blocks together; they take about two

# libpq connection parameters and the environment variables that set them.
_PG_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "dbname": "PGDATABASE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}

_FENCE = re.compile(r"^(`{3,})\s*([^`]*)$")

# Runs the blocks it reads from stdin (JSON: [[line, source], ...]) in one namespace. Each block is
# compiled as README.md with its own line numbers, so tracebacks point into README.
_RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for line, source in blocks:
    print(f"running the python block at README.md line {line}", file=sys.stderr, flush=True)
    try:
        exec(compile("\n" * line + source, "README.md", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the python block at README.md line {line}", file=sys.stderr, flush=True)
        sys.exit(1)
print("all blocks ran", file=sys.stderr, flush=True)
"""


def python_blocks(text: str) -> tuple[list[tuple[int, str]], list[int]]:
    """The python blocks to run, as (line of the opening fence, source), and the lines of those skipped."""
    run: list[tuple[int, str]] = []
    skipped: list[int] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, words = opening[1], opening[2].split()
        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and not (lines[index].startswith(fence) and not lines[index].strip().strip("`")):
            body.append(lines[index])
            index += 1
        index += 1  # the closing fence
        if not words or words[0] not in ("python", "py", "python3"):
            continue
        if "notest" in words[1:]:
            skipped.append(start + 1)
        else:
            run.append((start + 1, "\n".join(body) + "\n"))
    return run, skipped


def run_blocks(blocks: list[tuple[int, str]], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the blocks in a fresh interpreter (its pools and threads die with it), from the checkout."""
    try:
        return subprocess.run(
            [sys.executable, "-X", "dev", "-W", "error", "-c", _RUNNER],
            input=json.dumps(blocks),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        started = re.findall(r"running the python block at README\.md line (\d+)", stderr)
        where = f"the block at README.md line {started[-1]}" if started else "before the first block"
        pytest.fail(f"README's python blocks did not finish within {TIMEOUT} s: stuck in {where}\n{stderr}")


def libpq_env(dsn: str, schema: str) -> dict[str, str]:
    """This process's environment with its PG* variables replaced by the dsn's, tables in `schema`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    for key, value in psycopg2.extensions.parse_dsn(dsn).items():
        if key not in _PG_ENV:
            raise AssertionError(f"the test dsn sets {key!r}, which test_readme.py does not pass on as PG*")
        env[_PG_ENV[key]] = value
    env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} -c search_path={schema}".strip()
    return env


def test_every_python_block_in_readme_runs_against_the_server(base_dsn: str) -> None:
    blocks, skipped = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 10, f"found only {len(blocks)} python blocks in README.md: is the fence parser broken?"
    schema = f"pgpool_readme_{os.getpid()}_{time.monotonic_ns()}"
    admin = psycopg2.connect(base_dsn, application_name="pgpool-test-readme")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {schema}")
        result = run_blocks(blocks, libpq_env(base_dsn, schema))
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()
    if result.returncode != 0:
        failed = re.findall(r"FAILED: the python block at README\.md line \d+", result.stderr)
        headline = failed[-1] if failed else f"the README runner exited with {result.returncode}"
        pytest.fail(f"{headline}\n--- stderr ---\n{result.stderr}\n--- stdout ---\n{result.stdout}")
    print(f"ran {len(blocks)} python blocks; not run (python notest): lines {skipped}")


def test_a_failing_block_is_named_by_its_readme_line() -> None:
    text = "# title\n\n```python\nx = 1\n```\n\n```python notest\nnot run\n```\n\n```python\nassert x == 2\n```\n"
    blocks, skipped = python_blocks(text)
    assert [line for line, _ in blocks] == [3, 11] and skipped == [7]
    result = run_blocks(blocks, dict(os.environ))
    assert result.returncode == 1
    assert "FAILED: the python block at README.md line 11" in result.stderr
    assert 'File "README.md", line 12' in result.stderr  # the assert's own line in the text
