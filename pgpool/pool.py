"""The public pools: `ConnectionPool` and `ThreadSafeConnectionPool`, a façade over the state machine.

A port of the ``psycopg2_pool`` module's behaviour (LIFO idle list, ``idle_timeout``, ``minconn``
refill, rollback on return) with its defects fixed, plus what production use needs. Where things live:

- `pgpool._state`: what is idle, lent, opening, closing, waiting (no I/O);
- `pgpool._connect`: opening connections (settings validation, connect, configure, retry policy);
- `pgpool._session`: the checks before a lend and the cleanup after a return;
- `pgpool.housekeeping`: the background thread; `pgpool._fork`: fork safety;
- `pgpool.borrow`, `pgpool.decorators`: borrowing that cannot leak.

How a call stays safe under interrupts: what a `getconn` holds at any instant (a taken connection, a
reserved slot, a place in line, connections to close) is recorded in one `Claim`; a failure or an
interrupt anywhere gives the whole claim back through one idempotent method, called again if an
interrupt lands on its own entry. A slot is freed only after its connection is closed.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Self, TypedDict, cast

import psycopg2
import psycopg2.extensions

from . import _fork, _session, borrow
from ._connect import Connector, backoff, retryable
from ._records import IDLE, LENT, RETURNING, Claim, ConnInfo
from ._state import TIDY, WAIT, PoolState
from ._views import ReturnTimes
from .borrow import end_finalized_borrows, finalized
from .errors import PoolError, PoolTimeout
from .health import socket_readable
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
_WAIT_SLICE = 0.5  # a waiter re-checks for slots freed by garbage-collected leaks this often
_TRANSIENT_WAIT = 30.0  # without a timeout, the longest wait for a slot held by a refill or a close
_LIFETIME_JITTER = 0.05
_monotonic = time.monotonic


def _check_hook(name: str, hook: object) -> None:
    if hook is not None and not callable(hook):
        raise TypeError(f"{name} must be a callable taking a connection, got {hook!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class PoolStats(TypedDict):
    """What `ConnectionPool.stats` returns: sizes, current counts, and counters that only grow."""

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


class ConnectionPool(Generic[C]):
    """A pool of psycopg2 connections, for one thread.

    `getconn` lends a connection and `putconn` takes it back: after `getconn` you must call `putconn`,
    or better, borrow with ``with pool.connection() as conn:``, which cannot forget. Connections are
    opened on demand up to `maxconn`; `minconn` of them are opened at construction and kept open
    (this class reopens them inside `putconn`, as ``psycopg2_pool`` does).

    Attributes, as in ``psycopg2_pool``: `minconn`, `maxconn`, `idle_timeout`, `connect_kwargs`;
    `idle_connections` (a deque, the most recently returned on the right: last in, first out);
    `connections_in_use` (a weak set snapshot of the lent connections); `return_times` (idle
    connection -> ``time.monotonic()`` of its return). Read them, do not change them.

    The pool has a lock even in this single-threaded class, because its housekeeping thread changes
    its state too. This class refuses ``timeout > 0``: with one thread, nobody could return a
    connection while `getconn` waits. Use `ThreadSafeConnectionPool` from several threads.
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
        self._connector = Connector(self.name, connect_kwargs, configure, max_lifetime)
        self._state = PoolState(self.name, minconn, maxconn, idle_timeout)
        self._housekeeper = Housekeeper(self)
        self._borrow = borrow.new_borrow_var(self.name)
        self._keys: dict[Any, C] = {}  # psycopg2.pool's getconn(key): key -> its connection
        self._listener: Any = None  # a metrics listener (pgpool.otel), told of lends, returns, timeouts
        self._fast_lend = False  # getconn may try PoolState.lend_fast (see _update_fast)
        self._fast_return = reset is None  # putconn may try PoolState.return_fast
        _fork.track(self)
        try:
            self._open_minconn_at_start()
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
        if not _is_number(idle_timeout) or idle_timeout < 0:
            raise ValueError(f"idle_timeout must be a number of seconds >= 0, got {idle_timeout!r} {where}")
        self._checked_timeout(timeout)
        for label, value in (("max_lifetime", max_lifetime), ("leak_timeout", leak_timeout)):
            if value is not None and (not _is_number(value) or not value > 0):
                raise ValueError(f"{label} must be None or a number of seconds > 0, got {value!r} {where}")

    def _checked_timeout(self, timeout: float) -> float:
        """Validate a timeout, the pool's or a call's."""
        if not _is_number(timeout) or not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r} (pool {self.name!r})")
        if timeout > 0 and not self._can_wait:
            raise ValueError(
                f"timeout must be 0 for a {type(self).__name__} (pool {self.name!r}): in one thread "
                "nobody can return a connection while getconn waits; use ThreadSafeConnectionPool"
            )
        return float(timeout)

    @property
    def _events(self) -> Any:
        return self._listener

    @_events.setter
    def _events(self, listener: Any) -> None:
        self._listener = listener
        self._update_fast()

    def _update_fast(self) -> None:
        """Decide once whether the fast paths apply: not with hooks or listeners to call, nor before
        the housekeeper runs (the slow path starts it)."""
        plain = self._listener is None
        self._fast_lend = plain and self.check is None and self.leak_timeout is None and self._housekeeper.started
        self._fast_return = plain and self.reset is None

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
        """Idle connection -> ``time.monotonic()`` of its return; writable, as in psycopg2_pool."""
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
        if key is None and self._fast_lend and not finalized:
            item = self._state.lend_fast(_monotonic())
            if item is not None:
                return item[0]  # type: ignore[return-value]  # opened by connection_factory
        wait = self.timeout if timeout is None else self._checked_timeout(timeout)
        if key is not None:
            return self._getconn_keyed(key, wait)
        return self._lend(wait)[0]

    def _lend_idle_fast(self) -> tuple[C, int] | None:
        """The fast path of a lend (see `PoolState.lend_fast`): the connection and its lease, or None
        when anything needs the slow path (hooks, waiters, leaks to report, nothing idle)."""
        if not self._fast_lend or finalized:
            return None
        item = self._state.lend_fast(time.monotonic())
        if item is None:
            return None
        return item[0], item[1].lease  # type: ignore[return-value]  # opened by connection_factory

    def _getconn_keyed(self, key: Any, wait: float) -> C:
        held = self._keys.get(key)
        if held is not None:
            return held
        conn, _ = self._lend(wait)
        # Two threads may lend for the same key at once: the first to store wins (setdefault is one
        # atomic step), the other gives its connection back and uses the winner's.
        winner = self._keys.setdefault(key, conn)
        if winner is not conn:
            self._return(conn, None)
        return winner

    def _lend(self, wait: float) -> tuple[C, int]:
        """Lend a connection and its lease number (which tells this borrow from the next)."""
        if not self._housekeeper.started:
            self._housekeeper.start()  # before anything is taken: an interrupt here loses nothing
            self._update_fast()
        state = self._state
        if finalized:
            end_finalized_borrows()
        if state.leaks:
            self._report_collected_leaks()
        start = time.monotonic()
        deadline = start + wait if wait > 0 else start + _TRANSIENT_WAIT
        attempt = 0
        first_error: BaseException | None = None
        claim = Claim()
        # From here on, whatever the claim holds is given back by the except clause at the bottom.
        try:
            while True:
                from_waiter = False
                if not claim.slot:
                    outcome = state.acquire(claim, time.monotonic(), wait > 0)
                    if claim.to_close:
                        self._close_dropped(claim.to_close)
                    if outcome is WAIT:
                        self._wait(claim, deadline, wait, first_error)
                        from_waiter = True
                    elif outcome is not None:
                        raise PoolError(outcome)
                fresh = claim.slot
                if claim.slot:
                    try:
                        self._open(claim)
                    except Exception as exc:
                        if claim.new_conn is not None or not retryable(exc):
                            raise  # configure failed, or a bad setting: no retry can fix it
                        state.count("connect_errors")
                        attempt += 1
                        first_error = self._note_connect_error(exc, attempt, first_error)
                        remaining = deadline - time.monotonic()
                        if wait <= 0:
                            raise
                        state.release_slot(claim)
                        if remaining <= 0:
                            raise self._give_up(wait, exc, attempt) from exc
                        time.sleep(min(remaining, backoff(attempt - 1)))
                        continue
                    if not state.adopt(claim, time.monotonic(), lend=True):
                        self._close_dropped(claim.to_close)
                        raise PoolError(f"pool {self.name!r} was closed while connecting")
                if claim.conn is None:
                    continue
                assert claim.info is not None
                problem = _session.lend_problem(claim.conn, claim.info, self.check, self._connector.redact)
                if problem is None:
                    if attempt:
                        logger.info("pool %r: connected after %d failed attempts", self.name, attempt)
                    if self.leak_timeout is not None:
                        self._note_borrow(claim.info)
                    if self._events is not None:
                        self._emit("lent", time.monotonic() - start)
                    conn, lease = claim.conn, claim.info.lease
                    claim.conn = claim.info = None  # the caller owns it now
                    return conn, lease  # type: ignore[return-value]  # opened by connection_factory
                # A waiter keeps its place in line: it reopens in the slot of the connection it was
                # handed. A new connection that fails its check counts as a failed connect.
                state.drop_claimed(claim, problem, broken=True)
                self._close_dropped(claim.to_close, keep_slot_for=claim if from_waiter or fresh else None)
                if fresh:
                    attempt += 1
                    error = PoolError(f"pool {self.name!r}: a new connection failed its check: {problem}")
                    first_error = first_error or error
                    remaining = deadline - time.monotonic()
                    if wait <= 0:
                        raise error
                    if remaining <= 0:
                        raise self._give_up(wait, error, attempt) from error
                    time.sleep(min(remaining, backoff(attempt - 1)))
        except BaseException:
            try:
                self._give_back_claim(claim)
            except BaseException:
                self._give_back_claim(claim)  # an interrupt on its entry: it is idempotent
                raise
            raise

    def _open(self, claim: Claim) -> None:
        """Open a connection in the claim's slot (see `Connector.open`) and tell the metrics listener."""
        self._connector.open(claim)
        if self._events is not None:
            self._emit("opened", claim.connect_seconds)

    def _give_back_claim(self, claim: Claim) -> None:
        """Give back all a failed or interrupted getconn holds. Idempotent: safe to call again."""
        state = self._state
        state.leave_line(claim)
        state.drop_claimed(claim, "getconn interrupted or failed")
        self._close_dropped(claim.to_close)
        state.release_slot(claim)

    def _note_connect_error(self, exc: BaseException, attempt: int, first: BaseException | None) -> BaseException:
        """Log the first connect failure of a getconn at WARNING; later ones (retries) at DEBUG."""
        text = self._connector.redact(str(exc).strip())
        if first is None:
            logger.warning("pool %r: connect failed: %s", self.name, text)
            return exc
        logger.debug("pool %r: connect attempt %d failed: %s", self.name, attempt, text)
        return first

    def _wait(self, claim: Claim, deadline: float, wait: float, error: BaseException | None) -> None:
        """Wait in line until served (the outcome moves into the claim) or the deadline passes."""
        waiter = claim.waiter
        assert waiter is not None
        state = self._state
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining > 0:
                if waiter.signal.acquire(True, min(remaining, _WAIT_SLICE)):
                    break  # served: whoever served us did it under the lock before the release
                if finalized:
                    end_finalized_borrows()  # a dropped generator's connection may be what we wait for
                now = time.monotonic()
                remaining = deadline - now
            if state.recheck_waiter(waiter, remaining <= 0, now):
                break  # a waiter that was served keeps what it got, whatever the clock says
            if remaining <= 0:
                claim.waiter = None  # out of the line (recheck_waiter removed it, counting the timeout)
                if self._events is not None:
                    self._emit("timed_out")
                raise PoolTimeout(self._timeout_message(wait, error)) from error
        state.collect(claim)

    def _note_borrow(self, info: ConnInfo) -> None:
        """Remember where a connection was borrowed, for leak reports."""
        info.stack = traceback.format_stack()[:-3]

    def _emit(self, event: str, *args: Any) -> None:
        """Tell the metrics listener; a listener that fails is logged, never breaks the pool."""
        try:
            getattr(self._events, event)(self, *args)
        except Exception:
            logger.warning("pool %r: the metrics listener failed on %s", self.name, event, exc_info=True)

    def _give_up(self, wait: float, error: BaseException, attempts: int) -> PoolTimeout:
        """The PoolTimeout that ends a series of failed connects, which one INFO record sums up
        (the first failure was a WARNING, the retries DEBUG; the timeout itself is raised, not logged)."""
        self._count_timeout()
        logger.info("pool %r: giving up after %d failed connect attempts in %.2f sec", self.name, attempts, wait)
        return PoolTimeout(self._timeout_message(wait, error))

    def _count_timeout(self) -> None:
        self._state.count("timeouts")
        if self._events is not None:
            self._emit("timed_out")

    def _timeout_message(self, wait: float, error: BaseException | None) -> str:
        counts = self._state.counts()
        waited = f"after {wait:.2f} sec" if wait > 0 else f"after {_TRANSIENT_WAIT} sec waiting for a refill or close"
        msg = (
            f"couldn't get a connection from pool {self.name!r} {waited} "
            f"(maxconn={self.maxconn}, {counts['in_use']} in use)"
        )
        if error is not None:
            what = "connect error" if retryable(error) else "error"
            msg += f"; last {what}: {self._connector.redact(str(error).strip())}"
        return msg

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
        if info is not None and close is False and key is None and self._fast_return:
            lease = info.lease
            try:
                done = state.return_fast(conn, conn_id, info, _monotonic())  # type: ignore[arg-type]
                if done is not None:
                    if done is TIDY:
                        self._tidy()
                    return
            except BaseException:
                self._return(conn, lease)  # type: ignore[arg-type]  # idempotent: finishes this borrow only
                raise
        if not isinstance(close, bool):
            raise TypeError(f"close must be True or False, got {close!r} (pool {self.name!r})")
        lease = None  # the borrow being returned, to finish it (and only it) after an interrupt
        if info is not None and info.ref is not None and info.ref() is conn:
            lease = info.lease
        try:
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
            if isinstance(conn, Connection) and lease is not None:
                # Finish this borrow's return if the interrupt stopped it; a connection lent again
                # meanwhile (another lease) is someone else's and is left alone.
                self._return(conn, lease, close)
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

    def _return(self, conn: Connection, lease: int | None, close: bool = False) -> None:
        """Take back `conn`. With a `lease` (internal callers), idempotent: a borrow that ended already,
        or whose return was cut short by an interrupt, is finished or left alone, never refused."""
        state = self._state
        now = time.monotonic()
        to_close: list[tuple[Connection, str]] = []
        if lease is not None:
            known = state.info_of(conn)
            if known is None or known.lease != lease:
                return
            if known.state is RETURNING:
                self._abort_return(conn, known, to_close)  # an earlier return was interrupted
                return
            if known.state is IDLE:
                self._tidy()  # an earlier fast return got this far: finish what it left due
                return
            if known.state is not LENT:
                return  # an earlier return got this far before the interrupt: done
        if self._events is not None:
            held = state.info_of(conn)
            if held is not None and held.state is LENT:
                self._emit("returned", now - held.borrowed_at)
        info: ConnInfo | None = None
        try:
            info = state.begin_return(conn, now, lease)  # PoolError: refused, nothing changed
            reason = _session.return_problem(conn, close)
            if reason is None:
                reason = _session.clean_returned(conn, info, self.reset, self.configure, self._connector.redact)
                if reason is not None and reason.startswith("reset failed"):
                    logger.warning("pool %r: %s; connection discarded", self.name, reason)
            state.finish_return(conn, info, reason, time.monotonic(), to_close)
            if to_close:
                self._close_dropped(to_close)
                self._after_drop()
        except BaseException:
            try:
                self._abort_return(conn, info, to_close)
            except BaseException:
                self._abort_return(conn, info, to_close)  # an interrupt on its entry: it is idempotent
                raise
            raise

    def _tidy(self) -> None:
        """What a fast return left due: serve waiters, close evicted connections (see `PoolState.tidy`)."""
        to_close: list[tuple[Connection, str]] = []
        try:
            self._state.tidy(time.monotonic(), to_close)
            if to_close:
                self._close_dropped(to_close)
                self._after_drop()
        except BaseException:
            self._close_dropped(to_close)  # consumes what is left, so safe after a partial run
            raise

    def _abort_return(self, conn: Connection, info: ConnInfo | None, to_close: list[tuple[Connection, str]]) -> None:
        """Finish a return that was cut short: a connection being cleaned up is dropped (its cleanup
        may be half done), and whatever was dropped meanwhile (evictions) is closed. Idempotent."""
        if info is not None:
            self._state.finish_return(conn, info, "cleanup interrupted", time.monotonic(), to_close)
        self._close_dropped(to_close)

    def _after_drop(self) -> None:
        """Reopen connections up to minconn: here, as psycopg2_pool does, or in the background."""
        if self._refill_in_background:
            self._kick_housekeeper()
        else:
            self._refill()

    def _kick_housekeeper(self) -> None:
        """Have the housekeeper run a round now (refill minconn), starting it if nobody borrowed yet."""
        if not self._housekeeper.started and not self.closed:
            self._housekeeper.start()
        self._housekeeper.kick()

    def _close_dropped(self, to_close: list[tuple[Connection, str]], keep_slot_for: Claim | None = None) -> None:
        """Close dropped connections, each slot freed only once its connection is closed.

        Consumes `to_close` from the end, so that a call cut short can be called again to finish.
        """
        state = self._state
        while to_close:
            conn, reason = to_close[-1]
            try:
                conn.close()
            except Exception:
                pass
            # Logged before the slot is freed: a slow handler delays the next connect, never lets the
            # server see more than maxconn sessions.
            logger.info("pool %r: closing connection: %s", self.name, reason)
            state.closed_one(conn, keep_slot_for)
            to_close.pop()

    def _refill(self) -> None:
        """Open connections up to minconn, one at a time; a failure is logged and left for later."""
        state = self._state
        while True:
            claim = Claim()
            if not state.reserve_refill(claim):
                return
            try:
                self._open(claim)
                state.adopt(claim, time.monotonic(), lend=False)
                self._close_dropped(claim.to_close)
            except BaseException as exc:
                try:
                    self._give_back_refill(claim)
                except BaseException:
                    self._give_back_refill(claim)
                    raise
                if not isinstance(exc, Exception):
                    raise
                state.count("connect_errors")
                logger.warning(
                    "pool %r: connect failed (reopening a connection for minconn): %s",
                    self.name,
                    self._connector.redact(str(exc).strip()),
                )
                return

    def _give_back_refill(self, claim: Claim) -> None:
        state = self._state
        state.drop_claimed(claim, "refill failed")
        self._close_dropped(claim.to_close)
        state.release_slot(claim)

    def _open_minconn_at_start(self) -> None:
        """Open minconn connections. With a timeout, a failing connect (a server still starting) is
        retried with backoff until it expires, then `PoolTimeout` chained to the last error; without
        one, the error propagates at once, as in psycopg2_pool."""
        state = self._state
        deadline = time.monotonic() + self.timeout
        attempt = 0
        first_error: BaseException | None = None
        for _ in range(self.minconn):
            while True:
                claim = Claim()
                if not state.reserve_refill(claim):
                    return
                try:
                    self._open(claim)
                    state.adopt(claim, time.monotonic(), lend=False)
                    break
                except BaseException as exc:
                    configuring = claim.new_conn is not None  # connected: configure failed, no retry
                    try:
                        self._give_back_refill(claim)
                    except BaseException:
                        self._give_back_refill(claim)
                        raise
                    if configuring or not retryable(exc) or self.timeout <= 0:
                        raise
                    state.count("connect_errors")
                    attempt += 1
                    first_error = self._note_connect_error(exc, attempt, first_error)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._give_up(self.timeout, exc, attempt) from exc
                    time.sleep(min(remaining, backoff(attempt - 1)))

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

        Threads waiting in `getconn` get `PoolClosed`, and so does every later `getconn`. Calling it
        again does nothing.
        """
        to_close: list[tuple[Connection, str]] = []
        try:
            first = self._state.close(to_close)
            self._close_dropped(to_close)
        except BaseException:
            self._state.close(to_close)  # idempotent: finishes what an interrupt cut short
            self._close_dropped(to_close)
            raise
        if first:
            self._housekeeper.stop()  # it would stop by itself at its next round: the pool is closed
            logger.info("pool %r: closed", self.name)

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
        return borrow.ConnectionBorrow(self, timeout)

    def transaction(self, timeout: float | None = None) -> borrow.TransactionBorrow[C]:
        """Borrow a connection in a transaction: committed if the block ends normally, else rolled back.

        Nested in another `transaction` of this pool (same thread), it is a savepoint of the outer one.
        """
        return borrow.TransactionBorrow(self, timeout)

    # -- housekeeping and fork -----------------------------------------------------------------

    def _housekeep(self) -> float | None:
        """One round of background maintenance; return seconds until the next one (None: stop)."""
        if self.closed:
            return None
        if finalized:
            end_finalized_borrows()
        now = time.monotonic()
        to_close: list[tuple[Connection, str]] = []
        try:
            self._recheck_signalled_idle(to_close)
            self._state.housekeeping_drops(now, self.max_lifetime is not None, to_close)
        finally:
            self._close_dropped(to_close)
        self._report_leaks(now)
        if self._refill_in_background:
            self._refill()
        return self._housekeeping_interval()

    def _report_collected_leaks(self) -> None:
        """One WARNING per lent connection garbage collected without putconn (its slot is free)."""
        for info in self._state.take_leaks():
            where = ""
            if info.stack is not None:
                where = "; borrowed at:\n" + "".join(info.stack)
            logger.warning(
                "pool %r: a lent connection was garbage collected without putconn: its slot is free again, "
                "but return connections with putconn or borrow with pool.connection()%s",
                self.name,
                where,
            )

    def _report_leaks(self, now: float) -> None:
        self._report_collected_leaks()
        if self.leak_timeout is None:
            return
        for info in self._state.lent_infos():
            stack = info.stack
            if stack is not None and now - info.borrowed_at > self.leak_timeout:
                info.stack = None  # report each borrow once
                logger.warning(
                    "pool %r: connection borrowed %.1f sec ago and not returned (leak_timeout=%s); borrowed at:\n%s",
                    self.name,
                    now - info.borrowed_at,
                    self.leak_timeout,
                    "".join(stack),
                )

    def _recheck_signalled_idle(self, to_close: list[tuple[Connection, str]]) -> None:
        """Check for real the idle connections the server sent something to, and drop dead ones.

        So that after a restart or pg_terminate_backend the pool replaces its connections by itself,
        not only when a borrower happens to pick them. Only a round trip tells a closed connection
        from a notification; it runs outside the lock, on connections taken out of the idle list.
        """
        signalled = [conn for conn in self._state.idle_snapshot() if socket_readable(conn)]
        if not signalled:
            return
        for conn, info in self._state.take_signalled(signalled):
            reason = _session.lend_problem(conn, info, None, self._connector.redact)
            if reason is not None:
                reason = f"broken: {reason} while idle"
            self._state.finish_return(conn, info, reason, time.monotonic(), to_close)

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
        """Start from zero connections without touching the parent's sessions, and without waiting on
        any lock a parent thread may have held at fork time."""
        for conn in self._state.reset_after_fork():
            _fork.disown(conn)
        self._keys = {}
        self._housekeeper = Housekeeper(self)
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
