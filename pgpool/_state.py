"""The pool's state machine: what is idle, lent, being opened or closed, and who waits.

No I/O, no logging, no hooks here. Each method takes `self.lock`, decides, records what the caller now
owns in a `Claim` (or returns it), and releases the lock; the caller then does the slow work
(connect, close, queries) and reports back. State is only mutated under `self.lock`; the one
exception is `collected`, which a weakref callback appends to (one C call: nothing can split it).

Interrupt safety: a KeyboardInterrupt (or any asynchronous exception) can land at the entry of any
Python function. So a method here makes no Python call after its first mutation except to a helper
whose own entry leaves the state consistent (`_grant`, `_serve`), and whatever it hands over is
recorded in the caller's `Claim` by C-level stores in the same breath as the mutation.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Any

import psycopg2.extensions

from ._records import CLOSING, IDLE, LENT, RETURNING, Claim, ConnInfo, Waiter
from .errors import PoolClosed, PoolError

Connection = psycopg2.extensions.connection

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE

COUNTERS = (
    "checkouts",
    "requests_waited",
    "connections_opened",
    "connections_closed",
    "connect_errors",
    "timeouts",
    "broken_discarded",
    "leaked",
    "wait_ms_total",
    "usage_ms_total",
    "connect_ms_total",
)

# What `acquire` tells its caller when the claim got nothing.
WAIT = "wait"


class PoolState:
    """The bookkeeping of one pool. Every slot is counted exactly once, in one of:

    - `conns`: open connections (idle, lent, being returned), weakly keyed so that a lent connection
      that is garbage collected leaves by itself;
    - `opening`: slots reserved for connections being opened (by a borrower or a refill);
    - `closing`: connections dropped and not yet closed: their slot is freed only once they are.
    """

    def __init__(self, name: str, minconn: int, maxconn: float, idle_timeout: float) -> None:
        self.name = name
        self.minconn = minconn
        self.maxconn = maxconn
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        self.idle: deque[Connection] = deque()  # ready to lend, newest on the right
        self.return_times: dict[Connection, float] = {}  # idle connection -> when it became idle
        self.conns: dict[weakref.ref[Connection], ConnInfo] = {}
        self.collected: deque[weakref.ref[Connection]] = deque()  # keys whose connection was collected
        self.leaks: deque[ConnInfo] = deque()  # lent connections garbage collected, not yet reported
        self.opening = 0  # slots reserved for connects in flight, refills included
        self.refilling = 0  # of `opening`, those of background refills (never a borrower's)
        self.returning = 0  # of `conns`, those being cleaned up or checked (state RETURNING): back soon
        self.closing: set[Connection] = set()  # dropped, being closed; each still holds its slot
        self.waiters: deque[Waiter] = deque()  # threads queued in getconn, oldest on the left
        self.closed = False
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)

    # -- helpers called under the lock ---------------------------------------------------------

    def _purge(self) -> None:
        """Drop the entries of connections garbage collected while lent: their slots are free.

        The collector closed them (psycopg2 closes a connection it deallocates); `leaks` keeps their
        info for one WARNING each.
        """
        while self.collected:
            info = self.conns.pop(self.collected.pop(), None)
            if info is not None:
                if info.state is RETURNING:
                    self.returning -= 1
                self.counters["leaked"] += 1
                self.counters["connections_closed"] += 1
                self.leaks.append(info)

    def _free_slots(self) -> float:
        return self.maxconn - len(self.conns) - self.opening - len(self.closing)

    def _grant(self) -> None:
        """Give free slots to the oldest waiters, who then open their own connections."""
        while self.waiters and self._free_slots() > 0:
            waiter = self.waiters.popleft()
            self.opening += 1
            waiter.may_connect = True
            waiter.signal.release()  # last: once released, the waiter owns the slot

    def _serve(self, conn: Connection, info: ConnInfo, now: float) -> None:
        """Hand `conn` to the oldest waiter, taking it out of the line (the wake-up comes last)."""
        waiter = self.waiters.popleft()
        if info.state is RETURNING:
            self.returning -= 1  # every change of state away from RETURNING counts it down
        info.state = LENT
        info.lease += 1
        info.borrowed_at = now
        self.counters["checkouts"] += 1
        waiter.info = info
        waiter.conn = conn
        waiter.signal.release()  # last: an asynchronous exception after it loses nothing

    def _drop(self, conn: Connection, info: ConnInfo, reason: str, to_close: list[tuple[Connection, str]]) -> None:
        """Move a connection (idle or not) from `conns` to `closing`, for the caller to close.

        It takes an idle connection out of the idle list itself: a caller that did so first would
        lose the connection to an interrupt landing on this method's entry.
        """
        if info.state is IDLE:
            self.idle.remove(conn)
            self.return_times.pop(conn, None)
        self.conns.pop(weakref.ref(conn), None)
        if info.state is RETURNING:
            self.returning -= 1
        info.state = CLOSING
        self.closing.add(conn)
        to_close.append((conn, reason))

    def _evict_idle(self, now: float, to_close: list[tuple[Connection, str]]) -> None:
        """Drop idle connections older than idle_timeout (oldest first), never below minconn."""
        idle = self.idle
        while idle and len(self.conns) + self.opening > self.minconn:
            oldest = idle[0]
            if now - self.return_times.get(oldest, now) <= self.idle_timeout:
                break
            self._drop(oldest, self.conns[weakref.ref(oldest)], "idle_timeout reached", to_close)

    # -- lending -------------------------------------------------------------------------------

    def acquire(self, claim: Claim, now: float, can_wait: bool) -> str | None:
        """Fill `claim` with an idle connection or a slot to open one in; else queue or refuse.

        Returns None when the claim got something (or `claim.waiter` was served at once), `WAIT` when
        `claim.waiter` is queued, or the message of an exhausted pool. Unfit idle connections go to
        `claim.to_close`. Raises `PoolClosed` on a closed pool.
        """
        with self.lock:
            self._purge()
            if self.closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            idle = self.idle
            idle_timeout = self.idle_timeout
            while idle:
                conn = idle[-1]
                returned = self.return_times.get(conn, 0.0)
                info = self.conns[weakref.ref(conn)]
                if conn.closed:
                    reason = "closed while idle"
                elif conn.get_transaction_status() != _STATUS_IDLE:
                    reason = "not idle on the server"
                elif info.expires is not None and now >= info.expires:
                    reason = "max_lifetime reached"
                elif idle_timeout and now - returned > idle_timeout and len(self.conns) + self.opening > self.minconn:
                    reason = "idle_timeout reached"
                else:
                    del self.return_times[conn]
                    info.state = LENT
                    info.lease += 1
                    info.borrowed_at = now
                    self.counters["checkouts"] += 1
                    claim.info = info
                    claim.conn = conn  # the claim owns it from here
                    idle.pop()
                    return None
                self._drop(conn, info, reason, claim.to_close)
            if not self.waiters and self._free_slots() > 0:
                self.opening += 1
                claim.slot = True
                return None
            # Slots held by refills, closes or other borrowers' connects come back soon: wait for
            # them even without a timeout, rather than report exhaustion with fewer than maxconn lent.
            busy = len(self.conns) - len(idle) - self.returning + self.opening - self.refilling
            if not can_wait and busy >= self.maxconn:
                return (
                    f"connection pool exhausted: pool {self.name!r} has all maxconn={self.maxconn} connections "
                    f"in use ({len(self.conns)} lent, {self.opening} opening)"
                )
            waiter = Waiter()
            self.waiters.append(waiter)
            claim.waiter = waiter
            return WAIT

    def lend_top(self, top: Connection, info: ConnInfo, now: float) -> bool:
        """Fast path: lend `top`, the newest idle connection, which the caller probed without the
        lock, if it is still on top, fit, and nobody waits (False: take the slow path)."""
        with self.lock:
            idle = self.idle
            if (
                self.waiters
                or not idle
                or idle[-1] is not top
                or info.state is not IDLE
                or top.closed
                or top.get_transaction_status() != _STATUS_IDLE
                or (info.expires is not None and now >= info.expires)
                or (self.idle_timeout and now - self.return_times[top] > self.idle_timeout)
            ):
                return False
            # The idle list's reference goes last: after it, only the caller holds the connection
            # (and, should an exception cut in before it returns, the collector frees its slot).
            del self.return_times[top]
            info.state = LENT
            info.lease += 1
            info.borrowed_at = now
            self.counters["checkouts"] += 1
            idle.pop()
            return True

    def return_clean(self, conn: Connection, now: float, lease: int | None) -> bool:
        """Fast path: take back a lent connection that needs no cleanup, when nobody waits and
        nothing else is due (False, with nothing changed: take the slow path)."""
        with self.lock:
            info = self.conns.get(weakref.ref(conn))
            if (
                info is None
                or info.state is not LENT
                or (lease is not None and info.lease != lease)
                or self.waiters
                or self.closed
                or not self.idle_timeout
                or (info.expires is not None and now >= info.expires)
                or info.needs_cleanup(conn)
            ):
                return False
            idle = self.idle
            if idle and now - self.return_times[idle[0]] > self.idle_timeout:
                return False  # idle connections to evict: the slow path does it
            self.counters["usage_ms_total"] += (now - info.borrowed_at) * 1000
            info.state = IDLE
            self.return_times[conn] = now
            idle.append(conn)
            return True

    def recheck_waiter(self, waiter: Waiter, give_up: bool, now: float) -> bool:
        """After a sleep without a wake-up: grant slots freed by collected leaks; maybe leave the line.

        Returns True when the waiter has been served (whatever `give_up` says: it keeps what it got).
        """
        with self.lock:
            self._purge()
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

    def collect(self, claim: Claim, now: float) -> None:
        """Move what the claim's waiter was served into the claim (raises the error it was served)."""
        waiter = claim.waiter
        assert waiter is not None
        with self.lock:
            self.counters["requests_waited"] += 1
            self.counters["wait_ms_total"] += (now - waiter.since) * 1000
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

    def adopt(self, claim: Claim, now: float, lend: bool) -> bool:
        """Count the connection opened in the claim's slot: lent to the claimer, or (a refill) given.

        Returns False when the pool was closed meanwhile: the connection is then in `claim.to_close`.
        """
        with self.lock:
            conn, info = claim.new_conn, claim.new_info
            assert conn is not None and info is not None
            self.opening -= 1
            if claim.refill:
                self.refilling -= 1
                claim.refill = False
            self.counters["connections_opened"] += 1
            self.counters["connect_ms_total"] += claim.connect_seconds * 1000
            if self.closed:
                self.closing.add(conn)
                info.state = CLOSING
                claim.to_close.append((conn, "pool closed while connecting"))
                claim.slot = False
                claim.new_conn = claim.new_info = None
                return False
            self.conns[weakref.ref(conn, self.collected.append)] = info
            if lend:
                info.state = LENT
                info.lease += 1
                info.borrowed_at = now
                self.counters["checkouts"] += 1
                claim.info = info
                claim.conn = conn
            elif self.waiters:
                info.state = LENT  # held by the claim until served (dropped if an interrupt lands first)
                claim.info = info
                claim.conn = conn
            else:
                info.state = IDLE
                self.return_times[conn] = now
                idle = self.idle
                idle.appendleft(conn)  # a refill: the least recently used end
            claim.slot = False
            claim.new_conn = claim.new_info = None
            if not lend and claim.conn is not None:
                self._serve(claim.conn, info, now)
                claim.conn = claim.info = None
            return True

    def reserve_refill(self, claim: Claim) -> bool:
        """Reserve one slot to reopen a connection towards minconn (refills go one at a time)."""
        with self.lock:
            self._purge()
            if self.closed or self.refilling or len(self.conns) + self.opening >= self.minconn:
                return False
            if self._free_slots() <= 0:
                return False
            self.opening += 1
            self.refilling += 1
            claim.refill = True
            claim.slot = True
            return True

    def release_slot(self, claim: Claim) -> None:
        """Give back the claim's reserved slot (nothing was opened in it, or what was is closed)."""
        with self.lock:
            if claim.slot:
                self.opening -= 1
                if claim.refill:
                    self.refilling -= 1
                claim.refill = False
                claim.slot = False
                self._grant()

    def drop_claimed(self, claim: Claim, reason: str, broken: bool = False) -> None:
        """Move the claim's connections (taken, or just opened) to its `to_close`, keeping their slots."""
        with self.lock:
            if claim.conn is not None and claim.info is not None:
                conn, info = claim.conn, claim.info
                if info.state is LENT:
                    if broken:
                        self.counters["broken_discarded"] += 1
                    self._drop(conn, info, reason, claim.to_close)
                claim.conn = claim.info = None
            if claim.new_conn is not None:
                # Its slot moves from `opening` to `closing`, so that it is freed once it is closed.
                self.opening -= 1
                if claim.refill:
                    self.refilling -= 1
                if claim.new_info is not None:
                    claim.new_info.state = CLOSING
                self.closing.add(claim.new_conn)
                claim.to_close.append((claim.new_conn, reason))
                claim.new_conn = claim.new_info = None
                claim.refill = False
                claim.slot = False

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

    def closed_one(self, conn: Connection, keep_slot_for: Claim | None = None) -> None:
        """A dropped connection is closed: free its slot (or hand it to `keep_slot_for`). Idempotent."""
        with self.lock:
            if conn not in self.closing:
                return
            self.closing.discard(conn)
            self.counters["connections_closed"] += 1
            if keep_slot_for is not None and not self.closed:
                self.opening += 1
                keep_slot_for.slot = True
                return
            self._grant()

    # -- returning -----------------------------------------------------------------------------

    def begin_return(
        self, conn: Connection, clean: bool, now: float, to_close: list[tuple[Connection, str]]
    ) -> ConnInfo | None:
        """Take back a lent connection (state RETURNING) and return its info for the caller to clean up;
        or, when `clean` and it needs no cleanup, settle it at once and return None. Refuses with
        PoolError a connection that is not lent, changing nothing."""
        with self.lock:
            info = self.conns.get(weakref.ref(conn))
            if info is None or info.state is not LENT:
                raise PoolError(self._refusal(info))
            self.counters["usage_ms_total"] += (now - info.borrowed_at) * 1000
            if clean and not info.needs_cleanup(conn):
                self._settle(conn, info, None, now, to_close)  # an interrupt on its entry: still LENT
                return None
            info.state = RETURNING  # still counted, and a second putconn is refused
            self.returning += 1
            return info

    def _refusal(self, info: ConnInfo | None) -> str:
        if info is None:
            return f"connection not lent by pool {self.name!r}: putconn refused a foreign connection"
        return f"connection already returned to pool {self.name!r}: putconn called twice"

    def finish_return(
        self, conn: Connection, info: ConnInfo, reason: str | None, now: float, to_close: list[tuple[Connection, str]]
    ) -> None:
        """Keep or drop a connection in RETURNING state (dropped ones go to `to_close`). Idempotent."""
        with self.lock:
            if info.state is RETURNING:
                self._settle(conn, info, reason, now, to_close)

    def _settle(
        self, conn: Connection, info: ConnInfo, reason: str | None, now: float, to_close: list[tuple[Connection, str]]
    ) -> None:
        if reason is None:
            if self.closed:
                reason = "pool closed"
            elif self.idle_timeout == 0 and not self.waiters and len(self.idle) >= self.minconn:
                reason = "idle_timeout is 0 and minconn are idle"
            elif info.expires is not None and now >= info.expires:
                reason = "max_lifetime reached"
        if reason is not None:
            if reason.startswith(("broken", "returned closed", "cleanup failed", "reset")):
                self.counters["broken_discarded"] += 1
            self._drop(conn, info, reason, to_close)
        elif self.waiters:
            self._serve(conn, info, now)
        else:
            if info.state is RETURNING:
                self.returning -= 1
            info.state = IDLE
            self.return_times[conn] = now
            self.idle.append(conn)
        if self.idle_timeout and self.idle:
            self._evict_idle(now, to_close)

    # -- whole pool ----------------------------------------------------------------------------

    def take_idle(self, to_close: list[tuple[Connection, str]], reason: str) -> None:
        """Drop every idle connection (clear)."""
        with self.lock:
            while self.idle:
                conn = self.idle[0]
                self._drop(conn, self.conns[weakref.ref(conn)], reason, to_close)

    def close(self, to_close: list[tuple[Connection, str]]) -> bool:
        """Mark the pool closed, drop the idle connections, fail the waiters; False if it already was.

        Idempotent: called again after an interrupt, it drops what an earlier call left idle."""
        with self.lock:
            first = not self.closed
            self.closed = True
            while self.idle:
                conn = self.idle[0]
                self._drop(conn, self.conns[weakref.ref(conn)], "pool closed", to_close)
            while self.waiters:
                waiter = self.waiters.popleft()
                waiter.error = PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
                waiter.signal.release()
            return first

    def housekeeping_drops(self, now: float, max_lifetime: bool, to_close: list[tuple[Connection, str]]) -> None:
        """Evict idle connections past idle_timeout or max_lifetime; grant slots freed by leaks."""
        with self.lock:
            self._purge()
            if self.idle_timeout:
                self._evict_idle(now, to_close)
            if max_lifetime:
                for conn in list(self.idle):
                    info = self.conns[weakref.ref(conn)]
                    if info.expires is not None and now >= info.expires:
                        self._drop(conn, info, "max_lifetime reached", to_close)
            self._grant()

    def take_signalled(self, conns: list[Connection]) -> list[tuple[Connection, ConnInfo]]:
        """Take these idle connections out of the idle list for a check (state RETURNING)."""
        taken = []
        with self.lock:
            for conn in conns:
                if conn in self.return_times:  # still idle: not taken, evicted or cleared meanwhile
                    info = self.conns[weakref.ref(conn)]
                    self.idle.remove(conn)
                    del self.return_times[conn]
                    info.state = RETURNING
                    self.returning += 1
                    info.lease += 1
                    taken.append((conn, info))
        return taken

    def take_leaks(self) -> list[ConnInfo]:
        """The infos of lent connections garbage collected since the last call (each reported once)."""
        with self.lock:
            self._purge()
            leaks = list(self.leaks)
            self.leaks.clear()
            return leaks

    def idle_snapshot(self) -> list[Connection]:
        with self.lock:
            return list(self.idle)

    def lent_infos(self) -> list[ConnInfo]:
        with self.lock:
            self._purge()
            return [info for info in self.conns.values() if info.state is LENT]

    def info_of(self, conn: Connection) -> ConnInfo | None:
        with self.lock:
            return self.conns.get(weakref.ref(conn))

    def lent_connections(self) -> list[Connection]:
        with self.lock:
            self._purge()
            refs = [ref for ref, info in self.conns.items() if info.state is LENT]
        return [conn for conn in (ref() for ref in refs) if conn is not None]

    def counts(self) -> dict[str, Any]:
        with self.lock:
            self._purge()
            idle = len(self.idle)
            return {
                "idle": idle,
                "in_use": len(self.conns) - idle,
                "opening": self.opening,
                "closing": len(self.closing),
                "waiting": len(self.waiters),
                **{key: int(value) for key, value in self.counters.items()},
            }

    def count(self, counter: str, amount: int = 1) -> None:
        with self.lock:
            self.counters[counter] += amount

    def reset_after_fork(self) -> list[Connection]:
        """In a forked child: start from zero; return the inherited connections (to disown, not close)."""
        inherited = [conn for conn in (ref() for ref in list(self.conns)) if conn is not None]
        inherited.extend(self.closing)
        self.lock = threading.Lock()
        self.idle.clear()
        self.return_times.clear()
        self.conns.clear()
        self.collected.clear()
        self.opening = self.refilling = self.returning = 0
        self.closing = set()
        self.waiters.clear()
        self.leaks.clear()
        self.counters = dict.fromkeys(COUNTERS, 0.0)  # the child's own story starts here
        return inherited
