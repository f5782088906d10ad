"""The exceptions pgpool raises."""

from __future__ import annotations

import psycopg2.pool

__all__ = ["PoolClosed", "PoolError", "PoolTimeout"]


class PoolError(psycopg2.pool.PoolError):
    """Base of every error raised by a pgpool pool (also a ``psycopg2.pool.PoolError``)."""

    __module__ = "pgpool"


class PoolTimeout(PoolError):
    """No connection could be lent within the allowed wait."""

    __module__ = "pgpool"


class PoolClosed(PoolError):
    """The pool was closed: it lends no more connections."""

    __module__ = "pgpool"
