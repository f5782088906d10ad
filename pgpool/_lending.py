"""Lending on the slow path: take an idle connection under the lock, or open one in a reserved
slot, or wait in line; check it; hand it over. The fast path is `PoolState.lend_fast`.

How it stays safe under interrupts: what a `getconn` holds at any instant (a taken connection, a
reserved slot, a place in line, connections to close) is recorded in one `Claim`; a failure or an
interrupt anywhere gives the whole claim back through one idempotent method, called again if an
interrupt lands on its own entry.
"""

from __future__ import annotations

import logging
import time
import traceback

import psycopg2
import psycopg2.extensions

from . import _cleanup, _session
from ._cleanup import until_done
from ._connect import backoff, retryable
from ._core import _TRANSIENT_WAIT, PoolCore
from ._records import Claim, ConnInfo
from ._state import WAIT
from .borrow import end_dropped_borrows, held_by_generators
from .errors import PoolClosed, PoolError, PoolTimeout

Connection = psycopg2.extensions.connection
logger = logging.getLogger("pgpool")

_WAIT_SLICE = 0.5  # a waiter re-checks for slots freed by garbage-collected leaks this often


class Lending:
    """`getconn`'s slow path. It receives the pool's shared part (`PoolCore`) and its state."""

    def __init__(self, core: PoolCore) -> None:
        self._core = core
        self._state = core._state

    def _lend(self, wait: float) -> tuple[Connection, int]:
        """Lend a connection and its lease number (which tells this borrow from the next)."""
        if not self._core._housekeeper.started:
            self._core._housekeeper.start()  # before anything is taken: an interrupt here loses nothing
            self._core._update_fast()
        state = self._state
        if state.leaks:
            self._core._report_collected_leaks()
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
                        self._core._close_dropped(claim.to_close)
                    if outcome is WAIT:
                        self._wait(claim, deadline, wait, first_error)
                        from_waiter = True
                    elif outcome is not None:
                        raise PoolError(outcome)
                fresh = claim.slot
                if claim.slot:
                    try:
                        self._core._open(claim)
                    except Exception as exc:
                        if claim.new_conn is not None:
                            raise  # configure failed: no retry can fix it (nor is it a connect error)
                        state.count("connect_errors")
                        attempt += 1
                        first_error = self._core._note_connect_error(exc, attempt, first_error)
                        remaining = deadline - time.monotonic()
                        if wait <= 0 or not retryable(exc):
                            raise  # no wait allowed, or refused for good (password, database, role)
                        state.release_slot(claim)
                        if remaining <= 0:
                            raise self._core._give_up(wait, exc, attempt) from exc
                        time.sleep(min(remaining, backoff(attempt - 1)))
                        continue
                    if not state.adopt(claim, time.monotonic(), lend=True):
                        self._core._close_dropped(claim.to_close)
                        raise PoolClosed(f"pool {self._core.name!r} was closed while connecting")
                if claim.conn is None:
                    continue
                assert claim.info is not None
                if not fresh and from_waiter:
                    unfit = state.unfit(claim.conn, claim.info, time.monotonic())
                    if unfit is not None:
                        state.drop_claimed(claim, unfit, unlent=True)
                        self._core._close_dropped(claim.to_close, keep_slot_for=claim)
                        continue  # the slot is the waiter's: it opens a new connection in it
                problem = _session.lend_problem(claim.conn, claim.info, self._core.check, self._core._connector.redact)
                if problem is None:
                    if attempt:
                        logger.info("pool %r: connected after %d failed attempts", self._core.name, attempt)
                    if self._core.leak_timeout is not None:
                        self._note_borrow(claim.info)
                    times = state.times
                    if times is not None:
                        times.waits.append(time.monotonic() - start)
                    conn, lease = claim.conn, claim.info.lease
                    claim.conn = claim.info = None  # the caller owns it now
                    return conn, lease
                # A waiter keeps its place in line: it reopens in the slot of the connection it was
                # handed. A new connection that fails its check counts as a failed connect.
                state.drop_claimed(claim, problem, broken=True)
                self._core._close_dropped(claim.to_close, keep_slot_for=claim if from_waiter or fresh else None)
                if fresh:
                    attempt += 1
                    error = PoolError(f"pool {self._core.name!r}: a new connection failed its check: {problem}")
                    first_error = first_error or error
                    remaining = deadline - time.monotonic()
                    if wait <= 0:
                        raise error
                    if remaining <= 0:
                        raise self._core._give_up(wait, error, attempt) from error
                    time.sleep(min(remaining, backoff(attempt - 1)))
        except BaseException:
            for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
                try:
                    for _ in _cleanup.RETRIES:
                        try:
                            self._give_back_claim(claim)
                            break
                        except BaseException:
                            pass
                    break
                except BaseException:  # on the inner loop's back-edge
                    pass
            raise

    @until_done
    def _give_back_claim(self, claim: Claim) -> None:
        """Give back all a failed or interrupted getconn holds. Idempotent: safe to call again."""
        state = self._state
        state.leave_line(claim)
        state.drop_claimed(claim, "getconn interrupted or failed", unlent=True)
        self._core._close_dropped(claim.to_close)
        state.release_slot(claim)

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
                if held_by_generators:
                    end_dropped_borrows()  # a dropped generator's connection may be what we wait for
                now = time.monotonic()
                remaining = deadline - now
            if state.recheck_waiter(waiter, remaining <= 0, now):
                break  # a waiter that was served keeps what it got, whatever the clock says
            if remaining <= 0:
                claim.waiter = None  # out of the line (recheck_waiter removed it, counting the timeout)
                if self._core._events is not None:
                    self._core._emit("timed_out")
                raise PoolTimeout(self._core._timeout_message(wait, error)) from error
        state.collect(claim)

    def _note_borrow(self, info: ConnInfo) -> None:
        """Remember where a connection was borrowed, for leak reports."""
        info.stack = traceback.format_stack()[:-3]
