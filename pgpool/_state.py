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
other. A fast returner that finds threads in line hands its connection to the oldest under the lock
(`_serve`), without a stop in the idle list. Otherwise the one hand-over rule between the two kinds
holds: a fast returner appends to the idle list *then* looks at the waiters; a waiter joins the line
*then* looks at the idle list. One of them always sees the other (each operation is sequentially
consistent), and the one who does hands the connection over under the lock (`_drain`), so that no
waiter sleeps while a connection is idle.

Interrupt safety: an asynchronous exception (KeyboardInterrupt) can land at the entry of any Python
function and right after any C call (a method call such as ``deque.remove``), but never after a
subscript, attribute store or operator. So a step makes its C calls (reads, ``id()``, the clock)
before its first change; when that first change is itself a C call (``idle.remove``), it undoes or
finishes it if an exception follows; and everything after is subscripts, attribute stores and
operators, except a call to a helper whose entry leaves the state consistent (`_grant`, `_serve`,
`_drop`, `_queue`). What a step hands over is recorded in the caller's `Claim` in the same breath.
"""

from __future__ import annotations

import time

import psycopg2
import psycopg2.extensions

from ._libpq import PQclientEncoding, client_encoding
from ._records import CLOSING, IDLE, LENT, PROBE_INTERVAL, RETURNING, Claim, ConnInfo, ConnRef, Waiter
from ._slots import Item, Slots, ToClose
from .errors import PoolClosed, PoolError

Connection = psycopg2.extensions.connection

_STATUS_READY = psycopg2.extensions.STATUS_READY
_monotonic = time.monotonic
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_INTRANS = psycopg2.extensions.TRANSACTION_STATUS_INTRANS
_STATUS_INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR

WAIT = "wait"  # what `acquire` tells its caller when the claim got nothing: it is in line
DONE = "done"  # what `return_fast` says when nothing more is due
TIDY = "tidy"  # ... when the connection is back but `tidy` must run (waiters, evictions, closed pool)


class PoolState(Slots):
    """The steps of the state machine: lend and return (fast, without the lock; slow, under it),
    open, close. Fields and shared helpers: `pgpool._slots.Slots`."""

    # -- the fast steps: no lock -----------------------------------------------------------------

    def lend_fast(self, now: float) -> Item | None:
        """Lend the newest idle connection if it needs nothing the slow path does (None: take it)."""
        # Connections garbage collected: the slow path accounts for and reports them. Threads in
        # line came first: the slow path serves them in order (one that queues after this read
        # finds the connection gone from the idle list, and waits for the next return).
        if self.collected or self.leaks or self.waiters:
            return None
        idle = self.idle
        try:
            item = idle.pop()  # atomic: the connection is this thread's alone from here
        except IndexError:
            return None
        # An asynchronous exception landing right after the pop (before `item` is bound) drops the
        # connection: nothing else references it, so the collector closes it and frees its slot
        # (see _purge). Anywhere below, the connection goes back to the idle list.
        try:
            conn, info = item
            key = id(conn)
            probe_due = now - info.probed_at >= PROBE_INTERVAL
            if (
                conn.get_transaction_status() != _STATUS_IDLE  # the server's word; UNKNOWN once closed
                or now >= info.expires
                or info.generation != self.generation  # opened before a failover or drain()
                or (self.idle_timeout and now - info.returned_at > self.idle_timeout)
                or (probe_due and info.probe.poll(0))  # the server sent something: look closer
            ):
                idle.append(item)  # atomic; the slow path looks at it again, under the lock
                return None
        except BaseException:
            if item not in idle:
                idle.append(item)
            raise
        # No call from here on: the lend happens whole.
        if probe_due:
            info.probed_at = now
        info.state = LENT
        info.lease += 1
        info.lends += 1
        info.borrowed_at = now
        self.lent[key] = info  # atomic: putconn can now take it back
        times = self.times
        if times is not None:
            times.waits.append(_monotonic() - now)  # lent: a lost sample is all an interrupt costs
        return item

    def return_fast(self, conn: Connection, key: int, info: ConnInfo, now: float) -> str | None:
        """Take back a lent connection, `info` being what the lent table holds under its `key` (its
        id), if at most a rollback is needed and it is not due to close (None: nothing changed, take
        the slow path; TIDY: back, and `tidy` must run; DONE: back, nothing due).

        The rollback, when a transaction is open, is the one I/O here: made outside any lock by the
        returning thread, which owns the connection once it took it off the lent table.
        """
        # A connection garbage collected while lent leaves its entry until the next slow step purges
        # it, and its id may be another object's by then: until that purge, the slow path. Otherwise
        # ids are unique among live objects, so the entry is this very connection.
        if self.collected or not self.keeps_returns or now >= info.expires or info.generation != self.generation:
            return None
        status = conn.get_transaction_status()
        if (
            # Anything else the next borrower would inherit: the slow path cleans it up. Attribute
            # reads and C calls, inline (this is the hottest line of the pool).
            (status != _STATUS_IDLE and status != _STATUS_INTRANS and status != _STATUS_INERROR)
            or info.sticky
            or (status == _STATUS_INERROR and self.checks_server)  # an error: is the server still right?
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
            info.probed_at = _monotonic()  # the round trip just made says as much as a probe would
            # What the round trip brought (a warning, notifications), or a transaction psycopg2 does
            # not know of (BEGIN in SQL under autocommit: its rollback() then sends nothing): the
            # slow path clears it, or discards the connection.
            if conn.notices or conn.notifies or conn.get_transaction_status() != _STATUS_IDLE:
                self.lent[key] = info
                return None
        elif conn.status != _STATUS_READY:
            self.lent[key] = info  # psycopg2 believes a transaction open that the server ended
            return None
        # The encoding, changed by set_client_encoding or in SQL ("SET client_encoding", which
        # psycopg2 does not see, and which the rollback may have undone): libpq follows both.
        if (PQclientEncoding(conn.pgconn_ptr) if PQclientEncoding else client_encoding(conn)) != info.encoding_id:
            self.lent[key] = info
            return None
        if info.generation != self.generation:
            # A failover or drain() began during the rollback: the slow path drops it.
            self.lent[key] = info
            return None
        used = now - info.borrowed_at
        times = self.times
        if times is not None:
            times.uses.append(used)
        if self.waiters:
            # Threads in line: the oldest gets it from here, without a stop in the idle list (one
            # lock, one wake-up: what a borrow costs under contention). Waiters join the line under
            # this lock, so none is missed; a closed pool takes the path below, which drops it, and
            # one evicted since the check above (evict bumps under this lock) the slow path.
            with self.lock:
                if self.waiters and not self.closed:
                    if info.generation != self.generation:
                        self.lent[key] = info  # evicted meanwhile: the slow path drops it
                        return None
                    # The use time is counted inside: an interrupt on _serve's entry changes
                    # nothing, and the caller's retry counts it once.
                    self._serve(conn, info, used=used)
                    return DONE
        info.used += used
        info.state = IDLE
        info.returned_at = now
        idle = self.idle
        idle.append((conn, info))  # atomic; a lender may take it from here
        if self.waiters or not self.keeps_returns:  # read after the append: see the hand-over rule
            return TIDY
        if now > self.evict_at:
            return TIDY  # an idle connection may have outlived idle_timeout
        return DONE

    # -- lending -------------------------------------------------------------------------------

    def acquire(self, claim: Claim, now: float, can_wait: bool) -> str | None:
        """Fill `claim` with an idle connection or a slot to open one in; else queue or refuse.

        Returns None when the claim got something, `WAIT` when `claim.waiter` is queued (and maybe
        served at once), or the message of an exhausted pool. Unfit idle connections go to
        `claim.to_close`. Raises `PoolClosed` on a closed pool.
        """
        with self.lock:
            # Guards rather than calls: under contention this runs between waking a waiter and going
            # to sleep, while the woken thread waits for the GIL (bench/NOTES.md).
            if self.collected:
                self._purge()
            if self.closed:
                # A fast lender may have put a connection back after close() emptied the idle list.
                self._drop_all_idle("pool closed", claim.to_close)
                raise PoolClosed(f"pool {self.name!r} is closed")
            idle = self.idle
            if self.waiters and can_wait:
                return self._queue(claim)  # threads in line came first: behind them, at once
            if idle and self.waiters:
                self._drain()
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
                elif info.generation != self.generation:
                    reason = "opened before a failover or drain()"
                elif (
                    self.idle_timeout
                    and now - info.returned_at > self.idle_timeout
                    and len(self.conns) + self.opening > self.minconn
                ):
                    reason = "idle_timeout reached"
                else:
                    key = id(conn)  # C calls before the change (see the module docstring)
                    try:
                        idle.remove(item)
                    except ValueError:
                        continue  # a fast lender took it
                    except BaseException:
                        idle.append(item)  # removed, then interrupted: idle again, nobody took it
                        raise
                    # Attribute and subscript stores only: the lend happens whole.
                    info.state = LENT
                    info.lease += 1
                    info.lends += 1
                    info.borrowed_at = now
                    self.lent[key] = info
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
            return self._queue(claim)

    def _queue(self, claim: Claim) -> str:
        """Put the claim's thread at the end of the line (under the lock); returns `WAIT`."""
        waiter = Waiter()
        claim.waiter = waiter  # first: the claim owns its place in line before it exists (see leave_line)
        self.waiters.append(waiter)
        if self.idle:  # read after the append: see the module's hand-over rule
            self._drain()
        return WAIT

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
                self.closing[conn] = None
                info.state = CLOSING
                claim.to_close += ((conn, "pool closed while connecting"),)
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
                self._serve(conn, info)
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

    def drop_claimed(self, claim: Claim, reason: str, broken: bool = False, unlent: bool = False) -> None:
        """Move the claim's connections (taken, or just opened) to its `to_close`, keeping their slots.

        `broken`: its check failed before the borrower got it; `unlent`: the borrower never got it
        (found unfit, or its getconn failed or was interrupted). Neither counts as a checkout; only a
        broken one counts as discarded."""
        with self.lock:
            if claim.conn is not None and claim.info is not None:
                conn, info = claim.conn, claim.info
                if info.state is LENT:
                    self._drop(conn, info, reason, claim.to_close)
                    if broken or unlent:
                        self.retired_lends -= 1
                    if broken:
                        self.counters["broken_discarded"] += 1
                claim.conn = claim.info = None
            if claim.new_conn is not None:
                # Its slot moves from `opening` to `closing`, so that it is freed once it is closed.
                self.opening -= 1
                if claim.refill:
                    self.refilling -= 1
                if claim.new_info is not None:
                    claim.new_info.state = CLOSING
                self.closing[claim.new_conn] = None
                claim.to_close += ((claim.new_conn, reason),)
                claim.new_conn = claim.new_info = None
                claim.refill = False
                claim.slot = False

    def closed_one(self, conn: Connection, keep_slot_for: Claim | None = None) -> None:
        """A dropped connection is closed: free its slot (or hand it to `keep_slot_for`). Idempotent."""
        with self.lock:
            if conn not in self.closing:
                return
            del self.closing[conn]
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
            elif info.generation != self.generation:
                reason = "opened before a failover or drain()"
        if reason is not None:
            if reason.startswith(("broken", "returned closed", "cleanup failed", "reset")):
                self.counters["broken_discarded"] += 1
            self._drop(conn, info, reason, to_close)
        elif self.waiters:
            self._serve(conn, info)
        else:
            if info.state is RETURNING:
                self.returning -= 1
            info.state = IDLE
            info.returned_at = now
            self.idle.append((conn, info))
        if self.idle_timeout and self.idle:
            self._evict_idle(now, to_close)

    def unfit(self, conn: Connection, info: ConnInfo, now: float) -> str | None:
        """Why a connection handed to a waiter must not be lent after all (None: it may).

        `acquire` checks idle connections under the lock, but a waiter is handed connections that
        did not pass those checks since the last drain() or failover: from the idle list (a fast
        lender may put one back there, for the slow path to look at, after a drain() that could not
        see it), from a slow return or from a refill whose connect straddled a drain(). Deliberately
        narrower than `acquire`: `idle_timeout` does not apply to a connection someone waits for."""
        if conn.closed:
            return "closed while idle"
        if info.generation != self.generation:
            return "opened before a failover or drain()"
        if now >= info.expires:
            return "max_lifetime reached"
        if conn.get_transaction_status() != _STATUS_IDLE:
            return "not idle on the server"
        return None

    def evict(self, seen: int | None, to_close: ToClose) -> bool:
        """Start a new generation: every idle connection goes to `to_close`, lent ones are dropped
        when they come back, new connects choose their server again. With `seen` (the generation of
        the connection that saw a sign of failover), only if no round started since: several
        borrowers seeing the same failover make one round. Returns whether a round started."""
        with self.lock:
            if self.closed or (seen is not None and seen != self.generation):
                return False
            self.generation += 1
            self.counters["evictions"] += 1
            self._drop_all_idle("opened before a failover or drain()", to_close)
            return True

    def tidy(self, now: float, to_close: ToClose) -> None:
        """After a fast return: serve waiters, evict old idle connections, empty a closed pool."""
        with self.lock:
            self._purge()
            if self.closed:
                self._drop_all_idle("pool closed", to_close)
                return
            self._drain()
            if self.idle_timeout:
                self._evict_idle(now, to_close)

    # -- whole pool ----------------------------------------------------------------------------
