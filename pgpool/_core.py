"""What every part of a pool shares: its fields, opening connections in reserved slots (with the
minconn refills and the retries of a starting server), closing dropped ones, and telling listeners.

`PoolCore` is the base of the parts of `ConnectionPool` (`pgpool._lending`, `pgpool._returning`,
`pgpool._maintenance`) and declares the fields they share; `ConnectionPool.__init__` sets them.
"""

from __future__ import annotations

import logging
import math
import os
import select
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions

from . import _failover
from ._cleanup import until_done
from ._connect import Connector, backoff, retryable
from ._records import Claim
from ._state import PoolState
from .errors import PoolTimeout
from .housekeeping import Housekeeper

Connection = psycopg2.extensions.connection
logger = logging.getLogger("pgpool")

Hook = Callable[[Any], Any]

_TRANSIENT_WAIT = 30.0  # without a timeout, the longest wait for a slot held by a refill or a close


_BACKEND_EXIT_WAIT = 1.0  # at most this long for a closed connection's backend to exit (a dead network)


def _dup_socket(conn: Connection) -> int | None:
    """A second descriptor of the connection's socket, to see the server end the session after close()."""
    try:
        return os.dup(conn.fileno())
    except Exception:
        return None


def _await_backend_exit(fd: int, deadline: float) -> None:
    """Wait (bounded) until the server closes its end: the backend has exited, its session is gone
    from pg_stat_activity and from max_connections. psycopg2's close() only sends Terminate."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return
        try:
            if not os.read(fd, 65536):
                return  # end of file: the backend is gone
        except BlockingIOError:
            continue
        except OSError:
            return


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_timeout(timeout: float, pool_name: str, can_wait: bool, kind: str) -> float:
    """Validate a timeout, the pool's or a call's: seconds >= 0, and 0 for a pool that cannot wait."""
    if not is_number(timeout) or not timeout >= 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r} (pool {pool_name!r})")
    if timeout > 0 and not can_wait:
        raise ValueError(
            f"timeout must be 0 for a {kind} (pool {pool_name!r}): in one thread "
            "nobody can return a connection while getconn waits; use ThreadSafeConnectionPool"
        )
    return float(timeout)


class PoolCore:
    """The part of a pool that its other parts share: the settings, the state machine, the connector,
    the housekeeper; opening connections in reserved slots and closing dropped ones. The façade
    (`pgpool.pool.ConnectionPool`) makes it and hands it to `Lending`, `Returning` and `Maintenance`.
    State changes go through `_state`."""

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        can_wait: bool,
        refill_in_background: bool,
        timeout: float,
        hooks: tuple[Hook | None, Hook | None, Hook | None],
        max_lifetime: float | None,
        leak_timeout: float | None,
        state: PoolState,
        connector: Connector,
        target: _failover.ServerTarget,
        update_fast: Callable[[], None],
    ) -> None:
        self.name = name
        self._kind = kind  # the pool's class name, for messages
        self._can_wait = can_wait  # getconn may wait (ThreadSafeConnectionPool)
        self._refill_in_background = refill_in_background  # minconn restored by the housekeeper
        self.timeout = timeout  # the default wait of getconn, in seconds
        self.check, self.configure, self.reset = hooks
        self.max_lifetime = max_lifetime
        self.leak_timeout = leak_timeout
        self._state = state  # idle, lent, opening, closing, waiting: every change goes through it
        self._connector = connector  # opens connections with the pool's settings
        self._target = target  # the kind of server target_session_attrs asks for
        self._housekeeper: Housekeeper  # set by the façade once the Maintenance part exists
        self._listener: Any = None  # a metrics listener (pgpool.otel), told of connects, timeouts
        self._update_fast = update_fast  # the façade decides again whether its fast paths apply
        # id(closed connection) -> a duplicate of its socket, until its backend has exited (_close_dropped)
        self._exiting: dict[int, int] = {}

    def _checked_timeout(self, timeout: float) -> float:
        """Validate a timeout, the pool's or a call's."""
        return check_timeout(timeout, self.name, self._can_wait, self._kind)

    @property
    def _events(self) -> Any:
        return self._listener

    @_events.setter
    def _events(self, listener: Any) -> None:
        self._listener = listener
        self._state.times = None if listener is None else getattr(listener, "times", None)
        self._update_fast()

    def _open(self, claim: Claim) -> None:
        """Open a connection in the claim's slot (see `Connector.open`) and tell the metrics listener."""
        generation = self._state.generation  # before the connect: one that straddles an eviction is old
        self._connector.open(claim)
        if claim.new_info is not None:
            claim.new_info.generation = generation
        if self._events is not None:
            self._emit("opened", claim.connect_seconds)

    def _note_connect_error(self, exc: BaseException, attempt: int, first: BaseException | None) -> BaseException:
        """Log the first connect failure of a getconn at WARNING; later ones (retries) at DEBUG."""
        text = self._connector.redact(str(exc).strip())
        if first is None:
            logger.warning("pool %r: connect failed: %s", self.name, text)
            return exc
        logger.debug("pool %r: connect attempt %d failed: %s", self.name, attempt, text)
        return first

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
            f"(maxconn={self._state.maxconn}, {counts['in_use']} in use)"
        )
        if error is not None:
            what = "connect error" if retryable(error) else "error"
            msg += f"; last {what}: {self._connector.redact(str(error).strip())}"
        return msg

    def _evict(self, conn: Connection | None, reason: str) -> bool:
        """A sign that `conn`'s server is no longer what the pool wants (or drain() without one): start
        a new generation, close the idle connections, log one WARNING per round (see PoolState.evict)."""
        seen = None
        if conn is not None:
            info = self._state.info_of(conn)
            if info is None:
                return False  # not ours (any more): its pool's generation is not at stake
            seen = info.generation
        to_close: list[tuple[Connection, str]] = []
        try:
            started = self._state.evict(seen, to_close)
            if started:
                server = _failover.server_of(conn) if conn is not None else "every server"
                logger.warning(
                    "pool %r: evicting connections opened before now: server %s: %s", self.name, server, reason
                )
            self._close_dropped(to_close)
        except BaseException:
            self._close_dropped(to_close)  # consumes what is left, so safe after a partial run
            raise
        if started:
            self._after_drop()
        return started

    def _after_drop(self) -> None:
        """Reopen connections up to minconn: here, as psycopg2_pool does, or in the background."""
        if self._refill_in_background:
            self._kick_housekeeper()
        else:
            self._refill()

    def _kick_housekeeper(self) -> None:
        """Have the housekeeper run a round now (refill minconn), starting it if nobody borrowed yet."""
        if not self._housekeeper.started and not self._state.closed:
            self._housekeeper.start()
        self._housekeeper.kick()

    @until_done
    def _close_dropped(self, to_close: list[tuple[Connection, str]], keep_slot_for: Claim | None = None) -> None:
        """Close dropped connections, each slot freed only once its connection is closed.

        Consumes `to_close` from the end, so that a call cut short can be called again to finish.
        """
        state = self._state
        exiting = self._exiting
        deadline = time.monotonic() + _BACKEND_EXIT_WAIT  # for the whole batch, not per connection
        while to_close:
            conn, reason = to_close[-1]
            key = id(conn)  # unique: `closing` holds the connection until its slot is freed below
            # Wait for the backend to exit only while the slot may be reused (an open pool). The
            # duplicate descriptor is kept in `_exiting` until the wait is over, so that a retry after
            # an interrupt waits again rather than freeing the slot of a session still on the server.
            fd = exiting.get(key)
            if fd is None and not conn.closed and not state.closed:
                fd = _dup_socket(conn)
                if fd is not None:
                    exiting[key] = fd
            try:
                conn.close()
            except Exception:
                pass
            if fd is not None:
                _await_backend_exit(fd, deadline)  # the server counts the session until its backend is gone
                del exiting[key]  # forgotten first: a retry never reads a descriptor closed (and reused)
                os.close(fd)
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

    @until_done
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
        for _ in range(self._state.minconn):
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
                    if configuring:
                        raise  # configure failed: no retry can fix it (nor is it a connect error)
                    state.count("connect_errors")
                    attempt += 1
                    first_error = self._note_connect_error(exc, attempt, first_error)
                    if not retryable(exc) or self.timeout <= 0:
                        raise  # no wait allowed, or refused for good (password, database, role)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._give_up(self.timeout, exc, attempt) from exc
                    time.sleep(min(remaining, backoff(attempt - 1)))

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
