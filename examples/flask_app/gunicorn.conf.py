"""gunicorn settings for the Flask example: ``cd examples && gunicorn -c flask_app/gunicorn.conf.py``.

Sessions on the server: workers x maxconn (PGPOOL_EXAMPLE_MAXCONN, 4 by default) for the workers,
plus the master's minconn (1) opened by the startup check. Keep that under the server's
max_connections, with room for everything else that connects to it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

wsgi_app = "flask_app.app:app"
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
preload_app = True  # import the app (and create the pool) once in the master, then fork
workers = 3
worker_class = "gthread"
threads = 4  # per worker: no use for a maxconn above this
graceful_timeout = 10  # on SIGTERM, in-flight requests get this long to finish
# The pool needs no post_fork hook: pgpool resets its pools in each forked worker by itself.
# gunicorn >= 25.1 opens a control socket in $XDG_RUNTIME_DIR or ~/.gunicorn/: not wanted here.
control_socket_disable = True


def post_fork(server: Arbiter, worker: Worker) -> None:
    # Only for the optional metrics (PGPOOL_EXAMPLE_METRICS_PORT): each worker reports its own pool,
    # through an HTTP server thread of its own (fork copies no thread of the master).
    if os.environ.get("PGPOOL_EXAMPLE_METRICS_PORT"):
        import bank_dao

        bank_dao.serve_metrics(bank_dao.get_pool())
