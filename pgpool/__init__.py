"""pgpool: a connection pool for psycopg2 that cannot leak, and what production needs on top.

Start with `ThreadSafeConnectionPool` and ``with pool.connection() as conn:``; see the README.
"""

import logging

from .decorators import BORROWED, with_connection, with_transaction
from .errors import PoolClosed, PoolError, PoolTimeout, TransactionRolledBack
from .health import check_connection, reset_session
from .pool import ConnectionPool, PoolStats, ThreadSafeConnectionPool

__all__ = [
    "BORROWED",
    "ConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolStats",
    "PoolTimeout",
    "ThreadSafeConnectionPool",
    "TransactionRolledBack",
    "check_connection",
    "reset_session",
    "with_connection",
    "with_transaction",
]

__version__ = "1.0.0"

# A library's manners: records go nowhere until the application configures logging.
logging.getLogger("pgpool").addHandler(logging.NullHandler())
