"""The public pools: `ConnectionPool` and `ThreadSafeConnectionPool`, a façade over the state machine.

A port of the ``psycopg2_pool`` module's behaviour (LIFO idle list, ``idle_timeout``, ``minconn``
refill, rollback on return) with its defects fixed, plus what production use needs. Where things live:

- `pgpool._state`: the state machine: what is idle, lent, opening, closing, waiting (no I/O), with
  the lock-free fast steps of a lend and a return;
- `pgpool._lending`, `pgpool._returning`: the slow paths of `getconn` and `putconn`;
- `pgpool._core`: what they share: opening connections in reserved slots, closing dropped ones;
- `pgpool._connect`: one connect (settings validation, connect, configure, retry policy);
- `pgpool._session`: the checks before a lend and the cleanup after a return;
- `pgpool._maintenance`, `pgpool.housekeeping`: the background rounds and their thread;
  `pgpool._fork`: fork safety;
- `pgpool.borrow`, `pgpool.decorators`: borrowing that cannot leak.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Self, TypedDict, cast

import psycopg2
import psycopg2.extensions

from . import _fork, borrow
from ._connect import Connector
from ._core import PoolCore, check_timeout, is_number
from ._failover import ServerTarget
from ._lending import Lending
from ._maintenance import Maintenance
from ._returning import Returning
from ._state import TIDY, PoolState
from ._views import ReturnTimes
from .errors import PoolClosed, PoolError
from .housekeeping import Housekeeper

__all__ = ["ConnectionPool", "PoolStats", "ThreadSafeConnectionPool"]

Connection = psycopg2.extensions.connection
# The connection class: connection_factory's, else psycopg2's. The default (PEP 696) is for the type
# checkers, which have typing_extensions; at run time (Python 3.11) TypeVar takes no default.
if TYPE_CHECKING:
    from typing_extensions import TypeVar

    C = TypeVar("C", bound=Connection, default=Connection)
else:
    from typing import TypeVar

    C = TypeVar("C", bound=Connection)
Hook = Callable[[Any], Any]

logger = logging.getLogger("pgpool")

_names = itertools.count(1)
_monotonic = time.monotonic


def _weak_call(method: Callable[[], None]) -> Callable[[], None]:
    """Call `method` while its object lives (a callback that does not keep the object alive)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


def _check_hook(name: str, hook: object) -> None:
    if hook is not None and not callable(hook):
        raise TypeError(f"{name} must be a callable taking a connection, got {hook!r}")


class PoolStats(TypedDict):
    """What `ConnectionPool.stats` returns: sizes, current counts, and counters that only grow.

    - ``name``, ``minconn``, ``maxconn``: the pool's settings.
    - ``idle``: idle connections; ``in_use``: lent, or being returned; ``opening``: connects in
      progress; ``closing``: closes in progress (their slots still taken); ``waiting``: threads
      waiting in `getconn`.
    - ``checkouts``: connections lent, ever; ``requests_waited``: `getconn` calls that had to wait;
      ``connections_opened``, ``connections_closed``; ``connect_errors``: failed connects;
      ``timeouts``: `PoolTimeout` raised; ``broken_discarded``: connections found broken on return,
      before a lend or while idle; ``leaked``: lent connections garbage collected without `putconn`;
      ``evictions``: rounds of replacing every connection after a failover sign or `drain`.
    - ``wait_ms_total``, ``usage_ms_total`` (time connections spent lent), ``connect_ms_total``:
      milliseconds, summed.
    """

    name: str
    minconn: int
    maxconn: float
    idle: int  # idle connections
    in_use: int  # lent, or being returned
    opening: int  # connects in progress
    closing: int  # closes in progress (their slots are still taken)
    waiting: int  # threads waiting in getconn
    checkouts: int  # connections lent, ever
    requests_waited: int  # getconn calls that had to wait
    connections_opened: int
    connections_closed: int
    connect_errors: int
    timeouts: int
    broken_discarded: int  # found broken on return, before a lend or while idle
    leaked: int  # lent connections garbage collected without putconn
    wait_ms_total: int
    usage_ms_total: int  # time connections spent lent
    connect_ms_total: int
    evictions: int  # rounds of closing every connection opened before: a failover seen, or drain()


