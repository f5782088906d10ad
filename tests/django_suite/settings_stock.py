"""The baseline: Django's suite on its stock PostgreSQL backend (``runtests.py --settings=settings_stock``)."""

from _common import DEFAULT_AUTO_FIELD, PASSWORD_HASHERS, SECRET_KEY, USE_TZ, databases

DATABASES = databases("django.db.backends.postgresql", {})

__all__ = ["DATABASES", "DEFAULT_AUTO_FIELD", "PASSWORD_HASHERS", "SECRET_KEY", "USE_TZ"]
