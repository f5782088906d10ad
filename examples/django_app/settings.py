"""Settings of the example: the database from PGPOOL_DSN, pooled by pgpool.django.

PGPOOL_EXAMPLE_MAXCONN sets each worker's pool size (default 4): the server sees at most
workers x maxconn sessions.
"""

from __future__ import annotations

import os

import psycopg2.extensions

_params = psycopg2.extensions.parse_dsn(os.environ.get("PGPOOL_DSN", ""))

SECRET_KEY = "pgpool-example-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django_app.ledger", "pgpool.django"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_app.urls"
WSGI_APPLICATION = "django_app.wsgi.application"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "pgpool.django",
        "NAME": _params.get("dbname", "postgres"),
        "USER": _params.get("user", ""),
        "PASSWORD": _params.get("password", ""),
        "HOST": _params.get("host", "127.0.0.1"),
        "PORT": _params.get("port", ""),
        "OPTIONS": {
            "application_name": "pgpool-django-example",
            "pool": {
                "name": "ledger",
                "minconn": 1,
                "maxconn": int(os.environ.get("PGPOOL_EXAMPLE_MAXCONN", "4")),
                "timeout": 10,
                "leak_timeout": 30,
            },
        },
    }
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"pgpool": {"handlers": ["console"], "level": "WARNING"}},
}
