"""The pools compared, behind one small interface: get() / put(conn) / close().

Every pool is configured to the same sizes and to the same return semantics: a connection comes back
with its transaction rolled back. Peers that lack a getconn/putconn pair use their nearest equivalent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg2

import pgpool


class Adapter:
    name = ""
    can_wait = True  # False: raises when exhausted, so it only runs where threads <= connections
    driver = "psycopg2"

    def get(self) -> Any:
        raise NotImplementedError

    def put(self, conn: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def warm(self, count: int) -> None:
        """Open `count` connections now, so that a measurement does not include connecting."""
        conns = [self.get() for _ in range(count)]
        for conn in conns:
            self.put(conn)


class PgPool(Adapter):
    name = "pgpool"

    def __init__(self, dsn: str, minconn: int, maxconn: int, **options: Any) -> None:
        self.pool = pgpool.ThreadSafeConnectionPool(minconn, maxconn, timeout=30, dsn=dsn, **options)
        self.get = self.pool.getconn  # type: ignore[method-assign]
        self.put = self.pool.putconn  # type: ignore[method-assign]

    def close(self) -> None:
        self.pool.close()


class PgPoolWithBlock(PgPool):
    """pgpool borrowed with ``with pool.connection()`` (overhead scenario only)."""

    name = "pgpool with-block"


class PgPoolInstrumented(PgPool):
    """pgpool reporting to OpenTelemetry (pgpool.otel, an SDK meter provider; overhead scenario only):
    next to the plain "pgpool" row, what instrumenting costs; a pool never instrumented pays one
    attribute check per borrow."""

    name = "pgpool + pgpool.otel"

    def __init__(self, dsn: str, minconn: int, maxconn: int, **options: Any) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        import pgpool.otel

        super().__init__(dsn, minconn, maxconn, **options)
        self.provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        self.instrumentation = pgpool.otel.instrument(self.pool, self.provider)

    def close(self) -> None:
        self.instrumentation.uninstrument()
        self.provider.shutdown()
        super().close()


class PgPoolChecked(PgPool):
    name = "pgpool check=check_connection"

    def __init__(self, dsn: str, minconn: int, maxconn: int, **options: Any) -> None:
        super().__init__(dsn, minconn, maxconn, check=pgpool.check_connection, **options)


class Psycopg2Pool(Adapter):
    name = "psycopg2.pool"
    can_wait = False

    def __init__(self, dsn: str, minconn: int, maxconn: int) -> None:
        import psycopg2.pool

        self.pool = psycopg2.pool.ThreadedConnectionPool(minconn, maxconn, dsn)
        self.get = self.pool.getconn  # type: ignore[method-assign]
        self.put = self.pool.putconn  # type: ignore[method-assign]

    def close(self) -> None:
        self.pool.closeall()


class ReferencePool(Adapter):
    name = "psycopg2_pool"
    can_wait = False

    def __init__(self, dsn: str, minconn: int, maxconn: int) -> None:
        import psycopg2_pool

        self.pool = psycopg2_pool.ThreadSafeConnectionPool(minconn=minconn, maxconn=maxconn, dsn=dsn)
        self.get = self.pool.getconn  # type: ignore[method-assign]
        self.put = self.pool.putconn  # type: ignore[method-assign]

    def close(self) -> None:
        self.pool.clear()


class PsycopgPool(Adapter):
    name = "psycopg_pool"
    driver = "psycopg 3"

    def __init__(self, dsn: str, minconn: int, maxconn: int) -> None:
        import psycopg_pool

        # putconn of a connection left in a transaction logs a warning each time: that is the point here.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self.pool = psycopg_pool.ConnectionPool(dsn, min_size=minconn, max_size=maxconn, timeout=30, open=True)
        if minconn:
            self.pool.wait(timeout=30)
        self.get = self.pool.getconn  # type: ignore[method-assign]
        self.put = self.pool.putconn  # type: ignore[method-assign]

    def close(self) -> None:
        self.pool.close()


class SQLAlchemyPool(Adapter):
    name = "sqlalchemy QueuePool"

    def __init__(self, dsn: str, minconn: int, maxconn: int) -> None:
        import sqlalchemy.pool

        self.pool = sqlalchemy.pool.QueuePool(
            lambda: psycopg2.connect(dsn), pool_size=maxconn, max_overflow=0, timeout=30, reset_on_return="rollback"
        )
        self.get = self.pool.connect  # type: ignore[method-assign]
        if minconn:
            self.warm(minconn)

    def put(self, conn: Any) -> None:
        conn.close()  # returns the fairy to the pool

    def close(self) -> None:
        self.pool.dispose()


class DBUtilsPool(Adapter):
    name = "DBUtils PooledDB"

    def __init__(self, dsn: str, minconn: int, maxconn: int) -> None:
        from dbutils.pooled_db import PooledDB

        self.pool = PooledDB(
            psycopg2, mincached=minconn, maxcached=maxconn, maxconnections=maxconn, blocking=True, reset=True, dsn=dsn
        )
        self.get = self.pool.connection  # type: ignore[method-assign]

    def put(self, conn: Any) -> None:
        conn.close()  # returns it to the pool

    def close(self) -> None:
        self.pool.close()


PEERS: list[Callable[..., Adapter]] = [Psycopg2Pool, ReferencePool, PsycopgPool, SQLAlchemyPool, DBUtilsPool]
ALL: list[Callable[..., Adapter]] = [PgPool, *PEERS]


class FifoBound(Adapter):
    """The bound of issue 18 for any fair pool under the GIL: a bare first come, first served hand-off.

    A deque of idle connections, one lock, a lock per waiter, a rollback on return, and nothing else:
    no checks, no session restore, no timeouts, no interrupt safety, no accounting. Borrow and return
    take no lock while nobody waits (a deque's pop and append are atomic); the lock is taken only to
    queue or to hand over. A returner that finds threads in line hands its connection to the oldest;
    the hand-over rule (a returner appends, *then* reads the line; a waiter joins the line, *then*
    reads the idle list, both sides draining under the lock) keeps a waiter from sleeping beside an
    idle connection. Not in ALL: it is measured only in the cell against the bound (bench/bound.py)."""

    name = "bare FIFO hand-off (the bound)"

    def __init__(self, dsn: str, minconn: int, maxconn: int) -> None:
        import threading
        from collections import deque

        self.conns = [psycopg2.connect(dsn) for _ in range(maxconn)]  # all opened up front: nothing to open later
        self.idle: deque[Any] = deque(self.conns)
        self.waiters: deque[list[Any]] = deque()  # [lock held until served, connection]
        self.lock = threading.Lock()
        self.new_lock = threading.Lock

    def get(self) -> Any:
        if not self.waiters:
            try:
                return self.idle.pop()
            except IndexError:
                pass
        with self.lock:
            if not self.waiters and self.idle:
                return self.idle.pop()
            box = [self.new_lock(), None]
            box[0].acquire()
            self.waiters.append(box)
            self._drain()
        box[0].acquire()  # released by whoever hands this waiter a connection
        return box[1]

    def put(self, conn: Any) -> None:
        if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            conn.rollback()
        if self.waiters:
            with self.lock:
                if self.waiters:
                    box = self.waiters.popleft()
                    box[1] = conn
                    box[0].release()
                    return
        self.idle.append(conn)
        if self.waiters:  # one joined the line between the read above and the append
            with self.lock:
                self._drain()

    def _drain(self) -> None:
        """Under the lock: idle connections to the oldest waiters."""
        while self.waiters and self.idle:
            box = self.waiters.popleft()
            box[1] = self.idle.pop()
            box[0].release()

    def warm(self, count: int) -> None:
        pass  # opened in __init__

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
