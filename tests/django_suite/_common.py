"""What both settings modules share: Django's own test settings (tests/test_sqlite.py in its sdist),
with PostgreSQL databases from the dsn in PGPOOL_DJANGO_SUITE_DSN (else PGPOOL_DSN)."""

from __future__ import annotations

import os
from typing import Any

import psycopg2.extensions

_dsn = os.environ.get("PGPOOL_DJANGO_SUITE_DSN") or os.environ.get("PGPOOL_DSN") or ""
_params = psycopg2.extensions.parse_dsn(_dsn)


def databases(engine: str, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Django's suite wants two aliases, 'default' and 'other', on distinct test databases."""
    base = {
        "ENGINE": engine,
        "HOST": _params.get("host", ""),
        "PORT": _params.get("port", ""),
        "USER": _params.get("user", ""),
        "PASSWORD": _params.get("password", ""),
        "OPTIONS": options,
    }
    return {
        "default": {**base, "NAME": "django_suite"},
        "other": {**base, "NAME": "django_suite_other"},
    }


SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
