"""gunicorn for the example with gevent workers: ``gunicorn -c django_app/gunicorn_gevent.conf.py`` from
examples/. The gevent worker monkey-patches the standard library (threading, time, socket) when it
starts, before it loads the app: pgpool's locks, waits and housekeeper are then greenlet-friendly.
psycopg2 is made cooperative by psycogreen in post_fork. No --preload: the app, and so pgpool, is
imported after the patching.
"""

import os
from typing import Any

bind = os.environ.get("PGPOOL_EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("PGPOOL_EXAMPLE_WORKERS", "2"))
worker_class = "gevent"
worker_connections = 100  # greenlets per worker: many more than maxconn, so they queue in the pool
wsgi_app = "django_app.wsgi:application"
graceful_timeout = 10


def post_fork(server: Any, worker: Any) -> None:
    from psycogreen.gevent import patch_psycopg  # type: ignore[import-untyped]

    patch_psycopg()  # psycopg2 waits through gevent: a query yields to other greenlets
