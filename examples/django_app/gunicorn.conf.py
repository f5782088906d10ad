"""gunicorn for the example with threads: ``gunicorn -c django_app/gunicorn.conf.py django_app.wsgi`` from
examples/. Each worker has its own pool (pgpool.django makes one per alias per process, fresh after
fork), so --preload needs no hook; maxconn (PGPOOL_EXAMPLE_MAXCONN) should not exceed the threads.
"""

import os

bind = os.environ.get("PGPOOL_EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("PGPOOL_EXAMPLE_WORKERS", "2"))
worker_class = os.environ.get("PGPOOL_EXAMPLE_WORKER_CLASS", "gthread")  # or "sync"
threads = int(os.environ.get("PGPOOL_EXAMPLE_THREADS", "4"))
preload_app = True
wsgi_app = "django_app.wsgi:application"
graceful_timeout = 10
