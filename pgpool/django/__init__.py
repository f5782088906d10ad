"""pgpool as a Django database backend: ``"ENGINE": "pgpool.django"`` (Django's PostgreSQL backend
on psycopg2, its connections from one pgpool pool per alias per process).

``OPTIONS["pool"]`` is ``True`` (the defaults), a dict of pgpool's options, or ``False`` (no pool).
Add ``"pgpool.django"`` to ``INSTALLED_APPS`` for the ``pgpool_stats`` management command. See the
README's Django section.
"""

from .pools import close_all_pools, pool_stats

__all__ = ["close_all_pools", "pool_stats"]
