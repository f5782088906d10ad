"""Django's PostgreSQL backend on psycopg2, even where psycopg 3 is installed too.

Django's backend takes psycopg 3 whenever ``import psycopg`` works, and decides once, when
``django.db.backends.postgresql`` is first imported. pgpool pools psycopg2 connections, so this
module imports that backend with ``psycopg`` hidden (a ``None`` entry in ``sys.modules`` makes its
import fail), then puts back what was there. It runs when ``pgpool.django`` is imported: from
``INSTALLED_APPS`` (list it before ``django.contrib.postgres``, which imports the backend too), from
``ENGINE``, or from a settings module.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from django.core.exceptions import ImproperlyConfigured

__all__ = ["require_psycopg2_backend"]

_DECIDES = "django.db.backends.postgresql.psycopg_any"  # where Django picks psycopg or psycopg2
_ABSENT = object()


def require_psycopg2_backend() -> None:
    """Import Django's PostgreSQL backend on psycopg2; raise if it was imported on psycopg 3 already."""
    if _DECIDES not in sys.modules:
        saved = sys.modules.get("psycopg", _ABSENT)
        # Only Django's first import of the backend is affected; nothing else imports psycopg meanwhile
        # in a process that is still importing its settings or apps.
        sys.modules["psycopg"] = None  # type: ignore[assignment]
        try:
            import django.db.backends.postgresql.base  # noqa: F401
        finally:
            if saved is _ABSENT:
                del sys.modules["psycopg"]
            else:
                sys.modules["psycopg"] = saved  # type: ignore[assignment]
    # Not in django-stubs: imported by name, so that type checkers take it as a module of unknown type.
    psycopg_any: Any = importlib.import_module("django.db.backends.postgresql.psycopg_any")

    if psycopg_any.is_psycopg3:
        raise ImproperlyConfigured(
            "pgpool.django runs Django's PostgreSQL backend on psycopg2, but it was already imported on psycopg 3"
            " (by django.contrib.postgres or another alias, before pgpool.django): list 'pgpool.django' first in"
            " INSTALLED_APPS, import pgpool.django in the settings module, or uninstall psycopg"
        )
