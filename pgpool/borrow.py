"""Borrowing that cannot leak: ``pool.connection()``, ``pool.transaction()`` and propagation.

Each pool has a `ContextVar` holding the borrow in progress in the current context. A nested borrow of
the same pool joins it instead of taking a second connection (which could deadlock on the first one's
row locks or exhaust the pool), but only a borrow **made by the same thread, in this process, and
still open**: a context copied into another thread (``asyncio.to_thread``, an executor running
``copy_context().run``), a generator finished elsewhere, or a child after ``fork`` never joins and never
shares a connection. Only the outermost borrow gives the connection back.

Commit rules:

- ``connection()``: never commits; on return the pool rolls back what was left uncommitted.
- ``transaction()``: commits when the block ends normally, rolls back when it raises.
- ``transaction()`` inside a ``transaction()`` of the same pool: a savepoint, released on success and
  rolled back to on failure (the exception propagates; the outer transaction may catch it and commit).
- ``transaction()`` inside a plain ``connection()``: a real transaction on the joined connection,
  committed at its own end (with whatever the plain block did before it).

Interrupts: once ``__enter__`` has returned, ``__exit__`` gives the connection back whatever lands
where: every call it makes that must happen is made again if an interrupt lands on its entry. The one
point no Python code can protect is the entry of ``__exit__`` itself when *your* ``with`` statement
calls it; pgpool's own callers (``transaction()``, the decorators) call it again in that case.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections.abc import Generator
from contextvars import Context, ContextVar
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import psycopg2.extensions

from . import _cleanup, _failover, _fork
from ._state import TIDY, PoolState
from .errors import TransactionRolledBack

Connection = psycopg2.extensions.connection
C = TypeVar("C", bound=Connection)  # the pool's connection class (connection_factory)


class BorrowedPool(Protocol):
    """What a borrow needs of its pool (`pgpool.pool.ConnectionPool`): its fast paths, its slow
    lend and return, and its ContextVar."""

    name: str
    timeout: float
    _borrow: ContextVar[weakref.ref[Borrow] | None]
    _fast_lend: bool
    _fast_return: bool
    _state: PoolState

    def _checked_timeout(self, timeout: float) -> float: ...
    def _lend(self, wait: float) -> tuple[Connection, int]: ...
    def _return(self, conn: Connection, lease: int | None, close: bool = False) -> None: ...
    def _finish_borrow(self, conn: Connection, lease: int, close: bool = False) -> None: ...
    def _tidy(self) -> None: ...
    def _evict(self, conn: Connection | None, reason: str) -> bool: ...


_savepoint_ids = itertools.count(1)
_weak = weakref.ref
_STATUS_INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_monotonic = time.monotonic


class _ThisThread(threading.local):
    """`token`: an object of the running thread's own, made at its first borrow. Unlike a thread
    ident, which the system reuses, it is never another thread's while a borrow holds it."""

    def __init__(self) -> None:
        self.token = object()


_this_thread = _ThisThread()


def thread_token() -> object:
    """The running thread's token (see `_ThisThread`): who may join a borrow."""
    return _this_thread.token


class Borrow:
    """A connection borrowed by one thread, joined by that thread's nested borrows while it is open
    (the fields of a `ConnectionBorrow` that the pool's ContextVar exposes to nested borrows)."""

    __slots__ = ("__weakref__", "conn", "generation", "in_transaction", "thread")

    conn: Connection | None  # None once the borrow ended: never joined again, from any context
    thread: object  # the token of the thread allowed to join it (see thread_token)
    generation: int  # the fork generation it was made in
    in_transaction: bool  # a transaction() block of this borrow is open


def new_borrow_var(pool_name: str) -> ContextVar[weakref.ref[Borrow] | None]:
    return ContextVar(f"pgpool-borrow:{pool_name}", default=None)


def joinable(pool: BorrowedPool) -> Borrow | None:
    """The borrow of `pool` that a nested borrow here may join: this thread's, open, of this process."""
    ref = pool._borrow.get()
    found = None if ref is None else ref()
    if (
        found is not None
        and found.conn is not None
        and found.thread is _this_thread.token
        and found.generation == _fork.generation
    ):
        return found
    return None


