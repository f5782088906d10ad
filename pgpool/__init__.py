"""pgpool: a connection pool for psycopg2 that cannot leak, and what production needs on top.

Start with `ThreadSafeConnectionPool` and ``with pool.connection() as conn:``; see the README.
"""

from .decorators import with_connection, with_transaction
from .errors import PoolClosed, PoolError, PoolTimeout
from .health import check_connection, reset_session
from .pool import ConnectionPool, ThreadSafeConnectionPool

__all__ = [
    "ConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ThreadSafeConnectionPool",
    "check_connection",
    "reset_session",
    "with_connection",
    "with_transaction",
]

__version__ = "1.0.0"
