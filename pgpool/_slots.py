"""The bookkeeping of a pool's state machine (see `pgpool._state`): its fields, the helpers that
its steps share under the lock, the line of waiting threads, and the operations on the whole pool
(clear, close, housekeeping, snapshots). No I/O; every change under `lock`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import psycopg2
import psycopg2.extensions

from ._records import CLOSING, IDLE, LENT, RETURNING, BorrowTimes, Claim, ConnInfo, ConnRef, Waiter
from .errors import PoolClosed

Connection = psycopg2.extensions.connection
Item = tuple[Connection, ConnInfo]  # an entry of the idle list
ToClose = list[tuple[Connection, str]]


COUNTERS = (
    "requests_waited",
    "connections_opened",
    "connections_closed",
    "connect_errors",
    "timeouts",
    "broken_discarded",
    "leaked",
    "wait_ms_total",
    "connect_ms_total",
    "evictions",
)


class Slots:
    """The bookkeeping of one pool (the steps that change it are `PoolState`'s). Every slot is
    counted exactly once, in one of:

    - `conns`: open connections (idle, lent, being returned), keyed by ``id``, each holding a weak
      reference to its connection, so that a lent connection garbage collected leaves by itself;
    - `opening`: slots reserved for connections being opened (by a borrower or a refill);
    - `closing`: connections dropped and not yet closed: their slot is freed only once they are.
    """

    def __init__(self, name: str, minconn: int, maxconn: float, idle_timeout: float) -> None:
        self.name = name
        self.minconn = minconn
        self.maxconn = maxconn
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        self.idle: deque[Item] = deque()  # ready to lend, newest on the right (the only strong refs)
        self.lent: dict[int, ConnInfo] = {}  # id(conn) -> info of the connections lent
        self.conns: dict[int, ConnInfo] = {}  # id(conn) -> info of every open connection
        self.collected: deque[ConnRef] = deque()  # weakref callback: connections garbage collected
        self.leaks: deque[ConnInfo] = deque()  # lent connections garbage collected, not yet reported
        self.opening = 0  # slots reserved for connects in flight, refills included
        self.refilling = 0  # of `opening`, those of background refills (never a borrower's)
        self.returning = 0  # of `conns`, those being cleaned up or checked (state RETURNING): back soon
        # Dropped, being closed; each still holds its slot. A dict (its values unused), so that adding
        # is a subscript store, which no asynchronous exception can split from what precedes it.
        self.closing: dict[Connection, None] = {}
        self.waiters: deque[Waiter] = deque()  # threads queued in getconn, oldest on the left
        self.closed = False
        self.keeps_returns = idle_timeout > 0  # a clean return may stay idle: not closed, idle_timeout
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.evict_at = math.inf  # no idle connection outlives idle_timeout before then (_evict_idle)
        # Bumped when the server stopped being what the pool wants (failover) or by drain(): older
        # connections are closed, idle ones at once, lent ones when they come back.
        self.generation = 0
        self.checks_server = False  # target_session_attrs asks for a kind of server (pgpool._failover)
        self.times: BorrowTimes | None = None  # set while a metrics listener wants borrow timings
        self.retired_lends = 0  # lends and use time of connections no longer counted in `conns`
        self.retired_used = 0.0

    def info_of(self, conn: Connection) -> ConnInfo | None:
        """The info of `conn` if it is one of this pool's open connections (one atomic dict read)."""
        info = self.conns.get(id(conn))
        if info is None or info.ref() is not conn:
            return None  # not ours (or an id reused after one of ours was garbage collected)
        return info

    def _purge(self) -> None:
        """Forget connections garbage collected while lent (the collector closed them): their slots
        are free. `leaks` keeps their info for one WARNING each."""
        # The entry leaves `collected` only after its connection's entries are gone: `return_fast`
        # trusts an entry of the lent table to be the very connection it is given while `collected`
        # is empty. Callbacks append on the right, so this end is read, then popped (popleft).
        while self.collected:
            ref = self.collected[0]
            info = self.conns.get(ref.key)
            if info is not None and info.ref is ref:
                del self.conns[ref.key]
                if self.lent.get(ref.key) is info:
                    del self.lent[ref.key]
                if info.state is RETURNING:
                    self.returning -= 1
                self.retired_lends += info.lends
                self.retired_used += info.used
                self.counters["connections_closed"] += 1
                if info.state is IDLE:
                    # Taken off the idle list by a fast lender that an asynchronous exception hit
                    # right after the pop: not a borrower's leak.
                    self.counters["broken_discarded"] += 1
                else:
                    self.counters["leaked"] += 1
                    self.leaks.append(info)
            self.collected.popleft()

    def _free_slots(self) -> float:
        return self.maxconn - len(self.conns) - self.opening - len(self.closing)

    def _grant(self) -> None:
        """Give free slots to the oldest waiters, who then open their own connections."""
        while self.waiters and self._free_slots() > 0:
            # The clock first: an asynchronous exception can land after any C call, and after the
            # popleft the only one left is the wake-up (a waiter taken out of line and not served
            # puts itself back when it wakes up; a slot reserved for nobody would be lost).
            now = time.monotonic()
            waiter = self.waiters.popleft()
            self.opening += 1
            self.counters["requests_waited"] += 1
            self.counters["wait_ms_total"] += (now - waiter.since) * 1000
            waiter.may_connect = True
            waiter.signal.release()  # last: once released, the waiter owns the slot

    def _serve(self, conn: Connection, info: ConnInfo, item: Item | None = None, used: float = 0.0) -> None:
        """Hand `conn` to the oldest waiter, taking it out of the line (the wake-up comes last).

        With `item`, the connection is taken from the idle list first, unless a fast lender took it.
        `used`: the seconds of the borrow it comes back from, when that is not counted yet.
        """
        # C calls before the line changes (see _grant). The clock is read here, not taken from the
        # caller: a returner's clock predates its rollback, and a waiter may have queued meanwhile.
        now = time.monotonic()
        key = id(conn)
        if item is not None:
            try:
                self.idle.remove(item)
            except ValueError:
                return
            except BaseException:
                self.idle.append(item)  # removed, then interrupted: idle again, nobody served
                raise
        try:
            waiter = self.waiters.popleft()
        except BaseException:
            # Out of line unserved (it puts itself back when it wakes up); the connection stays idle.
            if item is not None:
                self.idle.append(item)
            raise
        self.counters["requests_waited"] += 1
        self.counters["wait_ms_total"] += (now - waiter.since) * 1000
        info.used += used
        if info.state is RETURNING:
            self.returning -= 1  # every change of state away from RETURNING counts it down
        info.state = LENT
        info.lease += 1
        info.lends += 1
        info.borrowed_at = now
        self.lent[key] = info
        waiter.info = info
        waiter.conn = conn
        waiter.signal.release()  # last: an asynchronous exception after it loses nothing

    def _drain(self) -> None:
        """Hand idle connections to waiters (a fast return and a waiter crossed: see the module)."""
        while self.waiters:
            try:
                item = self.idle[-1]
            except IndexError:
                return
            self._serve(item[0], item[1], item)

    def _drop(self, conn: Connection, info: ConnInfo, reason: str, to_close: ToClose, item: Item | None = None) -> None:
        """Move a connection from `conns` to `closing`, for the caller to close.

        With `item`, an idle connection: taken from the idle list here, first (a caller that did so
        itself would lose it to an interrupt landing on this method's entry), unless a fast lender
        took it meanwhile, which then keeps it.
        """
        key = id(conn)  # C calls before the first change (see the module docstring of pgpool._state)
        if item is not None:
            try:
                self.idle.remove(item)
            except ValueError:
                return
            except BaseException:
                self._drop(conn, info, reason, to_close)  # removed, then interrupted: finish the drop
                raise
        # From here on, subscripts, attributes and operators only: no point where CPython delivers
        # an asynchronous exception, so the connection moves from `conns` to `closing` whole.
        if key in self.conns and self.conns[key] is info:
            del self.conns[key]
        if key in self.lent and self.lent[key] is info:
            del self.lent[key]
        if info.state is RETURNING:
            self.returning -= 1
        info.state = CLOSING
        self.retired_lends += info.lends
        self.retired_used += info.used
        self.closing[conn] = None
        to_close += ((conn, reason),)

    def _evict_idle(self, now: float, to_close: ToClose) -> None:
        """Drop idle connections older than idle_timeout (oldest first), never below minconn."""
        idle = self.idle
        # Until a connection newer than the oldest idle one outlives idle_timeout, fast returns need
        # not call again (connections joining the idle list later are newer still).
        self.evict_at = now + self.idle_timeout
        while idle and len(self.conns) + self.opening > self.minconn:
            try:
                item = idle[0]
            except IndexError:
                return
            if now - item[1].returned_at <= self.idle_timeout:
                self.evict_at = item[1].returned_at + self.idle_timeout
                return
            self._drop(item[0], item[1], "idle_timeout reached", to_close, item)

    def recheck_waiter(self, waiter: Waiter, give_up: bool, now: float) -> bool:
        """After a sleep without a wake-up: grant slots freed by collected leaks; maybe leave the line.

        Returns True when the waiter has been served (whatever `give_up` says: it keeps what it got).
        """
        with self.lock:
            self._purge()
            self._drain()
            self._grant()
            if waiter.conn is not None or waiter.may_connect or waiter.error is not None:
                return True
            if waiter not in self.waiters:
                self.waiters.appendleft(waiter)  # taken out of line by a serve an exception cut short
            if give_up:
                self.waiters.remove(waiter)
                self.counters["timeouts"] += 1
                self.counters["wait_ms_total"] += (now - waiter.since) * 1000
            return False

    def collect(self, claim: Claim) -> None:
        """Move what the claim's waiter was served into the claim (raises the error it was served)."""
        waiter = claim.waiter
        assert waiter is not None
        # No lock: whoever served the waiter took it out of the line, wrote its outcome, then woke
        # it (the lock release orders the writes before this read); nobody else touches it since.
        if waiter.conn is not None:
            claim.info = waiter.info
            claim.conn = waiter.conn
        elif waiter.may_connect:
            claim.slot = True
        waiter.conn = None
        waiter.may_connect = False
        claim.waiter = None
        if waiter.error is not None:
            raise waiter.error

    def leave_line(self, claim: Claim) -> None:
        """A waiter gives up (interrupted, failed): out of the line; what it was served goes to the claim."""
        waiter = claim.waiter
        if waiter is None:
            return
        with self.lock:
            if waiter.conn is not None:
                claim.info = waiter.info
                claim.conn = waiter.conn
            elif waiter.may_connect:
                claim.slot = True
            elif waiter.error is None and waiter in self.waiters:
                self.waiters.remove(waiter)
            waiter.conn = None
            waiter.may_connect = False
            claim.waiter = None

    def _drop_all_idle(self, reason: str, to_close: ToClose) -> None:
        while self.idle:
            try:
                item = self.idle[0]
            except IndexError:
                return
            self._drop(item[0], item[1], reason, to_close, item)

    def take_idle(self, to_close: ToClose, reason: str) -> None:
        """Drop every idle connection (clear)."""
        with self.lock:
            self._drop_all_idle(reason, to_close)

    def close(self, to_close: ToClose) -> bool:
        """Mark the pool closed, drop the idle connections, fail the waiters; False if it already was.

        Idempotent: called again after an interrupt, it drops what an earlier call left idle."""
        with self.lock:
            first = not self.closed
            self.closed = True
            self.keeps_returns = False
            self._drop_all_idle("pool closed", to_close)
            while self.waiters:
                waiter = self.waiters.popleft()
                waiter.error = PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
                waiter.signal.release()
            return first

    def housekeeping_drops(self, now: float, max_lifetime: bool, to_close: ToClose) -> None:
        """Evict idle connections past idle_timeout or max_lifetime; serve and grant waiters."""
        with self.lock:
            self._purge()
            self._drain()
            if self.idle_timeout:
                self._evict_idle(now, to_close)
            if max_lifetime:
                for item in list(self.idle):
                    if now >= item[1].expires:
                        self._drop(item[0], item[1], "max_lifetime reached", to_close, item)
            self._grant()

    def take_signalled(self, conns: list[Connection]) -> list[tuple[Connection, ConnInfo]]:
        """Take these idle connections out of the idle list for a check (state RETURNING)."""
        taken = []
        with self.lock:
            for item in list(self.idle):
                if item[0] in conns:
                    try:
                        self.idle.remove(item)
                    except ValueError:
                        continue  # lent meanwhile: its borrower's probe looks at it
                    info = item[1]
                    info.state = RETURNING
                    self.returning += 1
                    info.lease += 1
                    taken.append(item)
        return taken

    def take_leaks(self) -> list[ConnInfo]:
        """The infos of lent connections garbage collected since the last call (each reported once)."""
        with self.lock:
            self._purge()
            leaks = list(self.leaks)
            self.leaks.clear()
            return leaks

    def idle_snapshot(self) -> list[Connection]:
        return [conn for conn, _ in self.idle.copy()]  # deque.copy: atomic

    def lent_infos(self) -> list[ConnInfo]:
        with self.lock:
            self._purge()
            return list(self.lent.copy().values())  # dict.copy: atomic

    def lent_connections(self) -> list[Connection]:
        refs = [info.ref for info in self.lent.copy().values()]
        return [conn for conn in (ref() for ref in refs) if conn is not None]

    def counts(self) -> dict[str, Any]:
        with self.lock:
            self._purge()
            idle = len(self.idle)
            infos = list(self.conns.values())
            return {
                "idle": idle,
                "in_use": len(self.conns) - idle,
                "opening": self.opening,
                "closing": len(self.closing),
                "waiting": len(self.waiters),
                "checkouts": self.retired_lends + sum(info.lends for info in infos),
                "usage_ms_total": int((self.retired_used + sum(info.used for info in infos)) * 1000),
                **{key: int(value) for key, value in self.counters.items()},
            }

    def count(self, counter: str, amount: int = 1) -> None:
        with self.lock:
            self.counters[counter] += amount

    def reset_after_fork(self) -> list[Connection]:
        """In a forked child: start from zero; return the inherited connections (to disown, not close)."""
        inherited = [conn for conn in (info.ref() for info in self.conns.values()) if conn is not None]
        inherited.extend(self.closing)  # the keys
        self.lock = threading.Lock()
        self.idle.clear()
        self.conns.clear()
        self.lent.clear()
        self.collected.clear()
        self.opening = self.refilling = self.returning = 0
        self.closing = {}
        self.waiters.clear()
        self.leaks.clear()
        self.counters = dict.fromkeys(COUNTERS, 0.0)  # the child's own story starts here
        self.retired_lends = 0
        self.retired_used = 0.0
        return inherited
