"""Django in the test process: settings configured once, on the session's server; each test adds its own
alias (its own pool, its own application_name to count its sessions).

Django settings can be configured once per process, so what needs other settings (gevent, the
README's snippets, a management command in a fresh process) runs in a subprocess (`run_django`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("django")

from .support import database_settings

_aliases = itertools.count(1)


@pytest.fixture(scope="session")
def django_settings(base_dsn: str) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            USE_TZ=True,
            TIME_ZONE="UTC",
            INSTALLED_APPS=["pgpool.django"],
            DATABASES={"default": database_settings(base_dsn, OPTIONS={"pool": {"maxconn": 4, "timeout": 5}})},
        )
        django.setup()


@pytest.fixture
def make_alias(django_settings: None, base_dsn: str, app_name: str) -> Iterator[Callable[..., str]]:
    """make_alias(OPTIONS={...}, **settings) -> a new alias whose sessions carry this test's app_name."""
    from django.db import connections

    from pgpool.django import pools

    made: list[str] = []

    def make(**overrides: Any) -> str:
        alias = f"t{next(_aliases)}"
        options = {"application_name": app_name, **overrides.pop("OPTIONS", {})}
        entry = database_settings(base_dsn, OPTIONS=options, **overrides)
        filled = connections.configure_settings({"default": connections.settings["default"], alias: entry})
        connections.settings[alias] = filled[alias]
        made.append(alias)
        return alias

    yield make
    for alias in made:
        try:
            connections[alias].close()
        except Exception:
            pass
        pools.close_pool(alias)
        del connections[alias]
        connections.settings.pop(alias, None)
