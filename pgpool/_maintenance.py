"""What the housekeeper runs, and what a forked child does first: evictions, dead idle connections,
leak reports, minconn refills; starting afresh after fork."""

from __future__ import annotations

import logging
import time

import psycopg2
import psycopg2.extensions

from . import _session
from ._core import PoolCore
from .borrow import end_dropped_borrows, held_by_generators
from .health import socket_readable

Connection = psycopg2.extensions.connection
logger = logging.getLogger("pgpool")

_LIFETIME_JITTER = 0.05


class Maintenance:
    """The housekeeping round. It receives the pool's shared part (`PoolCore`) and its state."""

    def __init__(self, core: PoolCore) -> None:
        self._core = core
        self._state = core._state
        self.name = core.name  # the housekeeper names its thread after it

    def _housekeep(self) -> float | None:
        """One round of background maintenance; return seconds until the next one (None: stop)."""
        if self._state.closed:
            return None
        if held_by_generators:
            end_dropped_borrows()
        now = time.monotonic()
        to_close: list[tuple[Connection, str]] = []
        try:
            self._recheck_signalled_idle(to_close)
            self._state.housekeeping_drops(now, self._core.max_lifetime is not None, to_close)
        finally:
            self._core._close_dropped(to_close)
        if self._state.checks_server:
            self._evict_unwanted_idle()
        self._report_leaks(now)
        if self._state.times is not None:
            self._core._emit("flush")  # the borrow timings so far, into the listener's histograms
        if self._core._refill_in_background:
            self._core._refill()
        return self._housekeeping_interval()

    def _report_leaks(self, now: float) -> None:
        self._core._report_collected_leaks()
        if self._core.leak_timeout is None:
            return
        for info in self._state.lent_infos():
            stack = info.stack
            if stack is not None and now - info.borrowed_at > self._core.leak_timeout:
                info.stack = None  # report each borrow once
                logger.warning(
                    "pool %r: connection borrowed %.1f sec ago and not returned (leak_timeout=%s); borrowed at:\n%s",
                    self._core.name,
                    now - info.borrowed_at,
                    self._core.leak_timeout,
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
            reason = _session.lend_problem(conn, info, None, self._core._connector.redact)
            if reason is not None:
                reason = f"broken: {reason} while idle"
            self._state.finish_return(conn, info, reason, time.monotonic(), to_close)

    def _evict_unwanted_idle(self) -> None:
        """An idle connection whose server reported it is no longer what the pool wants (a round
        trip of the signalled-idle check brought the news): a new generation."""
        for conn in self._state.idle_snapshot():
            unwanted = self._core._target.unwanted(conn)
            if unwanted is not None:
                self._core._evict(conn, unwanted)
                return

    def _housekeeping_interval(self) -> float:
        intervals = [5.0]
        if self._core.leak_timeout is not None:
            intervals.append(max(0.05, min(self._core.leak_timeout / 4, 0.5)))
        if self._state.idle_timeout:
            intervals.append(max(0.05, self._state.idle_timeout / 4))
        if self._core.max_lifetime is not None:
            intervals.append(max(0.05, self._core.max_lifetime * _LIFETIME_JITTER / 2))
        if self._state.times is not None:
            intervals.append(1.0)  # borrow timings for the metrics: handed to the SDK every second
        return min(intervals)
