"""With psycopg 3 installed too, Django's backend would take it: pgpool.django makes it take psycopg2."""

from __future__ import annotations

import pytest

pytest.importorskip("django")
pytest.importorskip("psycopg", reason="only matters where psycopg 3 is installed")

from .support import run_django


def test_importing_pgpool_django_first_makes_djangos_backend_take_psycopg2():
    result = run_django(
        """
import json

import pgpool.django
from django.db.backends.postgresql import psycopg_any

import psycopg  # still importable by everyone else

print(json.dumps({"psycopg3": psycopg_any.is_psycopg3, "psycopg": psycopg.__name__}))
"""
    )
    assert result == {"psycopg3": False, "psycopg": "psycopg"}


def test_a_backend_already_on_psycopg3_is_refused_with_what_to_do():
    result = run_django(
        """
import json

import django.db.backends.postgresql.base  # as django.contrib.postgres does when listed first
from django.core.exceptions import ImproperlyConfigured

try:
    import pgpool.django
except ImproperlyConfigured as exc:
    print(json.dumps({"error": str(exc)}))
"""
    )
    assert "already imported on psycopg 3" in result["error"] and "first in INSTALLED_APPS" in result["error"]
