"""What the pool keeps about each of its connections, and about each thread waiting for one."""

from __future__ import annotations

import threading
import time

import psycopg2.extensions

from .errors import PoolError
from .health import socket_probe

Connection = psycopg2.extensions.connection

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE

# What a connection of the pool is doing (ConnInfo.state).
IDLE = "idle"  # in idle_connections
LENT = "lent"  # lent by getconn
RETURNING = "returning"  # given back to putconn, being cleaned up outside the lock


class ConnInfo:
    """What the pool remembers about one of its connections."""

    __slots__ = (
        "autocommit",
        "borrowed_at",
        "deferrable",
        "expires",
        "isolation_level",
        "probe",
        "readonly",
        "stack",
        "state",
    )

    def __init__(self, conn: Connection, expires: float | None) -> None:
        self.state = LENT
        self.expires = expires  # monotonic time after which it is retired (max_lifetime)
        self.probe = socket_probe(conn)  # made once: probing is then a single poll() call
        # The session characteristics restored on every return.
        self.autocommit = conn.autocommit
        self.isolation_level = conn.isolation_level
        self.readonly = conn.readonly
        self.deferrable = conn.deferrable
        self.borrowed_at = 0.0  # monotonic time of the current borrow (leak detection)
        self.stack: list[str] | None = None  # where it was borrowed, when leak_timeout is set

    def needs_cleanup(self, conn: Connection) -> bool:
        """Tell whether a returned connection is in a transaction or had its settings changed."""
        return (
            conn.get_transaction_status() != _STATUS_IDLE
            or conn.autocommit != self.autocommit
            or conn.isolation_level != self.isolation_level
            or conn.readonly != self.readonly
            or conn.deferrable != self.deferrable
        )

    def restore_settings(self, conn: Connection) -> None:
        conn.autocommit = self.autocommit
        conn.isolation_level = self.isolation_level
        conn.readonly = self.readonly
        conn.deferrable = self.deferrable


class Waiter:
    """A thread queued in `getconn`; whoever serves it sets exactly one of its outcomes.

    It sleeps on a plain lock rather than a `threading.Event`: waking it is then one C call, which
    matters when every returned connection wakes a waiter. `wake` and `rearm` run under the pool's
    lock, so no wake-up is lost between a check and a sleep.
    """

    __slots__ = ("_signal", "_signaled", "conn", "error", "may_connect", "since")

    def __init__(self) -> None:
        self.since = time.monotonic()  # when it joined the line
        self.conn: Connection | None = None  # a connection handed over, already marked lent
        self.may_connect = False  # a slot reserved for it: it opens its own connection
        self.error: PoolError | None = None
        self._signal = threading.Lock()  # released to wake the waiter
        self._signal.acquire()
        self._signaled = False

    def served(self) -> bool:
        return self.conn is not None or self.may_connect or self.error is not None

    def wake(self) -> None:
        if not self._signaled:
            self._signaled = True
            self._signal.release()

    def sleep(self, timeout: float) -> None:
        self._signal.acquire(timeout=timeout)

    def rearm(self) -> None:
        """Make the next `sleep` block again (after a wake-up that did not serve this waiter)."""
        if self._signaled:
            self._signal.acquire(blocking=False)  # consume the wake-up if sleep did not
            self._signaled = False