class ConnectionBorrow(Borrow, Generic[C]):
    """``with pool.connection() as conn``: a class, not a generator, to keep the borrow cheap.

    While its own borrow is open, it is the `Borrow` that the pool's ContextVar holds.

    Made by `connection_borrow` (or inline by `ConnectionPool.connection`), without ``__init__``:
    calling a class whose ``__init__`` is Python code costs about 800 instructions more, on every
    with-block (CPython 3.11 does not inline it).
    """

    __slots__ = ("_join", "_joined", "_lease", "_pool", "_timeout", "_token")

    _pool: BorrowedPool
    _timeout: float | None  # None: the pool's
    _join: bool  # False: always a borrow of its own (decorated generators)
    _joined: Borrow | None  # the outer borrow we joined, if we did

    def __enter__(self) -> C:
        pool = self._pool
        if self.conn is not None:
            raise RuntimeError(f"this borrow of pool {pool.name!r} is already entered: use a new pool.connection()")
        if self._join and pool._borrow.get() is not None:
            outer = joinable(pool)
            if outer is not None and outer.conn is not None:
                self._joined = outer
                return outer.conn  # type: ignore[return-value]  # nested: the outer borrow returns it
        item = None
        if self._timeout is None and pool._fast_lend:
            item = pool._state.lend_fast(_monotonic())
        if item is not None:
            conn, lease = item[0], item[1].lease
        else:
            wait = pool.timeout if self._timeout is None else pool._checked_timeout(self._timeout)
            conn, lease = pool._lend(wait)
        try:
            # No Python call from here to the end of the block: the borrow exists whole or not at all.
            self.thread = _this_thread.token
            self.generation = _fork.generation
            self.in_transaction = False
            self._lease = lease
            self.conn = conn
            # Held weakly: a block whose __exit__ an interrupt skipped (the one point no code can
            # protect) leaves nothing here that nested borrows would join, or that would keep its
            # connection from the collector, which then frees its slot.
            self._token = pool._borrow.set(_weak(self))
        except BaseException:
            self.conn = None
            for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
                try:
                    for _ in _cleanup.RETRIES:
                        try:
                            pool._finish_borrow(conn, lease)
                            break
                        except BaseException:
                            pass
                    break
                except BaseException:  # on the inner loop's back-edge
                    pass
            raise
        return conn  # type: ignore[return-value]  # opened by connection_factory (no cast(): a call)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn = self.conn
        if conn is None:
            self._joined = None
            return  # joined an outer borrow, or already ended
        self.conn = None  # ended: never joined again, from any context
        pool = self._pool
        lease = self._lease
        # From here every point an interrupt can land on is inside the try: its retry is idempotent.
        try:
            try:
                pool._borrow.reset(self._token)
            except (ValueError, RuntimeError):
                # Ended in another context (a generator finished in another thread): that context
                # keeps an ended borrow, which nothing joins.
                pass
            if exc_type is not None:
                reason = _failover.eviction_reason(exc)
                if reason is not None:  # the server was demoted or is going away: a new generation
                    pool._evict(conn, reason)
            state = pool._state
            conn_id = id(conn)
            info = state.lent.get(conn_id)  # one atomic dict read
            if info is not None and info.lease == lease and pool._fast_return:
                done = state.return_fast(conn, conn_id, info, _monotonic())
                if done is not None:
                    if done is TIDY:
                        pool._tidy()
                    return
            pool._return(conn, lease)
        except BaseException:
            for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
                try:
                    for _ in _cleanup.RETRIES:
                        try:
                            pool._finish_borrow(conn, lease)
                            break
                        except BaseException:
                            pass
                    break
                except BaseException:  # on the inner loop's back-edge
                    pass
            raise


