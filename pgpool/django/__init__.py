"""pgpool as a Django database backend: ``"ENGINE": "pgpool.django"`` (Django's PostgreSQL backend
on psycopg2, its connections from one pgpool pool per alias per process).

``OPTIONS["pool"]`` is ``True`` (the defaults), a dict of pgpool's options, or ``False`` (no pool).
Add ``"pgpool.django"`` to ``INSTALLED_APPS`` for the ``pgpool_stats`` management command. See the
README's Django section. Importing it makes Django's PostgreSQL backend take psycopg2 even where
psycopg 3 is installed (`pgpool.django._psycopg2`).
"""

from ._psycopg2 import require_psycopg2_backend

require_psycopg2_backend()  # before anything imports Django's PostgreSQL backend on psycopg 3

from .pools import close_all_pools, pool_stats  # noqa: E402

__all__ = ["close_all_pools", "pool_stats"]
