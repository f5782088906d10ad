"""Borrowing that cannot leak: ``pool.connection()``, ``pool.transaction()`` and propagation.

Each pool has a `ContextVar` holding the borrow in progress in the current context (thread, or task).
A nested borrow of the same pool joins it instead of taking a second connection, which could
deadlock on the first one's row locks or exhaust the pool. Only the outermost borrow gives the
connection back.

Commit rules:

- ``connection()``: never commits; on return the pool rolls back what was left uncommitted.
- ``transaction()``: commits when the block ends normally, rolls back when it raises.
- ``transaction()`` inside a ``transaction()`` of the same pool: a savepoint, released on success and
  rolled back to on failure (the exception propagates; the outer transaction may catch it and commit).
- ``transaction()`` inside a plain ``connection()``: a real transaction on the joined connection,
  committed at its own end.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

import psycopg2.extensions

if TYPE_CHECKING:
    from .pool import ConnectionPool

Connection = psycopg2.extensions.connection

_savepoint_ids = itertools.count(1)


class Borrow:
    """A connection borrowed in a context, shared with the borrows nested in it."""

    __slots__ = ("conn", "in_transaction")

    def __init__(self, conn: Connection, in_transaction: bool) -> None:
        self.conn = conn
        self.in_transaction = in_transaction  # a transaction() block of this borrow is open


def new_borrow_var(pool_name: str) -> ContextVar[Borrow | None]:
    return ContextVar(f"pgpool-borrow:{pool_name}", default=None)


class ConnectionBorrow:
    """``with pool.connection() as conn``: a class, not a generator, to keep the borrow cheap."""

    __slots__ = ("_conn", "_pool", "_timeout", "_token")

    def __init__(self, pool: ConnectionPool, timeout: float | None = None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        pool = self._pool
        joined = pool._borrow.get()
        if joined is not None:
            return joined.conn  # nested: the outer borrow returns it
        conn = pool.getconn(self._timeout)
        try:
            self._token = pool._borrow.set(Borrow(conn, in_transaction=False))
        except BaseException:
            pool.putconn(conn)
            raise
        self._conn = conn
        return conn

    def __exit__(self, *exc_info: object) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        try:
            self._pool._borrow.reset(self._token)
        finally:
            self._pool.putconn(conn)


@contextlib.contextmanager
def transaction(pool: ConnectionPool, timeout: float | None = None) -> Iterator[Connection]:
    joined = pool._borrow.get()
    if joined is not None and joined.in_transaction:
        with _savepoint(joined.conn):
            yield joined.conn
        return
    # Otherwise a real transaction, on the connection of a plain borrow around it or on a new one.
    with ConnectionBorrow(pool, timeout) as conn:
        state = pool._borrow.get()
        assert state is not None and state.conn is conn
        state.in_transaction = True
        try:
            with _real_transaction(conn):
                yield conn
        finally:
            state.in_transaction = False


@contextlib.contextmanager
def _real_transaction(conn: Connection) -> Iterator[None]:
    """Commit on success, roll back on any exception; works on autocommit connections too."""
    was_autocommit = conn.autocommit
    if was_autocommit:
        conn.autocommit = False  # psycopg2 then opens the transaction at the first statement
    try:
        try:
            yield
        except BaseException:
            _quiet_rollback(conn)
            raise
        conn.commit()
    finally:
        if was_autocommit and not conn.closed:
            with contextlib.suppress(psycopg2.Error):
                if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                    conn.rollback()  # a failed commit; never leave it open
                conn.autocommit = True


@contextlib.contextmanager
def _savepoint(conn: Connection) -> Iterator[None]:
    name = f"pgpool_sp_{next(_savepoint_ids)}"
    with conn.cursor() as cur:
        cur.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        with contextlib.suppress(psycopg2.Error), conn.cursor() as cur:
            cur.execute(f"ROLLBACK TO SAVEPOINT {name}")
        raise
    with conn.cursor() as cur:
        cur.execute(f"RELEASE SAVEPOINT {name}")


def _quiet_rollback(conn: Connection) -> None:
    """Roll back without masking the exception being handled (a broken connection is discarded later)."""
    with contextlib.suppress(psycopg2.Error):
        conn.rollback()
