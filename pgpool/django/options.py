"""``OPTIONS["pool"]``: which pgpool options it may name, and what a wrong name should have been."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

__all__ = ["POOL_OPTIONS", "pool_options"]

# What OPTIONS["pool"] may set: the pool's own keyword arguments (the connect arguments come from the
# rest of the settings, as in Django).
POOL_OPTIONS = (
    "minconn",
    "maxconn",
    "timeout",
    "idle_timeout",
    "max_lifetime",
    "leak_timeout",
    "name",
    "check",
    "configure",
    "reset",
)

# Names other pools give to pgpool's options: psycopg_pool's (what Django's own pool takes), then
# SQLAlchemy's and the Django pool backends' for psycopg2, lowercased.
_RENAMED = {
    "min_size": ("minconn", "psycopg_pool's name"),
    "max_size": ("maxconn", "psycopg_pool's name"),
    "max_idle": ("idle_timeout", "psycopg_pool's name"),
    "pool_size": ("maxconn", "SQLAlchemy's name; pgpool's maxconn bounds all connections"),
    "max_overflow": ("maxconn", "SQLAlchemy's name; pgpool's maxconn bounds all connections"),
    "pool_timeout": ("timeout", "SQLAlchemy's name"),
    "pool_recycle": ("max_lifetime", "SQLAlchemy's name"),
    "recycle": ("max_lifetime", "django-db-connection-pool's name"),
    "pool_pre_ping": ("check", "SQLAlchemy's name; or set CONN_HEALTH_CHECKS: True"),
    "max_conns": ("maxconn", "django-db-geventpool's name"),
}
_NO_EQUIVALENT = {
    "kwargs": "connection parameters go in OPTIONS itself, outside 'pool'",
    "connection_class": "set OPTIONS['connection_factory'] instead",
    "open": "the pool opens at its first use",
    "max_waiting": "pgpool has no bound on its waiting line; timeout bounds each wait",
    "reconnect_timeout": "a failed connect is retried until timeout",
    "num_workers": "pgpool's housekeeping is one thread per pool",
    "reuse_conns": "idle connections are reused until idle_timeout or max_lifetime",
}


def pool_options(alias: str, value: object) -> dict[str, Any] | None:
    """The pgpool options that ``OPTIONS["pool"]`` asks for, or None for no pool.

    A missing key means a pool with the defaults (this backend exists to pool); ``False`` or ``None``
    means no pool, as with Django's stock backend. Unknown names raise `ImproperlyConfigured` naming
    the option and, when it is recognisable, the name pgpool uses.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    where = f"DATABASES[{alias!r}]['OPTIONS']['pool']"
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(f"{where} must be True, False or a dict of pgpool options, got {value!r}")
    for key in value:
        if key not in POOL_OPTIONS:
            raise ImproperlyConfigured(f"{where}: {_unknown(key)}")
    return dict(value)


def _unknown(key: object) -> str:
    if not isinstance(key, str):
        return f"option names are strings, got {key!r}"
    lowered = key.lower()
    if lowered in _RENAMED:
        right, whose = _RENAMED[lowered]
        return f"unknown option {key!r} ({whose}): pgpool calls it {right!r}"
    if lowered in _NO_EQUIVALENT:
        return f"unknown option {key!r}: pgpool has no such option ({_NO_EQUIVALENT[lowered]})"
    close = difflib.get_close_matches(lowered, POOL_OPTIONS, n=1, cutoff=0.6)
    if close:
        return f"unknown option {key!r}: did you mean {close[0]!r}?"
    return f"unknown option {key!r}; pgpool's options are {', '.join(POOL_OPTIONS)}"
