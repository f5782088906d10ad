"""The pool's state machine: what is idle, lent, being opened or closed, and who waits. No I/O.

Two kinds of steps change it:

- **Fast steps** (`lend_fast`, `return_fast`) take no lock. They move a connection between the idle
  list and the lent table with single operations that are atomic in CPython, with or without the GIL
  (``deque.pop``/``deque.append``, ``dict.pop``/``dict[key] = value``: each holds the object's own
  lock on free-threaded builds), and write only the `ConnInfo` of the connection they now own.
- **Slow steps** (everything else) run under `lock`: opening, waiting, handing over, discarding.
  A slow step that takes an idle connection removes *that* entry (``deque.remove``) and, should a
  fast lender have taken it meanwhile (ValueError), leaves it to them.

Whoever removed a connection from the idle list or the lent table owns it until it puts it in the
other. The one hand-over rule between the two kinds: a fast returner appends to the idle list *then*
looks at the waiters; a waiter joins the line *then* looks at the idle list. One of them always sees
the other (each operation is sequentially consistent), and the one who does hands the connection over
under the lock (`_drain`), so that no waiter sleeps while a connection is idle.

Interrupt safety: an asynchronous exception (KeyboardInterrupt) can land at the entry of any Python
function. A method here makes no Python call after its first mutation, except to a helper whose
entry leaves the state consistent (`_grant`, `_serve`, `_drop`), and records what it hands over in
the caller's `Claim` in the same breath as the mutation.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import psycopg2
import psycopg2.extensions

from ._libpq import PQclientEncoding, client_encoding
from ._records import CLOSING, IDLE, LENT, PROBE_INTERVAL, RETURNING, Claim, ConnInfo, ConnRef, Waiter
from .errors import PoolClosed, PoolError

Connection = psycopg2.extensions.connection
Item = tuple[Connection, ConnInfo]  # an entry of the idle list
ToClose = list[tuple[Connection, str]]

_STATUS_READY = psycopg2.extensions.STATUS_READY
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_INTRANS = psycopg2.extensions.TRANSACTION_STATUS_INTRANS
_STATUS_INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR


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
)

WAIT = "wait"  # what `acquire` tells its caller when the claim got nothing: it is in line
DONE = "done"  # what `return_fast` says when nothing more is due
TIDY = "tidy"  # ... when the connection is back but `tidy` must run (waiters, evictions, closed pool)


class PoolState:
    """The bookkeeping of one pool. Every slot is counted exactly once, in one of:

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
        self.closing: set[Connection] = set()  # dropped, being closed; each still holds its slot
        self.waiters: deque[Waiter] = deque()  # threads queued in getconn, oldest on the left
        self.closed = False
        self.keeps_returns = idle_timeout > 0  # a clean return may stay idle: not closed, idle_timeout
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.evict_at = math.inf  # no idle connection outlives idle_timeout before then (_evict_idle)
        self.retired_lends = 0  # lends and use time of connections no longer counted in `conns`
        self.retired_used = 0.0

    def info_of(self, conn: Connection) -> ConnInfo | None:
        """The info of `conn` if it is one of this pool's open connections (one atomic dict read)."""
        info = self.conns.get(id(conn))
        if info is None or info.ref is None or info.ref() is not conn:
            return None  # not ours (or an id reused after one of ours was garbage collected)
        return info

    # -- the fast steps: no lock -----------------------------------------------------------------

    def lend_fast(self, now: float) -> Item | None:
        """Lend the newest idle connection if it needs nothing the slow path does (None: take it)."""
        if self.collected or self.leaks:
            return None  # connections garbage collected: the slow path accounts for and reports them
        idle = self.idle
        try:
            item = idle.pop()  # atomic: the connection is this thread's alone from here
        except IndexError:
            return None
        conn, info = item
        probe_due = now - info.probed_at >= PROBE_INTERVAL
        if (
            self.waiters  # threads in line came first: the slow path serves them in order
            or conn.closed
            or conn.status != _STATUS_READY
            or now >= info.expires
            or (self.idle_timeout and now - info.returned_at > self.idle_timeout)
            or (probe_due and info.probe.poll(0))  # the server sent something: look closer
        ):
            idle.append(item)  # atomic; the slow path looks at it again, under the lock
            return None
        if probe_due:
            info.probed_at = now
        info.state = LENT
        info.lease += 1
        info.lends += 1
        info.borrowed_at = now
        self.lent[id(conn)] = info  # atomic: putconn can now take it back
        return item

    def return_fast(self, conn: Connection, key: int, info: ConnInfo, now: float) -> str | None:
        """Take back a lent connection, `info` being what the lent table holds under its `key` (its
        id), if at most a rollback is needed and it is not due to close (None: nothing changed, take
        the slow path; TIDY: back, and `tidy` must run; DONE: back, nothing due).

        The rollback, when a transaction is open, is the one I/O here: made outside any lock by the
        returning thread, which owns the connection once it took it off the lent table.
        """
        status = conn.get_transaction_status()
        if (
            info.ref() is not conn  # (set before it entered the lent table) an id reused: not ours
            or not self.keeps_returns
            or now >= info.expires
            # Anything else the next borrower would inherit: the slow path cleans it up. Attribute
            # reads and C calls, inline (this is the hottest line of the pool).
            or (status != _STATUS_IDLE and status != _STATUS_INTRANS and status != _STATUS_INERROR)
            or info.sticky
            or conn.autocommit != info.autocommit
            or conn.isolation_level != info.isolation_level
            or conn.readonly != info.readonly
            or conn.deferrable != info.deferrable
            or conn.cursor_factory is not info.cursor_factory
            or conn.notices  # a list, or a deque a configure hook put there
            or conn.notifies
        ):
            return None
        if self.lent.pop(key, None) is not info:  # atomic: of two putconn at once, one gets here
            return None  # the other: the slow path refuses it
        if status != _STATUS_IDLE or conn.status != _STATUS_READY:
            try:
                conn.rollback()
            except psycopg2.Error:
                self.lent[key] = info  # atomic: lent again, for the slow path to discard or clean
                return None
            except BaseException:
                self.lent[key] = info  # (an interrupt) the caller's retry finishes the return
                raise
            info.probed_at = now  # the round trip just made says as much as a probe would
            if conn.notices:  # the rollback said something (a warning): the slow path clears it
                self.lent[key] = info
                return None
        # The encoding, changed by set_client_encoding or in SQL ("SET client_encoding", which
        # psycopg2 does not see, and which the rollback may have undone): libpq follows both.
        if (PQclientEncoding(conn.pgconn_ptr) if PQclientEncoding else client_encoding(conn)) != info.encoding_id:
            self.lent[key] = info
            return None
        info.used += now - info.borrowed_at
        info.state = IDLE
        info.returned_at = now
        idle = self.idle
        idle.append((conn, info))  # atomic; a lender may take it from here
        if self.waiters or not self.keeps_returns:  # read after the append: see the hand-over rule
            return TIDY
        if now > self.evict_at:
            return TIDY  # an idle connection may have outlived idle_timeout
        return DONE

    # -- helpers called under the lock ---------------------------------------------------------

    def _purge(self) -> None:
        """Forget connections garbage collected while lent (the collector closed them): their slots
        are free. `leaks` keeps their info for one WARNING each."""
        while self.collected:
            ref = self.collected.pop()
            info = self.conns.get(ref.key)
            if info is None or info.ref is not ref:
                continue
            del self.conns[ref.key]
            if self.lent.get(ref.key) is info:
                del self.lent[ref.key]
            if info.state is RETURNING:
                self.returning -= 1
            self.retired_lends += info.lends
            self.retired_used += info.used
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
            self.counters["requests_waited"] += 1
            self.counters["wait_ms_total"] += (time.monotonic() - waiter.since) * 1000
            waiter.may_connect = True
            waiter.signal.release()  # last: once released, the waiter owns the slot

    def _serve(self, conn: Connection, info: ConnInfo, now: float, item: Item | None = None) -> None:
        """Hand `conn` to the oldest waiter, taking it out of the line (the wake-up comes last).

        With `item`, the connection is taken from the idle list first, unless a fast lender took it.
        """
        if item is not None:
            try:
                self.idle.remove(item)
            except ValueError:
                return
        waiter = self.waiters.popleft()
        self.counters["requests_waited"] += 1
        self.counters["wait_ms_total"] += (time.monotonic() - waiter.since) * 1000
        if info.state is RETURNING:
            self.returning -= 1  # every change of state away from RETURNING counts it down
        info.state = LENT
        info.lease += 1
        info.lends += 1
        info.borrowed_at = now
        self.lent[id(conn)] = info
        waiter.info = info
        waiter.conn = conn
        waiter.signal.release()  # last: an asynchronous exception after it loses nothing

    def _drain(self, now: float) -> None:
        """Hand idle connections to waiters (a fast return and a waiter crossed: see the module)."""
        while self.waiters:
            try:
                item = self.idle[-1]
            except IndexError:
                return
            self._serve(item[0], item[1], now, item)

    def _drop(self, conn: Connection, info: ConnInfo, reason: str, to_close: ToClose, item: Item | None = None) -> None:
        """Move a connection from `conns` to `closing`, for the caller to close.

        With `item`, an idle connection: taken from the idle list here, first (a caller that did so
        itself would lose it to an interrupt landing on this method's entry), unless a fast lender
        took it meanwhile, which then keeps it.
        """
        if item is not None:
            try:
                self.idle.remove(item)
            except ValueError:
                return
        key = id(conn)
        if self.conns.get(key) is info:
            del self.conns[key]
        if self.lent.get(key) is info:
            del self.lent[key]
        if info.state is RETURNING:
            self.returning -= 1
        info.state = CLOSING
        self.retired_lends += info.lends
        self.retired_used += info.used
        self.closing.add(conn)
        to_close.append((conn, reason))

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

    # -- lending -------------------------------------------------------------------------------

    def acquire(self, claim: Claim, now: float, can_wait: bool) -> str | None:
        """Fill `claim` with an idle connection or a slot to open one in; else queue or refuse.

        Returns None when the claim got something, `WAIT` when `claim.waiter` is queued (and maybe
        served at once), or the message of an exhausted pool. Unfit idle connections go to
        `claim.to_close`. Raises `PoolClosed` on a closed pool.
        """
        with self.lock:
            self._purge()
            if self.closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            self._drain(now)
            idle = self.idle
            while idle and not self.waiters:
                try:
                    item = idle[-1]
                except IndexError:
                    break
                conn, info = item
                if conn.closed:
                    reason = "closed while idle"
                elif conn.get_transaction_status() != _STATUS_IDLE:
                    reason = "not idle on the server"
                elif now >= info.expires:
                    reason = "max_lifetime reached"
                elif (
                    self.idle_timeout
                    and now - info.returned_at > self.idle_timeout
                    and len(self.conns) + self.opening > self.minconn
                ):
                    reason = "idle_timeout reached"
                else:
                    try:
                        idle.remove(item)
                    except ValueError:
                        continue  # a fast lender took it
                    info.state = LENT
                    info.lease += 1
                    info.lends += 1
                    info.borrowed_at = now
                    self.lent[id(conn)] = info
                    claim.info = info
                    claim.conn = conn  # the claim owns it from here
                    return None
                self._drop(conn, info, reason, claim.to_close, item)
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
                    f"in use ({len(self.lent)} lent, {self.opening} opening)"
                )
            waiter = Waiter()
            self.waiters.append(waiter)
            claim.waiter = waiter
            self._drain(now)  # read after the append: see the module's hand-over rule
            return WAIT

    def recheck_waiter(self, waiter: Waiter, give_up: bool, now: float) -> bool:
        """After a sleep without a wake-up: grant slots freed by collected leaks; maybe leave the line.

        Returns True when the waiter has been served (whatever `give_up` says: it keeps what it got).
        """
        with self.lock:
            self._purge()
            self._drain(now)
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

    # -- opening and closing -------------------------------------------------------------------

    def adopt(self, claim: Claim, now: float, lend: bool) -> bool:
        """Count the connection opened in the claim's slot: lent to the claimer, or (a refill) given.

        Returns False when the pool was closed meanwhile: the connection is then in `claim.to_close`.
        """
        conn, info = claim.new_conn, claim.new_info
        assert conn is not None and info is not None
        ref = ConnRef(conn, self.collected.append)  # its callback is one C call: see _purge
        ref.key = id(conn)
        with self.lock:
            self._purge()  # first: a collected connection's id may be this one's now
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
            info.ref = ref
            self.conns[ref.key] = info
            info.probed_at = now
            if lend or self.waiters:
                info.state = LENT  # a refill with waiters: held by the claim until served below
                if lend:
                    info.lease += 1
                    info.lends += 1
                    info.borrowed_at = now
                    self.lent[ref.key] = info
                claim.info = info
                claim.conn = conn
            else:
                info.state = IDLE
                info.returned_at = now
                self.evict_at = min(self.evict_at, now + self.idle_timeout)
                self.idle.appendleft((conn, info))  # a refill: the least recently used end
            claim.slot = False
            claim.new_conn = claim.new_info = None
            if not lend and claim.conn is not None:
                self._serve(conn, info, now)
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

    def begin_return(self, conn: Connection, now: float, lease: int | None = None) -> ConnInfo:
        """Take back a lent connection (state RETURNING) and return its info for the caller to clean up
        and pass to `finish_return`. Refuses with PoolError a connection that is not lent, changing
        nothing. With the `lease` of the borrow, also finishes a return that an interrupt cut short
        after it took the connection off the lent table."""
        with self.lock:
            key = id(conn)
            info = self.lent.get(key)
            if info is None or info.ref() is not conn:
                info = self.info_of(conn)
                if info is None or info.state is not LENT or lease is None or info.lease != lease:
                    raise PoolError(self._refusal(info))
            elif self.lent.pop(key, None) is not info:
                raise PoolError(self._refusal(info))
            info.used += now - info.borrowed_at
            info.state = RETURNING  # still counted, and a second putconn is refused
            self.returning += 1
            return info

    def _refusal(self, info: ConnInfo | None) -> str:
        if info is None:
            return f"connection not lent by pool {self.name!r}: putconn refused a foreign connection"
        return f"connection already returned to pool {self.name!r}: putconn called twice"

    def finish_return(
        self, conn: Connection, info: ConnInfo, reason: str | None, now: float, to_close: ToClose
    ) -> None:
        """Keep or drop a connection in RETURNING state (dropped ones go to `to_close`). Idempotent."""
        with self.lock:
            if info.state is RETURNING:
                self._settle(conn, info, reason, now, to_close)

    def _settle(self, conn: Connection, info: ConnInfo, reason: str | None, now: float, to_close: ToClose) -> None:
        if reason is None:
            if self.closed:
                reason = "pool closed"
            elif self.idle_timeout == 0 and not self.waiters and len(self.idle) >= self.minconn:
                reason = "idle_timeout is 0 and minconn are idle"
            elif now >= info.expires:
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
            info.returned_at = now
            self.idle.append((conn, info))
        if self.idle_timeout and self.idle:
            self._evict_idle(now, to_close)

    def tidy(self, now: float, to_close: ToClose) -> None:
        """After a fast return: serve waiters, evict old idle connections, empty a closed pool."""
        with self.lock:
            self._purge()
            if self.closed:
                self._drop_all_idle("pool closed", to_close)
                return
            self._drain(now)
            if self.idle_timeout:
                self._evict_idle(now, to_close)

    # -- whole pool ----------------------------------------------------------------------------

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
            self._drain(now)
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
        return [conn for conn in (ref() for ref in refs if ref is not None) if conn is not None]

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
        inherited = [conn for conn in (info.ref() for info in self.conns.values() if info.ref) if conn is not None]
        inherited.extend(self.closing)
        self.lock = threading.Lock()
        self.idle.clear()
        self.conns.clear()
        self.lent.clear()
        self.collected.clear()
        self.opening = self.refilling = self.returning = 0
        self.closing = set()
        self.waiters.clear()
        self.leaks.clear()
        self.counters = dict.fromkeys(COUNTERS, 0.0)  # the child's own story starts here
        self.retired_lends = 0
        self.retired_used = 0.0
        return inherited