def connection_borrow(pool: BorrowedPool, timeout: float | None = None, join: bool = True) -> ConnectionBorrow[Any]:
    """A `ConnectionBorrow` of `pool` (`ConnectionPool.connection` makes its own inline)."""
    made: ConnectionBorrow[Any] = ConnectionBorrow()
    made._pool = pool
    made._timeout = timeout
    made._join = join
    made.conn = None  # our own borrow's connection, from __enter__ until it ends
    return made


class TransactionBorrow(ConnectionBorrow[C]):
    """``with pool.transaction() as conn``: commit on success, roll back on any exception.

    A `ConnectionBorrow` that also runs a transaction on its connection (its own, or the plain borrow
    around it that it joins), or a savepoint inside the transaction around it. Made, like its base,
    without a Python ``__init__`` (`transaction_borrow`, or inline by `ConnectionPool.transaction`):
    one object and no extra frame per block.
    """

    __slots__ = ("_entry", "_savepoint", "_tx_conn", "_was_autocommit")

    _savepoint: str | None  # the savepoint's name, nested in another transaction() of this thread
    _tx_conn: C | None  # the transaction's connection, from __enter__ until the transaction ends
    _entry: Borrow | None  # the borrow whose in_transaction this transaction set (ours, or joined)
    _was_autocommit: bool

    def __enter__(self) -> C:
        pool = self._pool
        if self._tx_conn is not None:
            raise RuntimeError(
                f"this transaction of pool {pool.name!r} is already entered: use a new pool.transaction()"
            )
        self._savepoint = None  # a savepoint only if this entry makes one (the object may be reused)
        self.generation = _fork.generation  # a child after fork never commits the parent's work
        if self._join and pool._borrow.get() is not None:
            outer = joinable(pool)
            if outer is not None and outer.in_transaction and outer.conn is not None:
                conn: C = outer.conn  # type: ignore[assignment]
                name = f"pgpool_sp_{next(_savepoint_ids)}"
                with conn.cursor() as cur:
                    cur.execute(f"SAVEPOINT {name}")
                self._savepoint = name
                self._tx_conn = conn
                return conn
        # A real transaction, on the connection of a plain borrow around it or on a new one.
        conn = ConnectionBorrow.__enter__(self)
        try:
            entry = self if self.conn is not None else self._joined
            assert entry is not None
            self._entry = entry
            entry.in_transaction = True
            self._was_autocommit = was = conn.autocommit
            if was:
                conn.autocommit = False  # psycopg2 then opens the transaction at the first statement
            self._tx_conn = conn
        except BaseException as exc:
            for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
                try:
                    for _ in _cleanup.RETRIES:
                        try:
                            ConnectionBorrow.__exit__(self, type(exc), exc, exc.__traceback__)
                            break
                        except BaseException:
                            pass
                    break
                except BaseException:  # on the inner loop's back-edge
                    pass
            raise
        return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn = self._tx_conn
        if conn is None:
            return  # ended already (pgpool's callers may call again after an interrupt)
        self._tx_conn = None
        if self.generation != _fork.generation:
            return  # begun before a fork: the connection is the parent's, disowned here
        name = self._savepoint
        if name is not None:
            # Release the savepoint on success; roll back to it on failure (the error propagates).
            # Only C calls: the savepoint ends, one way or the other, once this method has started.
            if exc_type is None:
                try:
                    with conn.cursor() as cur:
                        cur.execute(f"RELEASE SAVEPOINT {name}")
                    return
                except BaseException:
                    try:
                        with conn.cursor() as cur:
                            cur.execute(f"ROLLBACK TO SAVEPOINT {name}")
                    except psycopg2.Error:
                        pass
                    raise
            try:
                with conn.cursor() as cur:
                    cur.execute(f"ROLLBACK TO SAVEPOINT {name}")
            except psycopg2.Error:
                pass
            return
        entry = self._entry
        assert entry is not None
        # Only C calls until the plain borrow ends: no interrupt can land between commit and return.
        try:
            status = conn.get_transaction_status()
            if exc_type is None:
                try:
                    if status == _STATUS_INERROR:
                        # The block caught an SQL error: COMMIT would only end in the server's
                        # ROLLBACK, and psycopg2 would report it as a success.
                        raise TransactionRolledBack(
                            f"transaction of pool {self._pool.name!r} rolled back by the server: a statement "
                            "in the block failed and the block went on (nothing was committed); "
                            "use a nested pool.transaction() around a statement that may fail"
                        )
                    if status != _STATUS_IDLE:  # nothing begun, nothing to commit (commit() drops the GIL)
                        conn.commit()
                except BaseException:
                    try:
                        conn.rollback()  # a failed commit; never leave it open
                    except psycopg2.Error:
                        pass
                    raise
            elif status != _STATUS_IDLE:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    pass  # a broken connection: the pool discards it on return
        finally:
            entry.in_transaction = False
            if self._was_autocommit and not conn.closed:
                try:
                    if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                        conn.rollback()
                    conn.autocommit = True
                except psycopg2.Error:
                    pass
            try:
                ConnectionBorrow.__exit__(self, exc_type, exc, tb)
            except BaseException:
                for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
                    try:
                        for _ in _cleanup.RETRIES:
                            try:
                                ConnectionBorrow.__exit__(self, exc_type, exc, tb)
                                break
                            except BaseException:
                                pass
                        break
                    except BaseException:  # on the inner loop's back-edge
                        pass
                raise


