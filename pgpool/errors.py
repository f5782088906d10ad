"""The exceptions pgpool raises."""

from __future__ import annotations

import psycopg2.errors
import psycopg2.pool

__all__ = ["PoolClosed", "PoolError", "PoolTimeout", "TransactionRolledBack"]


class PoolError(psycopg2.pool.PoolError):
    """Base of every error raised by a pgpool pool (also a ``psycopg2.pool.PoolError``)."""

    __module__ = "pgpool"


class PoolTimeout(PoolError):
    """No connection could be lent within the allowed wait."""

    __module__ = "pgpool"


class PoolClosed(PoolError):
    """The pool was closed: it lends no more connections."""

    __module__ = "pgpool"


class TransactionRolledBack(PoolError, psycopg2.errors.InFailedSqlTransaction):
    """A `transaction()` block ended normally, but a statement in it had failed: the server rolled
    the transaction back, so nothing was committed (also a ``psycopg2.errors.InFailedSqlTransaction``)."""

    __module__ = "pgpool"
    pgcode = "25P02"  # in_failed_sql_transaction: what PostgreSQL says to any statement after the error
