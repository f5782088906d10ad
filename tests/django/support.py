"""Helpers for the Django tests: settings for a dsn, and a Django script run in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg2.extensions

ROOT = Path(__file__).resolve().parents[2]


def database_settings(dsn: str, **overrides: Any) -> dict[str, Any]:
    """A DATABASES entry for `dsn` with the pgpool engine; `overrides` replace keys (OPTIONS merged)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    options: dict[str, Any] = {
        key: value for key, value in params.items() if key not in {"dbname", "user", "password", "host", "port"}
    }
    options.update(overrides.pop("OPTIONS", {}))
    entry = {
        "ENGINE": "pgpool.django",
        "NAME": params.get("dbname", "postgres"),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "OPTIONS": options,
    }
    entry.update(overrides)
    return entry


def run_django(script: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run `script` in a fresh Python process from the checkout; return the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])