def transaction_borrow(pool: BorrowedPool, timeout: float | None = None, join: bool = True) -> TransactionBorrow[Any]:
    """A `TransactionBorrow` of `pool` (`ConnectionPool.transaction` makes its own inline)."""
    made: TransactionBorrow[Any] = TransactionBorrow()
    made._pool = pool
    made._timeout = timeout
    made._join = join
    made.conn = None
    made._savepoint = None
    made._tx_conn = None
    return made


# The borrows held by decorated generators, keyed by a weak reference to the generator. When one is
# garbage collected unfinished, the weakref's callback wakes its pool's housekeeper (one C call, safe
# in a finalizer: see pgpool.housekeeping), whose round ends the borrow (rolled back) at once; so does
# the pool's close(). A finalizer itself must do no more: it may run while this very thread holds the
# pool's lock.
held_by_generators: dict[
    weakref.ref[Any], tuple[Context, ConnectionBorrow[Any] | TransactionBorrow[Any], Generator[Any, Any, Any] | None]
] = {}


def end_dropped_borrows() -> None:
    """End the borrows of decorated generators garbage collected unfinished (rolled back)."""
    for ref in [ref for ref in list(held_by_generators) if ref() is None]:  # list(): one atomic copy
        end_held_borrow(ref)


def end_generator_borrows(pool: BorrowedPool) -> None:
    """End every borrow of `pool` held by a decorated generator (the pool is closing): dropped ones
    here, live ones by the generator itself (its finally clauses run, then its borrow ends)."""
    for ref, entry in list(held_by_generators.items()):
        if entry[1]._pool is not pool:
            continue
        generator = ref()
        if generator is None:
            end_held_borrow(ref)
        else:
            generator.end_for_closed_pool()
            del generator


def end_held_borrow(ref: weakref.ref[Any]) -> None:
    """End one generator's borrow: the user's generator first (its finally clauses still use the
    connection, which must not reach another borrower before they ran), then the borrow."""
    entry = held_by_generators.pop(ref, None)  # atomic: of two threads ending it, one gets it
    if entry is None:
        return
    ctx, borrow, inner = entry
    try:
        if inner is not None:
            try:
                ctx.run(inner.close)
            except Exception:
                pass  # its own error; the borrow is rolled back below all the same
        ctx.run(borrow.__exit__, GeneratorExit, GeneratorExit(), None)
    except BaseException as exc:
        try:
            ctx.run(borrow.__exit__, type(exc), exc, None)  # idempotent: finishes an interrupted exit
        except BaseException:
            held_by_generators[ref] = entry  # still held (a store: no interrupt lands on it): retried
            raise
        if not isinstance(exc, Exception):
            raise


os.register_at_fork(after_in_child=held_by_generators.clear)  # the parent's borrows, disowned in the child
