"""The baseline: Django's suite on its stock PostgreSQL backend (``runtests.py --settings=settings_stock``)."""

from _common import DEFAULT_AUTO_FIELD, PASSWORD_HASHERS, SECRET_KEY, USE_TZ, databases

import pgpool.django  # noqa: F401  # the baseline on psycopg2 too, where psycopg 3 is installed as well

DATABASES = databases("django.db.backends.postgresql", {})

__all__ = ["DATABASES", "DEFAULT_AUTO_FIELD", "PASSWORD_HASHERS", "SECRET_KEY", "USE_TZ"]
