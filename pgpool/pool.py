"""The pool core: `ConnectionPool` and `ThreadSafeConnectionPool`.

A port of the ``psycopg2_pool`` module's behaviour (LIFO idle list, ``idle_timeout``, ``minconn`` refill,
rollback on return) with its defects fixed, plus what production use needs: waiting with a timeout,
connects outside the lock, health checks, lifetime limits, hooks, stats, logging and fork safety.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg2
import psycopg2.extensions

from . import _fork, borrow
from ._records import IDLE, LENT, RETURNING, ConnInfo, Waiter
from ._secrets import find_secrets, redact
from .errors import PoolClosed, PoolError, PoolTimeout
from .health import check_connection, socket_readable
from .housekeeping import Housekeeper

__all__ = ["ConnectionPool", "ThreadSafeConnectionPool"]

Connection = psycopg2.extensions.connection
Hook = Callable[[Connection], Any]

logger = logging.getLogger("pgpool")

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_ACTIVE = psycopg2.extensions.TRANSACTION_STATUS_ACTIVE
_STATUS_UNKNOWN = psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN
_names = itertools.count(1)
_LIFETIME_JITTER = 0.05  # up to 5% earlier, so a pool's connections do not all expire together
_WAIT_SLICE = 0.5  # a waiter re-checks for slots freed by garbage-collected leaks this often

_STAT_COUNTERS = (
    "checkouts",
    "connections_opened",
    "connections_closed",
    "connect_errors",
    "timeouts",
    "broken_discarded",
    "wait_ms_total",
)


def _check_hook(name: str, hook: object) -> None:
    if hook is not None and not callable(hook):
        raise TypeError(f"{name} must be a callable taking a connection, got {hook!r}")


class ConnectionPool:
    """A pool of psycopg2 connections, for one thread.

    `getconn` lends a connection and `putconn` takes it back: after `getconn` you must call `putconn`,
    or better, borrow with ``with pool.connection() as conn:``, which cannot forget. Connections are
    opened on demand up to `maxconn`; `minconn` of them are opened at construction and kept open.

    Attributes, as in ``psycopg2_pool``:

    - `minconn`, `maxconn`, `idle_timeout`, `connect_kwargs`: the construction arguments;
    - `idle_connections`: a deque of the idle connections, the most recently returned on the right
      (lent first: last in, first out);
    - `connections_in_use`: a weak set of the connections lent and not yet returned; the pool holds
      lent connections weakly, so a leaked one that is garbage collected frees its slot;
    - `return_times`: idle connection -> ``time.monotonic()`` of its return.

    Read them, do not change them: they are the pool's state.

    The pool has a lock even in this single-threaded class, because its housekeeping thread changes
    its state too (an uncontended lock costs tens of nanoseconds). This class refuses ``timeout > 0``:
    with one thread, nobody could return a connection while `getconn` waits. Use
    `ThreadSafeConnectionPool` from several threads.
    """

    _can_wait = False

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
        **connect_kwargs: Any,
    ) -> None:
        self.name = str(name) if name is not None else f"pgpool-{next(_names)}"
        self._validate(minconn, maxconn, idle_timeout, timeout, max_lifetime, leak_timeout)
        for hook_name, hook in (("check", check), ("configure", configure), ("reset", reset)):
            _check_hook(hook_name, hook)
        self.minconn = minconn
        self.maxconn = maxconn
        self.idle_timeout = idle_timeout
        self.timeout = float(timeout)
        self.check = check
        self.configure = configure
        self.reset = reset
        self.max_lifetime = max_lifetime
        self.leak_timeout = leak_timeout
        connect_kwargs.setdefault("dsn", "")
        self.connect_kwargs = connect_kwargs
        self._secrets = find_secrets(connect_kwargs)
        try:
            psycopg2.extensions.parse_dsn(connect_kwargs["dsn"] or "")
        except psycopg2.ProgrammingError as exc:
            # psycopg2's message quotes the dsn, password included.
            raise ValueError(f"invalid dsn for pool {self.name!r}: {self._redact(str(exc).strip())}") from None

        # State is only mutated under self._lock, even in the single-threaded pool: the housekeeping
        # thread changes it too. Slow work (connect, close, queries) happens after releasing it.
        # The one exception is _collected below, which only removes a dict entry (atomic).
        self._lock = threading.Lock()
        self.idle_connections: deque[Connection] = deque()  # ready to lend, newest on the right
        self.return_times: dict[Connection, float] = {}  # idle connection -> when it became idle
        # Every open connection of the pool -> its info. Keys are weak references: a lent connection
        # that is leaked and garbage collected drops out by itself, freeing its slot.
        self._conns: dict[weakref.ref[Connection], ConnInfo] = {}
        self._pending = 0  # slots reserved for connections being opened
        self._waiters: deque[Waiter] = deque()  # threads queued in getconn, oldest on the left
        self._closed = False
        self._stats = dict.fromkeys(_STAT_COUNTERS, 0)
        self._housekeeper = Housekeeper(self)
        self._borrow = borrow.new_borrow_var(self.name)
        conns = self._conns

        def collected(ref: weakref.ref[Connection]) -> None:
            conns.pop(ref, None)

        self._collected = collected
        _fork.track(self)

        try:
            for _ in range(minconn):
                with self._lock:
                    self._pending += 1
                conn, info = self._open_connection()
                with self._lock:
                    self._adopt_locked(conn, info)
                    self._make_idle_locked(conn, info, time.monotonic())
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
        if not isinstance(minconn, int) or minconn < 0:
            raise ValueError(f"minconn must be an integer >= 0, got {minconn!r} {where}")
        if not isinstance(maxconn, (int, float)) or not maxconn >= 1:
            raise ValueError(f"maxconn must be >= 1, got {maxconn!r} {where}")
        if maxconn < minconn:
            raise ValueError(f"maxconn must be >= minconn (got minconn={minconn}, maxconn={maxconn}) {where}")
        if not isinstance(idle_timeout, (int, float)) or idle_timeout < 0:
            raise ValueError(f"idle_timeout must be a number of seconds >= 0, got {idle_timeout!r} {where}")
        self._checked_timeout(timeout)
        for label, value in (("max_lifetime", max_lifetime), ("leak_timeout", leak_timeout)):
            if value is not None and (not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{label} must be None or a number of seconds > 0, got {value!r} {where}")

    # -- lending -------------------------------------------------------------------------------

    def getconn(self, timeout: float | None = None) -> Connection:
        """Lend a connection; give it back with `putconn` when done.

        Takes the most recently returned idle connection, skipping (and closing) any that is not idle
        on the server, has been idle longer than `idle_timeout`, outlived `max_lifetime`, was closed
        by the server, or fails the `check` hook. Opens a new connection when none is idle, unless
        `maxconn` are already open: then waits up to `timeout` seconds (the pool's `timeout` when not
        given) for one to come back, and raises `PoolTimeout`; with no timeout, raises `PoolError`
        at once. A connect error reaches the caller, unless a timeout allows retrying it.
        """
        wait = self.timeout if timeout is None else self._checked_timeout(timeout)
        conn = self._get_ready_connection(wait)
        if self.leak_timeout is not None:
            self._note_borrow(conn)
        return conn

    def _get_ready_connection(self, wait: float) -> Connection:
        deadline = time.monotonic() + wait if wait > 0 else 0.0
        attempt = 0
        last_error: Exception | None = None
        while True:
            to_close: list[Connection] = []
            waiter: Waiter | None = None
            reserved = False
            exhausted = ""
            with self._lock:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                found = self._pop_idle_locked(to_close) if self.idle_connections else None
                if found is None:
                    if not self._waiters and len(self._conns) + self._pending < self.maxconn:
                        self._pending += 1
                        reserved = True
                    elif wait > 0:
                        waiter = Waiter()
                        self._waiters.append(waiter)
                    else:
                        exhausted = self._exhausted_message_locked()
            if to_close:
                self._close_connections(to_close, "idle too long, expired or not idle")
            if not self._housekeeper.started:
                self._housekeeper.start()
            if found is not None:
                conn, info = found
                if self._lendable(conn, info):
                    return conn
                continue
            if waiter is not None:
                try:
                    handed = self._wait(waiter, deadline, wait, last_error)
                except BaseException:
                    self._leave_line(waiter)
                    raise
                if handed is not None:
                    conn, info = handed
                    if self._lendable(conn, info):
                        return conn
                    continue
            elif not reserved:
                raise PoolError(exhausted)
            # We hold a reserved slot: open a connection in it.
            try:
                conn, info = self._open_connection()
            except BaseException as exc:
                self._release_slot()
                if wait <= 0 or not isinstance(exc, Exception):
                    raise
                last_error = exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._count_timeout()
                    raise PoolTimeout(self._timeout_message(wait, exc)) from exc
                # Exponential backoff with jitter, so that many threads do not hammer a server that
                # is coming back up.
                time.sleep(min(remaining, random.uniform(0.5, 1.0) * min(2.0, 0.05 * 2**attempt)))
                attempt += 1
                continue
            with self._lock:
                if not self._closed:
                    self._adopt_locked(conn, info)
                    self._stats["checkouts"] += 1
                    return conn
                self._pending -= 1
            self._close_connections([conn], "pool closed while connecting")
            raise PoolClosed(f"pool {self.name!r} is closed")

    def _checked_timeout(self, timeout: float) -> float:
        """Validate a timeout, the pool's or a call's."""
        if not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r} (pool {self.name!r})")
        if timeout > 0 and not self._can_wait:
            raise ValueError(
                f"timeout must be 0 for a {type(self).__name__} (pool {self.name!r}): in one thread "
                "nobody can return a connection while getconn waits; use ThreadSafeConnectionPool"
            )
        return float(timeout)

    def _pop_idle_locked(self, to_close: list[Connection]) -> tuple[Connection, ConnInfo] | None:
        """Take the newest idle connection fit to lend; move unfit ones to `to_close`."""
        now = time.monotonic()
        idle_timeout = self.idle_timeout
        while self.idle_connections:
            conn = self.idle_connections.pop()
            returned = self.return_times.pop(conn, 0.0)
            info = self._conns[weakref.ref(conn)]
            if (
                conn.closed
                or conn.get_transaction_status() != _STATUS_IDLE
                or (idle_timeout and now - returned > idle_timeout)
                or (info.expires is not None and now >= info.expires)
            ):
                self._forget_locked(conn)
                to_close.append(conn)
                continue
            info.state = LENT
            self._stats["checkouts"] += 1
            return conn, info
        return None

    def _note_borrow(self, conn: Connection) -> None:
        """Remember when and where `conn` was borrowed, for leak reports."""
        stack = traceback.format_stack()[:-2]  # formatted outside the lock: it is slow
        with self._lock:
            info = self._conns.get(weakref.ref(conn))
            if info is not None:
                info.borrowed_at = time.monotonic()
                info.stack = stack

    def _lendable(self, conn: Connection, info: ConnInfo) -> bool:
        """Run the health checks that need no lock on a connection just taken; discard it if it fails."""
        if info.probe.poll(0):
            # The server closed it or sent a notification: only a real round trip tells which.
            try:
                check_connection(conn)
            except Exception as exc:
                self._discard(conn, f"closed by the server ({self._redact(str(exc).strip())})")
                return False
        if self.check is not None:
            try:
                self.check(conn)
                if conn.get_transaction_status() != _STATUS_IDLE:
                    conn.rollback()
            except Exception as exc:
                self._discard(conn, f"check failed ({self._redact(str(exc).strip())})")
                return False
        return True

    def _wait(
        self, waiter: Waiter, deadline: float, wait: float, last_error: Exception | None
    ) -> tuple[Connection, ConnInfo] | None:
        """Wait in line; return a connection handed over, or None when a slot was reserved for us."""
        while True:
            remaining = deadline - time.monotonic()
            served = False
            if remaining > 0:
                waiter.sleep(min(remaining, _WAIT_SLICE))
                # Whoever served us did so under the lock before waking us: no need to take it again.
                served = waiter.served()
            if not served:
                with self._lock:
                    if not waiter.served() and remaining > 0:
                        # A leaked connection may have been garbage collected, freeing its slot.
                        self._grant_free_slots_locked()
                    served = waiter.served()
                    if not served:
                        if remaining > 0:
                            waiter.rearm()
                        else:
                            self._waiters.remove(waiter)
                            self._stats["timeouts"] += 1
                            self._stats["wait_ms_total"] += int((time.monotonic() - waiter.since) * 1000)
            # Whatever the clock says, a waiter that was served keeps what it was given.
            if served:
                if waiter.error is not None:
                    raise waiter.error
                if waiter.conn is None:
                    return None
                return waiter.conn, self._conns[weakref.ref(waiter.conn)]
            if remaining <= 0:
                break
        msg = self._timeout_message(wait, last_error)
        logger.warning("%s", msg)
        if last_error is not None:
            raise PoolTimeout(msg) from last_error
        raise PoolTimeout(msg)

    def _leave_line(self, waiter: Waiter) -> None:
        """A waiter is leaving abnormally (interrupted, pool closed): give back what it was given."""
        with self._lock:
            if not waiter.served():
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                return
            if waiter.may_connect:
                self._pending -= 1
                self._grant_free_slots_locked()
            elif waiter.conn is not None:
                info = self._conns.get(weakref.ref(waiter.conn))
                if info is not None:
                    self._give_locked(waiter.conn, info, time.monotonic())
            waiter.conn, waiter.may_connect = None, False

    def _timeout_message(self, wait: float, error: Exception | None) -> str:
        with self._lock:
            in_use = len(self._conns) - len(self.idle_connections)
        msg = (
            f"couldn't get a connection from pool {self.name!r} after {wait:.2f} sec "
            f"(maxconn={self.maxconn}, {in_use} in use)"
        )
        if error is not None:
            msg += f"; last connect error: {self._redact(str(error).strip())}"
        return msg

    def _exhausted_message_locked(self) -> str:
        return (
            f"connection pool exhausted: pool {self.name!r} has all maxconn={self.maxconn} connections "
            f"in use ({len(self._conns) - len(self.idle_connections)} lent, {self._pending} opening)"
        )

    def _count_timeout(self) -> None:
        with self._lock:
            self._stats["timeouts"] += 1

    # -- returning -----------------------------------------------------------------------------

    def putconn(self, conn: Connection, close: bool = False) -> None:
        """Take back a connection lent by `getconn`; with ``close=True`` it is closed, not kept.

        Whatever the borrower left uncommitted is rolled back, and the connection's autocommit,
        isolation level, readonly and deferrable settings are restored; then the `reset` hook runs.
        A broken connection, or one whose cleanup fails, is discarded: `putconn` never raises
        because of the connection's state, and the housekeeper reopens connections up to `minconn`
        in the background (putconn itself never waits for a connect). It raises `PoolError` for a
        connection this pool did not lend or that was already returned, and then changes nothing.
        """
        if not isinstance(conn, Connection):
            raise PoolError(
                f"pool {self.name!r} can only take back a psycopg2 connection it lent, got {type(conn).__name__}"
            )
        key = weakref.ref(conn)
        to_close: list[tuple[Connection, str]] = []
        with self._lock:
            info = self._conns.get(key)
            if info is None or info.state is not LENT:
                raise PoolError(self._refusal(info))
            slow = close or conn.closed or self.reset is not None or info.needs_cleanup(conn)
            if slow:
                info.state = RETURNING  # still counted, and a second putconn is refused
            else:
                self._settle_locked(conn, info, None, to_close)  # clean: done in one go
        if slow:
            # Cleanup is network I/O (rollback, reset): outside the lock.
            reason = self._return_reason(conn, close)
            try:
                if reason is None:
                    reason = self._clean(conn, info)
            except BaseException:  # interrupted (KeyboardInterrupt): drop it, then let it propagate
                with self._lock:
                    self._settle_locked(conn, info, "cleanup interrupted", to_close)
                self._close_connections([c for c, _ in to_close], "cleanup interrupted")
                raise
            with self._lock:
                self._settle_locked(conn, info, reason, to_close)
        if to_close:
            for old, why in to_close:
                self._close_connections([old], why)
            # Reopening to minconn is the housekeeper's job: putconn never waits for a connect.
            self._housekeeper.kick()

    def _refusal(self, info: ConnInfo | None) -> str:
        if info is None:
            return f"connection not lent by pool {self.name!r}: putconn refused a foreign connection"
        return f"connection already returned to pool {self.name!r}: putconn called twice"

    def _return_reason(self, conn: Connection, close: bool) -> str | None:
        """Tell why a returned connection cannot be kept, before any cleanup (None: it may be)."""
        if close:
            return "closed on request"
        if conn.closed:
            # psycopg2 sets closed=2 when the connection broke, 1 when the borrower closed it.
            return "broken (connection lost)" if conn.closed == 2 else "returned closed"
        status = conn.get_transaction_status()
        if status == _STATUS_IDLE:
            return None
        if status == _STATUS_UNKNOWN:
            return "broken"
        if status == _STATUS_ACTIVE:
            return "returned with a command in progress (ACTIVE)"
        return None  # in a transaction: rolled back by _clean

    def _clean(self, conn: Connection, info: ConnInfo) -> str | None:
        """Roll back, restore the settings, run the reset hook; say why it failed, if it did."""
        try:
            if conn.get_transaction_status() != _STATUS_IDLE:
                conn.rollback()
            info.restore_settings(conn)
            if self.reset is not None:
                self.reset(conn)
                if conn.get_transaction_status() != _STATUS_IDLE:
                    conn.rollback()
        except Exception as exc:
            return f"cleanup failed ({self._redact(str(exc).strip())})"
        return None

    def _settle_locked(
        self, conn: Connection, info: ConnInfo, reason: str | None, to_close: list[tuple[Connection, str]]
    ) -> None:
        """Keep or drop a returned connection (appended to `to_close`), and evict stale idle ones."""
        now = time.monotonic()
        if reason is None:
            if self._closed:
                reason = "pool closed"
            elif self.idle_timeout == 0 and len(self.idle_connections) >= self.minconn:
                reason = "idle_timeout is 0 and minconn are idle"
            elif info.expires is not None and now >= info.expires:
                reason = "max_lifetime reached"
        if reason is None:
            self._give_locked(conn, info, now)
        else:
            if reason.startswith(("broken", "returned closed", "cleanup failed")):
                self._stats["broken_discarded"] += 1
            self._forget_locked(conn)
            to_close.append((conn, reason))
            self._grant_free_slots_locked()
        idle = self.idle_connections
        if self.idle_timeout and idle and now - self.return_times[idle[0]] > self.idle_timeout:
            self._evict_idle_locked(now, to_close)

    def _give_locked(self, conn: Connection, info: ConnInfo, now: float) -> None:
        """Hand a usable connection to the oldest waiter, or make it idle."""
        if self._waiters:
            # First come, first served: never to whichever thread takes the lock next, though
            # that would be faster (see bench/NOTES.md).
            info.state = LENT
            self._stats["checkouts"] += 1
            self._serve_locked(self._waiters.popleft(), conn=conn)
        else:
            self._make_idle_locked(conn, info, now)

    def _make_idle_locked(self, conn: Connection, info: ConnInfo, now: float) -> None:
        info.state = IDLE
        self.return_times[conn] = now
        self.idle_connections.append(conn)

    def _evict_idle_locked(self, now: float, to_close: list[tuple[Connection, str]]) -> None:
        """Drop idle connections older than idle_timeout (the oldest are on the left)."""
        while self.idle_connections:
            oldest = self.idle_connections[0]
            if now - self.return_times.get(oldest, now) <= self.idle_timeout:
                break
            self.idle_connections.popleft()
            self.return_times.pop(oldest, None)
            self._forget_locked(oldest)
            to_close.append((oldest, "idle_timeout reached"))

    def _retire_expired_locked(self, now: float, to_close: list[tuple[Connection, str]]) -> None:
        """Drop idle connections past their max_lifetime (a scan: only in housekeeping)."""
        for conn in list(self.idle_connections):
            expires = self._conns[weakref.ref(conn)].expires
            if expires is not None and now >= expires:
                self.idle_connections.remove(conn)
                self.return_times.pop(conn, None)
                self._forget_locked(conn)
                to_close.append((conn, "max_lifetime reached"))

    def _forget_locked(self, conn: Connection) -> None:
        """Stop counting a connection that is about to be closed."""
        self._conns.pop(weakref.ref(conn), None)

    def _grant_free_slots_locked(self) -> None:
        """Give free slots to the oldest waiters, who then open their own connections."""
        while self._waiters and len(self._conns) + self._pending < self.maxconn:
            self._pending += 1
            self._serve_locked(self._waiters.popleft(), may_connect=True)

    def _serve_locked(
        self, waiter: Waiter, conn: Connection | None = None, may_connect: bool = False, error: PoolError | None = None
    ) -> None:
        """Give a waiter (already out of the line) its outcome, count its wait, and wake it."""
        waiter.conn, waiter.may_connect, waiter.error = conn, may_connect, error
        self._stats["wait_ms_total"] += int((time.monotonic() - waiter.since) * 1000)
        waiter.wake()

    def _reserve_refill_locked(self) -> int:
        if self._closed:
            return 0
        missing = self.minconn - len(self._conns) - self._pending
        if missing <= 0:
            return 0
        self._pending += missing
        return missing

    def _refill(self, count: int) -> None:
        """Open `count` connections for minconn; a failure is logged and retried later, never raised."""
        for done in range(count):
            try:
                conn, info = self._open_connection()
            except BaseException as exc:
                for _ in range(count - done):
                    self._release_slot()
                if not isinstance(exc, Exception):
                    raise
                return
            with self._lock:
                closing = self._closed
                if closing:
                    self._pending -= 1
                else:
                    self._adopt_locked(conn, info)
                    self._give_locked(conn, info, time.monotonic())
            if closing:
                self._close_connections([conn], "pool closed while connecting")

    def _release_slot(self) -> None:
        """Give back a slot reserved for a connection that could not be opened."""
        with self._lock:
            self._pending -= 1
            self._grant_free_slots_locked()

    def _discard(self, conn: Connection, reason: str) -> None:
        """Drop a lent connection found broken, freeing its slot."""
        with self._lock:
            self._forget_locked(conn)
            self._stats["broken_discarded"] += 1
            self._grant_free_slots_locked()
        self._close_connections([conn], reason)
        self._housekeeper.kick()  # to reopen minconn, in the background

    # -- opening and closing -------------------------------------------------------------------

    def _open_connection(self) -> tuple[Connection, ConnInfo]:
        """Connect and run the configure hook; the caller holds a slot for it and adopts the result."""
        try:
            conn: Connection = psycopg2.connect(**self.connect_kwargs)
        except Exception as exc:
            with self._lock:
                self._stats["connect_errors"] += 1
            logger.warning("pool %r: connect failed: %s", self.name, self._redact(str(exc).strip()))
            raise
        try:
            if self.configure is not None:
                self.configure(conn)
                if conn.get_transaction_status() != _STATUS_IDLE:
                    conn.commit()  # keep what configure set, e.g. SET search_path outside autocommit
        except BaseException:
            conn.close()
            logger.warning("pool %r: configure failed, connection closed", self.name)
            raise
        expires = None
        if self.max_lifetime is not None:
            expires = time.monotonic() + self.max_lifetime * (1 - _LIFETIME_JITTER * random.random())
        info = ConnInfo(conn, expires)
        logger.info(
            "pool %r: opened connection to %s:%s/%s (backend pid %s)",
            self.name,
            conn.info.host,
            conn.info.port,
            conn.info.dbname,
            conn.info.backend_pid,
        )
        return conn, info

    def _adopt_locked(self, conn: Connection, info: ConnInfo) -> None:
        """Count a connection just opened: its reserved slot becomes a real one (state: lent)."""
        self._pending -= 1
        self._conns[weakref.ref(conn, self._collected)] = info
        self._stats["connections_opened"] += 1

    def _close_connections(self, conns: list[Connection], reason: str) -> None:
        if not conns:
            return
        for conn in conns:
            logger.info("pool %r: closing connection: %s", self.name, reason)
            try:
                conn.close()
            except Exception:
                logger.debug("pool %r: error closing a connection", self.name, exc_info=True)
        with self._lock:
            self._stats["connections_closed"] += len(conns)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    # -- whole pool ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Close every idle connection, whatever `minconn` and `idle_timeout` say.

        Useful after a burst of activity followed by a long quiet period. Lent connections are not
        touched; the housekeeper then reopens `minconn` connections in the background.
        """
        with self._lock:
            idle = self._take_all_idle_locked()
        self._close_connections(idle, "cleared")
        self._housekeeper.kick()  # it reopens minconn connections in the background

    def _take_all_idle_locked(self) -> list[Connection]:
        idle = list(self.idle_connections)
        self.idle_connections.clear()
        self.return_times.clear()
        for conn in idle:
            self._forget_locked(conn)
        return idle

    def close(self) -> None:
        """Close the pool: idle connections now, lent ones when they come back.

        Threads waiting in `getconn` get `PoolClosed`, and so does every later `getconn`. Calling it
        again does nothing.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = self._take_all_idle_locked()
            while self._waiters:
                error = PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
                self._serve_locked(self._waiters.popleft(), error=error)
        self._housekeeper.stop()
        self._close_connections(idle, "pool closed")
        logger.info("pool %r: closed", self.name)

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections_in_use(self) -> weakref.WeakSet[Connection]:
        """The connections lent and not yet returned, as a weak set (a snapshot)."""
        with self._lock:
            conns = self._conns.copy()  # a C-level copy: safe from the garbage collector's removals
        lent = [ref() for ref, info in conns.items() if info.state is LENT]
        return weakref.WeakSet(conn for conn in lent if conn is not None)

    def stats(self) -> dict[str, Any]:
        """Return a snapshot: sizes, current counts, and counters that only grow."""
        with self._lock:
            snapshot: dict[str, Any] = {
                "name": self.name,
                "minconn": self.minconn,
                "maxconn": self.maxconn,
                "idle": len(self.idle_connections),
                "in_use": len(self._conns) - len(self.idle_connections),
                "opening": self._pending,
                "waiting": len(self._waiters),
            }
            snapshot.update(self._stats)
        return snapshot

    def __repr__(self) -> str:
        with self._lock:
            idle = len(self.idle_connections)
            in_use = len(self._conns) - idle
            waiting = len(self._waiters)
        state = "closed" if self._closed else "open"
        return (
            f"<{type(self).__name__} {self.name!r} {state} [idle: {idle}, in use: {in_use}, "
            f"waiting: {waiting} | minconn={self.minconn}, maxconn={self.maxconn}]>"
        )

    # -- borrowing that cannot leak (see pgpool.borrow) ----------------------------------------

    def connection(self, timeout: float | None = None) -> AbstractContextManager[Connection]:
        """Borrow a connection for a ``with`` block; it always comes back, uncommitted work rolled back.

        Inside another borrow from this pool in the same context, joins that borrow's connection.
        """
        return borrow.ConnectionBorrow(self, timeout)

    def transaction(self, timeout: float | None = None) -> AbstractContextManager[Connection]:
        """Borrow a connection in a transaction: committed if the block ends normally, else rolled back.

        Nested in another `transaction` of this pool, it is a savepoint of the outer one.
        """
        return borrow.transaction(self, timeout)

    # -- housekeeping and fork -----------------------------------------------------------------

    def _housekeep(self) -> float | None:
        """One round of background maintenance; return seconds until the next one (None: stop)."""
        if self._closed:
            return None
        now = time.monotonic()
        to_close: list[tuple[Connection, str]] = []
        leaks: list[tuple[float, list[str]]] = []
        self._recheck_signalled_idle(to_close)
        with self._lock:
            if self.idle_timeout:
                self._evict_idle_locked(now, to_close)
            if self.max_lifetime is not None:
                self._retire_expired_locked(now, to_close)
            self._grant_free_slots_locked()
            refill = self._reserve_refill_locked()
            if self.leak_timeout is not None:
                for info in self._conns.copy().values():
                    if info.state is LENT and info.stack is not None and now - info.borrowed_at > self.leak_timeout:
                        leaks.append((now - info.borrowed_at, info.stack))
                        info.stack = None  # report each borrow once
        for held, stack in leaks:
            logger.warning(
                "pool %r: connection borrowed %.1f sec ago and not returned (leak_timeout=%s); borrowed at:\n%s",
                self.name,
                held,
                self.leak_timeout,
                "".join(stack),
            )
        for conn, why in to_close:
            self._close_connections([conn], why)
        self._refill(refill)
        return self._housekeeping_interval()

    def _recheck_signalled_idle(self, to_close: list[tuple[Connection, str]]) -> None:
        """Check for real the idle connections the server sent something to, and drop dead ones.

        So that after a restart or pg_terminate_backend the pool replaces its connections by itself,
        not only when a borrower happens to pick them. A notification also makes a socket readable:
        only a round trip tells, and it runs outside the lock on connections taken out of the idle list.
        """
        with self._lock:
            idle = [(conn, self._conns[weakref.ref(conn)]) for conn in self.idle_connections]
        signalled = [(conn, info) for conn, info in idle if socket_readable(conn)]
        if not signalled:
            return
        taken = []
        with self._lock:
            for conn, info in signalled:
                if conn in self.return_times:  # still idle: not taken, evicted or cleared meanwhile
                    self.idle_connections.remove(conn)
                    del self.return_times[conn]
                    info.state = RETURNING
                    taken.append((conn, info))
        for conn, info in taken:
            reason = None
            try:
                check_connection(conn)
            except Exception as exc:
                reason = f"broken: closed by the server while idle ({self._redact(str(exc).strip())})"
            with self._lock:
                self._settle_locked(conn, info, reason, to_close)

    def _housekeeping_interval(self) -> float:
        intervals = [5.0]
        if self.leak_timeout is not None:
            intervals.append(max(0.05, min(self.leak_timeout / 4, 0.5)))
        if self.idle_timeout:
            intervals.append(max(0.05, self.idle_timeout / 4))
        if self.max_lifetime is not None:
            intervals.append(max(0.05, self.max_lifetime * _LIFETIME_JITTER / 2))
        return min(intervals)

    def _after_fork_in_child(self) -> None:
        """Start from zero connections without touching the parent's sessions."""
        self._lock = threading.Lock()
        inherited = [ref() for ref in self._conns.copy()]
        self.idle_connections.clear()
        self.return_times.clear()
        self._conns.clear()
        self._pending = 0
        self._waiters.clear()
        self._housekeeper = Housekeeper(self)
        for conn in inherited:
            if conn is not None:
                _fork.disown(conn)


class ThreadSafeConnectionPool(ConnectionPool):
    """A `ConnectionPool` to share between threads, able to wait for a connection.

    Every method may be called from any thread. With ``timeout > 0`` (the pool's, or per call),
    `getconn` queues when `maxconn` connections are lent and waits for one to come back; waiters are
    served first come, first served. Connections are opened outside the pool's lock, in parallel.
    """

    _can_wait = True
