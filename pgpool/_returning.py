"""Returning on the slow path: take the connection back (state RETURNING), clean it up outside the
lock, then keep it, hand it to a waiter or drop it. The fast path is `PoolState.return_fast`.
"""

from __future__ import annotations

import logging
import time

import psycopg2
import psycopg2.extensions

from . import _cleanup, _session
from ._cleanup import until_done
from ._core import PoolCore
from ._records import IDLE, LENT, RETURNING, ConnInfo

Connection = psycopg2.extensions.connection
logger = logging.getLogger("pgpool")


class Returning:
    """`putconn`'s slow path. It receives the pool's shared part (`PoolCore`) and its state."""

    def __init__(self, core: PoolCore) -> None:
        self._core = core
        self._state = core._state

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
        times = state.times
        if times is not None:
            held = state.info_of(conn)
            if held is not None and held.state is LENT:
                times.uses.append(now - held.borrowed_at)
        info: ConnInfo | None = None
        try:
            info = state.begin_return(conn, now, lease)  # PoolError: refused, nothing changed
            reason = _session.return_problem(conn, close)
            if reason is None and self._state.checks_server:
                unwanted = self._core._target.unwanted(conn)  # what the server reported: no round trip
                if unwanted is not None:
                    self._core._evict(conn, unwanted)  # this connection's generation ends: dropped below
            if reason is None:
                reason = _session.clean_returned(
                    conn, info, self._core.reset, self._core.configure, self._core._connector.redact
                )
                if reason is not None and reason.startswith("reset failed"):
                    logger.warning("pool %r: %s; connection discarded", self._core.name, reason)
            state.finish_return(conn, info, reason, time.monotonic(), to_close)
            if to_close:
                self._core._close_dropped(to_close)
                self._core._after_drop()
        except BaseException:
            for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
                try:
                    for _ in _cleanup.RETRIES:
                        try:
                            self._abort_return(conn, info, to_close)
                            break
                        except BaseException:
                            pass
                    break
                except BaseException:  # on the inner loop's back-edge
                    pass
            raise

    def _tidy(self) -> None:
        """What a fast return left due: serve waiters, close evicted connections (see `PoolState.tidy`)."""
        to_close: list[tuple[Connection, str]] = []
        try:
            self._state.tidy(time.monotonic(), to_close)
            if to_close:
                self._core._close_dropped(to_close)
                self._core._after_drop()
        except BaseException:
            self._core._close_dropped(to_close)  # consumes what is left, so safe after a partial run
            raise

    @until_done
    def _finish_borrow(self, conn: Connection, lease: int, close: bool = False) -> None:
        """Finish the return of the borrow `lease` of `conn`, after an interrupt (see `_return`)."""
        self._return(conn, lease, close)

    @until_done
    def _abort_return(self, conn: Connection, info: ConnInfo | None, to_close: list[tuple[Connection, str]]) -> None:
        """Finish a return that was cut short: a connection being cleaned up is dropped (its cleanup
        may be half done), and whatever was dropped meanwhile (evictions) is closed. Idempotent."""
        if info is not None:
            self._state.finish_return(conn, info, "cleanup interrupted", time.monotonic(), to_close)
        self._core._close_dropped(to_close)