class ConnectionPool(Generic[C]):
    """A pool of psycopg2 connections, for one thread.

    `getconn` lends a connection and `putconn` takes it back: after `getconn` you must call `putconn`,
    or better, borrow with ``with pool.connection() as conn:``, which cannot forget. Connections are
    opened on demand up to `maxconn`; `minconn` of them are opened at construction and kept open
    (this class reopens them inside `putconn`, as ``psycopg2_pool`` does).

    Attributes, as in ``psycopg2_pool``: `minconn`, `maxconn`, `idle_timeout`, `connect_kwargs`;
    `idle_connections` (a snapshot deque, the most recently returned on the right: last in, first
    out); `connections_in_use` (a weak set snapshot of the lent connections); `return_times` (a dict
    snapshot, idle connection -> ``time.monotonic()`` of its return; setting an entry ages that
    connection, as psycopg2_pool's own tests do). Read them; changing the snapshots changes nothing
    else.

    The pool has a lock even in this single-threaded class, because its housekeeping thread changes
    its state too. This class refuses ``timeout > 0``: with one thread, nobody could return a
    connection while `getconn` waits. Use `ThreadSafeConnectionPool` from several threads.

    :param minconn: connections opened at construction and kept open (default 1).
    :param maxconn: the most connections open at once, lent or idle: the sessions the server sees
        (default unbounded, as in ``psycopg2_pool``).
    :param idle_timeout: seconds a connection may stay idle beyond `minconn` before it is closed; 0
        closes every return beyond `minconn` (default 600).
    :param name: the pool's name in reprs, errors and log records (default ``pgpool-1``, ...).
    :param timeout: seconds `getconn` waits when `maxconn` are lent, then `PoolTimeout`; 0 (the
        default) raises `PoolError` at once. `ThreadSafeConnectionPool` only.
    :param check: called with each connection before it is lent (e.g. `check_connection`); if it
        raises, the connection is discarded and another one tried.
    :param configure: called once with each new connection, before its first use (``SET``s,
        ``autocommit``, adapters); if it raises, the error reaches the caller at once.
    :param reset: called with each returned connection after the rollback (e.g. `reset_session`).
    :param max_lifetime: seconds after which a connection is closed when it comes back or is found
        idle, up to 5% early at random (default: never).
    :param leak_timeout: seconds after which a connection still lent is reported once, with the stack
        that borrowed it, as a WARNING (default: never).
    :param connection_factory: the connection class, passed to ``psycopg2.connect``.
    :param connect_kwargs: everything else is a connection setting for ``psycopg2.connect``:
        ``dsn="postgresql://..."`` or libpq keywords (``host=``, ``dbname=``, ``target_session_attrs=``);
        a keyword that is neither is refused, naming the nearest option.
    """

    _can_wait = False
    _refill_in_background = False

    def __init__(
        self,
        minconn: int = 1,
        maxconn: float = float("inf"),
        idle_timeout: float = 600,
        *,
        name: str | None = None,
        timeout: float = 0.0,
        check: Hook | None = None,
        configure: Hook | None = None,
        reset: Hook | None = None,
        max_lifetime: float | None = None,
        leak_timeout: float | None = None,
        connection_factory: type[C] | None = None,
        **connect_kwargs: Any,
    ) -> None:
        if connection_factory is not None:
            connect_kwargs["connection_factory"] = connection_factory
        self.name = str(name) if name is not None else f"pgpool-{next(_names)}"
        self._validate(minconn, maxconn, idle_timeout, timeout, max_lifetime, leak_timeout)
        for hook_name, hook in (("check", check), ("configure", configure), ("reset", reset)):
            _check_hook(hook_name, hook)
        self.timeout = float(timeout)
        self.check = check
        self.configure = configure
        self.reset = reset
        self.max_lifetime = max_lifetime
        self.leak_timeout = leak_timeout
        connect_kwargs.setdefault("dsn", "")
        self.connect_kwargs = connect_kwargs
        connector = Connector(self.name, connect_kwargs, configure, max_lifetime)  # checks them first
        try:
            target = ServerTarget(connect_kwargs)
        except ValueError as exc:
            raise ValueError(f"{exc} (pool {self.name!r})") from None
        connector.target = target
        self._state = state = PoolState(self.name, minconn, maxconn, idle_timeout)
        state.checks_server = target.checks
        # The parts, composed: each receives the shared part (PoolCore), none knows this façade. The
        # core calls back through a weak method, so that a forgotten pool is freed by refcounting.
        self._core = core = PoolCore(
            name=self.name,
            kind=type(self).__name__,
            can_wait=self._can_wait,
            refill_in_background=self._refill_in_background,
            timeout=self.timeout,
            hooks=(check, configure, reset),
            max_lifetime=max_lifetime,
            leak_timeout=leak_timeout,
            state=state,
            connector=connector,
            target=target,
            update_fast=_weak_call(self._update_fast),
        )
        self._lending = Lending(core)
        self._returning = Returning(core)
        self._maintenance = Maintenance(core)
        self._housekeeper = core._housekeeper = Housekeeper(self._maintenance)
        # What the borrows, the fast paths' fallbacks and the housekeeper call (borrow.BorrowedPool):
        # the parts' bound methods, so that a call costs what a method call of the façade would.
        self._lend = self._lending._lend
        self._return = self._returning._return
        self._finish_borrow = self._returning._finish_borrow
        self._tidy = self._returning._tidy
        self._evict = core._evict
        self._checked_timeout = core._checked_timeout
        self._close_dropped = core._close_dropped
        self._housekeep = self._maintenance._housekeep
        self._borrow = borrow.new_borrow_var(self.name)
        self._keys: dict[Any, C] = {}  # psycopg2.pool's getconn(key): key -> its connection
        self._fast_lend = False  # getconn may try PoolState.lend_fast (see _update_fast)
        self._fast_return = reset is None  # putconn may try PoolState.return_fast
        _fork.track(self)
        try:
            core._open_minconn_at_start()
        except BaseException:
            self.close()
            raise

    def _validate(
        self,
        minconn: int,
        maxconn: float,
        idle_timeout: float,
        timeout: float,
        max_lifetime: float | None,
        leak_timeout: float | None,
    ) -> None:
        where = f"(pool {self.name!r})"
        if isinstance(idle_timeout, str):
            raise ValueError(
                f"idle_timeout must be a number of seconds, got the string {idle_timeout!r} {where}: "
                "pass the dsn as dsn=... (psycopg2.pool takes it as the third positional argument, pgpool does not)"
            )
        if not isinstance(minconn, int) or isinstance(minconn, bool) or minconn < 0:
            raise ValueError(f"minconn must be an integer >= 0, got {minconn!r} {where}")
        whole = isinstance(maxconn, int) and not isinstance(maxconn, bool)
        if not (whole or maxconn == float("inf")) or maxconn < 1:
            raise ValueError(f"maxconn must be an integer >= 1 or float('inf'), got {maxconn!r} {where}")
        if maxconn < minconn:
            raise ValueError(f"maxconn must be >= minconn (got minconn={minconn}, maxconn={maxconn}) {where}")
        if not is_number(idle_timeout) or idle_timeout < 0:
            raise ValueError(f"idle_timeout must be a number of seconds >= 0, got {idle_timeout!r} {where}")
        check_timeout(timeout, self.name, self._can_wait, type(self).__name__)
        for label, value in (("max_lifetime", max_lifetime), ("leak_timeout", leak_timeout)):
            if value is not None and (not is_number(value) or not value > 0):
                raise ValueError(f"{label} must be None or a number of seconds > 0, got {value!r} {where}")

    # -- the psycopg2_pool attributes ----------------------------------------------------------

    @property
    def minconn(self) -> int:
        return self._state.minconn

    @property
    def maxconn(self) -> float:
        return self._state.maxconn

    @property
    def idle_timeout(self) -> float:
        return self._state.idle_timeout

    @property
    def idle_connections(self) -> deque[Connection]:
        """The idle connections, the most recently returned on the right (a snapshot)."""
        return deque(self._state.idle_snapshot())

    @property
    def return_times(self) -> ReturnTimes:
        """Idle connection -> ``time.monotonic()`` of its return, a `dict` (a snapshot, as in
        psycopg2_pool); setting an entry ages that connection in the pool."""
        return ReturnTimes(self._state)

    @property
    def connections_in_use(self) -> Any:
        """The connections lent and not yet returned, as a weak set (a snapshot)."""
        return weakref.WeakSet(self._state.lent_connections())

    # -- lending -------------------------------------------------------------------------------

    def getconn(self, key: Any = None, *, timeout: float | None = None) -> C:
        """Lend a connection; give it back with `putconn` when done.

        Takes the most recently returned idle connection, skipping (and closing) any that is not idle
        on the server, has been idle longer than `idle_timeout` (beyond `minconn`), outlived
        `max_lifetime`, was closed by the server, or fails the `check` hook. Opens a new connection
        when none is idle, unless `maxconn` are already open: then waits up to `timeout` seconds (the
        pool's `timeout` when not given) for one to come back, and raises `PoolTimeout`; with no
        timeout, raises `PoolError` at once when `maxconn` connections are lent. A connect error
        reaches the caller, unless a timeout allows retrying it.

        `key`, as in ``psycopg2.pool``: the same key gets the same connection until it is put back.
        """
        wait = self.timeout if timeout is None else self._checked_timeout(timeout)  # first: a bad one raises
        if key is None and self._fast_lend:
            item = self._state.lend_fast(_monotonic())
            if item is not None:
                return item[0]  # type: ignore[return-value]  # opened by connection_factory
        if key is not None:
            return self._getconn_keyed(key, wait)
        return self._lend(wait)[0]  # type: ignore[return-value]  # opened by connection_factory

    def _getconn_keyed(self, key: Any, wait: float) -> C:
        if self._state.closed:
            raise PoolClosed(f"pool {self.name!r} is closed")  # its keyed connections are not lent again
        held = self._keys.get(key)
        if held is not None:
            return held
        lent = self._lend(wait)
        conn: C = lent[0]  # type: ignore[assignment]  # opened by connection_factory
        # Two threads may lend for the same key at once: the first to store wins (setdefault is one
        # atomic step), the other gives its connection back and uses the winner's.
        try:
            winner = self._keys.setdefault(key, conn)
        except BaseException:
            # Interrupted: the caller never gets it, so neither does the key.
            if self._keys.get(key) is conn:
                del self._keys[key]
            self._finish_borrow(conn, lent[1])
            raise
        if winner is not conn:
            self._finish_borrow(conn, lent[1])
        return winner

    # -- returning -----------------------------------------------------------------------------

    def putconn(self, conn: C | None = None, key: Any = None, close: bool = False) -> None:
        """Take back a connection lent by `getconn`; with ``close=True`` it is closed, not kept.

        Whatever the borrower left uncommitted is rolled back; the session characteristics and the
        client encoding are restored, notices and notifications cleared; then the `reset` hook runs.
        A broken connection, or one whose cleanup fails, is discarded: `putconn` never raises because
        of the connection's state. It raises `PoolError` for a connection this pool did not lend or
        that was already returned, and then changes nothing. `key`, as in ``psycopg2.pool``.
        """
        state = self._state
        conn_id = id(conn)
        info = state.lent.get(conn_id)  # one atomic dict read
        # The borrow being returned, to finish it (and only it) after an interrupt: read before
        # anything changes, since a finished return may hand the connection to a waiter (a new lease).
        lease = None if info is None else info.lease
        if close is not False and close is not True:
            raise TypeError(f"close must be True or False, got {close!r} (pool {self.name!r})")
        try:
            if info is not None and close is False and key is None and self._fast_return and not self._keys:
                done = state.return_fast(conn, conn_id, info, _monotonic())  # type: ignore[arg-type]
                if done is not None:
                    if done is TIDY:
                        self._tidy()
                    return
            if key is not None or self._keys:
                conn = self._unkey(conn, key)
            if not isinstance(conn, Connection):
                raise PoolError(
                    f"pool {self.name!r} can only take back a psycopg2 connection it lent, got {type(conn).__name__}"
                )
            if id(conn) in _fork.orphan_ids:
                return  # inherited through fork and already disowned: nothing to give back
            self._return(conn, None, close)
        except PoolError:
            raise
        except BaseException:
            if lease is not None and info is not None and info.ref() is conn:
                # Finish this borrow's return if the interrupt stopped it (idempotent); a connection
                # lent again meanwhile (another lease) is someone else's and is left alone.
                self._finish_borrow(conn, lease, close)  # type: ignore[arg-type]
            raise

    def _unkey(self, conn: C | None, key: Any) -> C | None:
        """psycopg2.pool's keys: find the connection lent under `key`, and forget its key."""
        if key is not None:
            if conn is None:
                conn = self._keys.get(key)
                if conn is None:
                    raise PoolError(f"no connection is lent under key {key!r} by pool {self.name!r}")
            if self._keys.get(key) is conn:
                del self._keys[key]
        for held_key, held in list(self._keys.items()):
            if held is conn:
                del self._keys[held_key]
        return conn

    # -- whole pool ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Close every idle connection, whatever `minconn` and `idle_timeout` say.

        Useful after a burst of activity followed by a long quiet period. Lent connections are not
        touched. A `ThreadSafeConnectionPool` then reopens `minconn` connections in the background;
        a `ConnectionPool` at its next `putconn` or `getconn`.
        """
        to_close: list[tuple[Connection, str]] = []
        try:
            self._state.take_idle(to_close, "cleared")
            self._close_dropped(to_close)
        except BaseException:
            self._close_dropped(to_close)  # consumes what is left, so safe after a partial run
            raise
        if self._refill_in_background:
            self._kick_housekeeper()

    def close(self) -> None:
        """Close the pool: idle connections now, lent ones when they come back.

        Decorated generators holding a connection of this pool are closed (their ``finally`` clauses
        run, their transaction is rolled back) and their sessions closed before this returns; one
        that another thread is stepping at that moment ends with that step. Threads waiting in
        `getconn` get `PoolClosed`, and so does every later `getconn`. Calling it again does nothing.
        """
        to_close: list[tuple[Connection, str]] = []
        try:
            first = self._state.close(to_close)
            self._close_dropped(to_close)
            if borrow.held_by_generators:
                borrow.end_generator_borrows(self)  # their sessions are closed as they come back
        except BaseException:
            self._state.close(to_close)  # idempotent: finishes what an interrupt cut short
            self._close_dropped(to_close)
            borrow.end_generator_borrows(self)
            raise
        if first:
            self._housekeeper.stop()  # it would stop by itself at its next round: the pool is closed
            logger.info("pool %r: closed", self.name)

    def drain(self) -> None:
        """Replace every connection: idle ones are closed now, lent ones when they come back, and new
        ones choose their server again (libpq's host selection). For operators and scripts after a
        switchover; the pool does the same by itself when a connection shows its server was demoted."""
        self._evict(None, "drain() called")

    def closeall(self) -> None:
        """Close the pool (``psycopg2.pool``'s name for `close`)."""
        self.close()

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._state.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> PoolStats:
        """Return a snapshot: sizes, current counts, and counters that only grow (see `PoolStats`)."""
        snapshot: dict[str, Any] = {"name": self.name, "minconn": self.minconn, "maxconn": self.maxconn}
        snapshot.update(self._state.counts())
        return cast(PoolStats, snapshot)

    def __repr__(self) -> str:
        counts = self._state.counts()
        state = "closed" if self.closed else "open"
        return (
            f"<{type(self).__name__} {self.name!r} {state} [idle: {counts['idle']}, in use: {counts['in_use']}, "
            f"waiting: {counts['waiting']} | minconn={self.minconn}, maxconn={self.maxconn}]>"
        )

    # -- borrowing that cannot leak (see pgpool.borrow) ----------------------------------------

    def connection(self, timeout: float | None = None) -> borrow.ConnectionBorrow[C]:
        """Borrow a connection for a ``with`` block; it always comes back, uncommitted work rolled back.

        Inside another borrow from this pool made by the same thread and still open, joins that
        borrow's connection.
        """
        made: borrow.ConnectionBorrow[C] = borrow.ConnectionBorrow()  # borrow.connection_borrow, inline:
        made._pool = self  # one Python call fewer on every with-block
        made._timeout = timeout
        made._join = True
        made.conn = None
        return made

    def transaction(self, timeout: float | None = None) -> borrow.TransactionBorrow[C]:
        """Borrow a connection in a transaction: committed if the block ends normally, else rolled back.

        Nested in another `transaction` of this pool (same thread), it is a savepoint of the outer one.
        """
        made: borrow.TransactionBorrow[C] = borrow.TransactionBorrow()  # borrow.transaction_borrow, inline
        made._pool = self
        made._timeout = timeout
        made._join = True
        made.conn = None
        made._savepoint = None
        made._tx_conn = None
        return made

    # -- its parts -------------------------------------------------------------------------------

    @property
    def _events(self) -> Any:
        """The metrics listener (pgpool.otel), told of connects and timeouts; None when uninstrumented."""
        return self._core._listener

    @_events.setter
    def _events(self, listener: Any) -> None:
        self._core._events = listener  # which calls _update_fast back

    def _update_fast(self) -> None:
        """Decide once whether the fast paths apply: not with hooks to call, nor before the housekeeper
        runs (the slow path starts it). A metrics listener takes its borrow timings from
        `PoolState.times`, which the fast paths fill too."""
        core = self._core
        self._fast_lend = core.check is None and core.leak_timeout is None and self._housekeeper.started
        self._fast_return = core.reset is None

    def _kick_housekeeper(self) -> None:
        self._core._kick_housekeeper()

    def _after_fork_in_child(self) -> None:
        """Start from zero connections without touching the parent's sessions, and without waiting on
        any lock a parent thread may have held at fork time."""
        for conn in self._state.reset_after_fork():
            _fork.disown(conn)
        self._keys = {}
        self._housekeeper = self._core._housekeeper = Housekeeper(self._maintenance)
        self._update_fast()


class ThreadSafeConnectionPool(ConnectionPool[C]):
    """A `ConnectionPool` to share between threads, able to wait for a connection.

    Every method may be called from any thread. With ``timeout > 0`` (the pool's, or per call),
    `getconn` queues when `maxconn` connections are lent and waits for one to come back; waiters are
    served first come, first served. Connections are opened outside the pool's lock, in parallel, and
    `minconn` is restored in the background (`putconn` never waits for a connect).
    """

    _can_wait = True
    _refill_in_background = True
