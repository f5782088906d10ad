"""Django's suite on ENGINE "pgpool.django", with a small pool (``runtests.py --settings=settings_pgpool``)."""

from _common import DEFAULT_AUTO_FIELD, PASSWORD_HASHERS, SECRET_KEY, USE_TZ, databases

import pgpool.django  # noqa: F401  # first: Django's backend on psycopg2 (postgres_tests imports it at setup)

DATABASES = databases("pgpool.django", {"pool": {"maxconn": 8, "timeout": 10}})

__all__ = ["DATABASES", "DEFAULT_AUTO_FIELD", "PASSWORD_HASHERS", "SECRET_KEY", "USE_TZ"]
