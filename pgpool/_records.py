"""What the pool keeps about each connection, each waiting thread, and each `getconn` in progress."""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque

import psycopg2.extensions

from ._libpq import client_encoding
from .errors import PoolError
from .health import socket_probe

Connection = psycopg2.extensions.connection


# A connection whose socket was found quiet, or that made a round trip, this recently is lent
# without looking again: poll() is a system call that releases the GIL, which under contention costs
# far more than its microsecond. A connection killed within this window is lent dead, as one killed
# just after a probe would be (HikariCP skips validation for 500 ms after a connection's last use).
PROBE_INTERVAL = 0.001

# What a connection of the pool is doing (ConnInfo.state).
IDLE = "idle"  # in idle_connections
LENT = "lent"  # lent by getconn
RETURNING = "returning"  # given back to putconn, being cleaned up outside the lock
CLOSING = "closing"  # dropped: being closed outside the lock, its slot still counted


class ConnRef(weakref.ref[Connection]):
    """A weak reference to a pooled connection that remembers the connection's key (its ``id``), so
    that the pool can forget its entry once the connection has been garbage collected."""

    __slots__ = ("key",)
    key: int


class ConnInfo:
    """What the pool remembers about one of its connections (never the connection itself)."""

    __slots__ = (
        "autocommit",
        "borrowed_at",
        "cursor_factory",
        "deferrable",
        "encoding",
        "encoding_id",
        "expires",
        "generation",
        "isolation_level",
        "lease",
        "lends",
        "probe",
        "probed_at",
        "readonly",
        "ref",
        "returned_at",
        "stack",
        "state",
        "sticky",
        "used",
    )

    def __init__(self, conn: Connection, expires: float | None) -> None:
        self.state = LENT
        self.lease = 0  # bumped at every lend: tells one borrow of the connection from the next
        self.expires = math.inf if expires is None else expires  # when it is retired (max_lifetime)
        self.probe = socket_probe(conn)  # made once: probing is then a single poll() call
        # The session characteristics restored on every return (as left by the configure hook).
        self.autocommit = conn.autocommit
        self.isolation_level = conn.isolation_level
        self.readonly = conn.readonly
        self.deferrable = conn.deferrable
        self.encoding = conn.encoding
        self.encoding_id = client_encoding(conn)  # libpq's, as the server last said (see _libpq)
        self.cursor_factory = conn.cursor_factory
        # In autocommit, psycopg2 keeps read-only, deferrable and the isolation level as server
        # settings, which a borrower switching autocommit off and on again resets unseen: such a
        # connection has them applied again on every return.
        self.sticky = self.autocommit and (
            self.readonly is not None or self.deferrable is not None or self.isolation_level is not None
        )
        self.borrowed_at = 0.0  # monotonic time of the current lend (use time, leak detection)
        self.returned_at = 0.0  # monotonic time it last became idle (idle_timeout)
        self.probed_at = time.monotonic()  # when its socket was last found quiet (connected: now)
        self.lends = 0  # how many times it was lent (the pool's "checkouts" sum these)
        self.used = 0.0  # seconds spent lent, over all its lends
        self.ref = ConnRef(conn)  # replaced, with a callback, when the pool counts it (PoolState.adopt)
        self.stack: list[str] | None = None  # where it was borrowed, when leak_timeout is set
        self.generation = 0  # the pool's generation when its connect began (see PoolState.evict)


class BorrowTimes:
    """Wait and use times of borrows, in seconds, for a metrics listener to take (pgpool.otel).

    Recording one is a ``deque.append``: one C call, on the fast paths too; the listener records them
    in its histograms when the metrics are collected, and the housekeeper's rounds hand them over
    meanwhile, so that the buffers stay small and no borrower pays for a histogram.
    """

    __slots__ = ("uses", "waits")

    # A bound, so that a pool borrowing faster than the SDK records (or one whose metrics nobody
    # collects) never grows without limit: past it, the oldest samples are dropped.
    LIMIT = 100_000

    def __init__(self) -> None:
        self.waits: deque[float] = deque(maxlen=self.LIMIT)  # how long each getconn took
        self.uses: deque[float] = deque(maxlen=self.LIMIT)  # how long each connection was lent


class Waiter:
    """A thread queued in `getconn`; whoever serves it sets exactly one outcome, once.

    It sleeps on a plain lock rather than a `threading.Event`: waking it is then one C call
    (``signal.release()``), which no interrupt can split, and which happens at most once.
    """

    __slots__ = ("conn", "error", "info", "may_connect", "signal", "since")

    def __init__(self) -> None:
        self.since = time.monotonic()  # when it joined the line
        self.conn: Connection | None = None  # a connection handed over, already marked lent
        self.info: ConnInfo | None = None
        self.may_connect = False  # a slot reserved for it: it opens its own connection
        self.error: PoolError | None = None
        self.signal = threading.Lock()  # released, once, by whoever serves it
        self.signal.acquire()


class Claim:
    """Everything one `getconn` call holds at a given instant, so that one place can give it back.

    The pool's state fills it under the lock; `Lending._give_back_claim` (pgpool._lending) empties it when the
    call fails or is interrupted. A field set means "owned by this call", from the very statement
    that set it.
    """

    __slots__ = ("conn", "connect_seconds", "info", "new_conn", "new_info", "refill", "slot", "to_close", "waiter")

    def __init__(self) -> None:
        self.conn: Connection | None = None  # taken from the pool, state LENT, not yet returned to the caller
        self.info: ConnInfo | None = None
        self.slot = False  # a reserved slot (counted in PoolState.opening) to open a connection in
        self.new_conn: Connection | None = None  # opened in that slot, not yet counted
        self.new_info: ConnInfo | None = None
        self.waiter: Waiter | None = None  # in the line, or served and not yet collected
        self.refill = False  # the slot is a background refill's (counted in PoolState.refilling too)
        self.to_close: list[tuple[Connection, str]] = []  # dropped (state CLOSING), to close
        self.connect_seconds = 0.0  # how long the connect in the claim's slot took (stats, metrics)
