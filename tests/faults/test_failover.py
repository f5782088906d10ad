"""Failover with a real primary and streaming standby on loopback (tests/cluster.py): 8 threads keep
writing through ``pool.transaction()`` of a pool given both hosts and ``target_session_attrs=read-write``
while the primary dies, or is made read-only, and the standby is promoted; and ``drain()`` under load.

Each test builds its own cluster (about a second), also when PGPOOL_TEST_DSN names another server;
they skip only when the embedded server's wheel lacks the binaries.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from math import inf

import psycopg2
import psycopg2.errors
import pytest

from pgpool import ThreadSafeConnectionPool
from pgpool._failover import ServerTarget, eviction_reason

from ..cluster import Cluster, available
from ..helpers import join_all, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(45)]

WRITERS = 8
TABLE = "failover_writes"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A primary and its standby, with the table the writers fill (already replayed on the standby)."""
    missing = available()
    if missing is not None:
        pytest.skip(f"cannot build a primary and a standby: {missing}")
    with Cluster() as built:
        with built.connect(built.primary) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {TABLE} (writer int, n int)")
        built.wait_replayed()
        yield built


@dataclass
class Borrow:
    """One write: when it started, when it got its connection, which server that was, how it ended."""

    writer: int
    started: float
    lent: float | None  # None: no connection was lent (the borrow itself failed)
    ended: float
    port: int | None
    pid: int | None
    error: str | None = None  # repr of the exception (kept as text: no frames, no connections held)
    sqlstate: str | None = None
    session: int | None = None  # which connection object: unlike a backend pid, never reused


class Writers:
    """WRITERS threads, each writing one row per ``pool.transaction()`` until stopped."""

    def __init__(self, pool: ThreadSafeConnectionPool) -> None:
        self.pool = pool
        self.borrows: list[Borrow] = []
        self._lock = threading.Lock()
        self._sessions: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._serials = itertools.count(1)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(i,), name=f"writer-{i}") for i in range(WRITERS)]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        join_all(self._threads, timeout=20)

    def session(self, conn: object) -> int:
        """A number for this connection object, the same for its whole life and never given again
        (backend pids are reused: on a machine with pid_max 32768 they wrap within a CI run)."""
        with self._lock:
            if conn not in self._sessions:
                self._sessions[conn] = next(self._serials)
            return self._sessions[conn]

    def _write(self, writer: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            lent = port = pid = session = None
            error = sqlstate = None
            try:
                with self.pool.transaction() as conn:
                    lent = time.monotonic()
                    port, pid, session = conn.info.port, conn.info.backend_pid, self.session(conn)
                    with conn.cursor() as cur:
                        cur.execute(f"INSERT INTO {TABLE} VALUES (%s, %s)", (writer, n))
            except Exception as exc:
                error, sqlstate = repr(exc)[:300], getattr(exc, "pgcode", None)
            with self._lock:
                ended = time.monotonic()
                self.borrows.append(Borrow(writer, started, lent, ended, port, pid, error, sqlstate, session))
            if error is not None:
                time.sleep(0.01)  # a writer that fails at once must not flood the record

    def snapshot(self) -> list[Borrow]:
        with self._lock:
            return list(self.borrows)

    def wait_for_writes(self, count: int = 20, timeout: float = 10) -> None:
        """Wait until `count` more writes succeeded, so that the pool is warm and under load."""
        start = sum(b.error is None for b in self.snapshot())
        assert wait_until(lambda: sum(b.error is None for b in self.snapshot()) >= start + count, timeout), (
            f"the writers did not get {count} writes through in {timeout} s: {self.snapshot()[-3:]}"
        )


def _errors_per_writer(borrows: list[Borrow]) -> dict[int, int]:
    return dict(Counter(b.writer for b in borrows if b.error is not None))


def _eviction_warnings(caplog: pytest.LogCaptureFixture, pool: ThreadSafeConnectionPool) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pgpool" and r.levelno == logging.WARNING and "evicting" in r.getMessage()
        if repr(pool.name) in r.getMessage()
    ]


def test_the_rules_see_a_real_standby_and_its_promotion(cluster):
    """What the pool's checks read is what a real standby reports: no round trip, updated on promotion."""
    read_write = ServerTarget({"dsn": cluster.dsn("read-write")})
    assert read_write.wants_primary
    conn = psycopg2.connect(cluster.standby.dsn, connect_timeout=2)
    try:
        assert conn.info.parameter_status("in_hot_standby") == "on"
        assert read_write.unwanted(conn) == "server is a standby (in_hot_standby=on)"
        assert ServerTarget({"dsn": cluster.dsn("standby")}).unwanted(conn) is None
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.FeatureNotSupported) as caught:
                cur.execute("SET TRANSACTION READ WRITE")
        conn.rollback()
        assert eviction_reason(caught.value) == "server in recovery, cannot write (SQLSTATE 0A000)"
        cluster.promote_standby()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")  # the new status arrives with the next reply
        assert conn.info.parameter_status("in_hot_standby") == "off"
        assert read_write.unwanted(conn) is None
    finally:
        conn.close()


@pytest.mark.timing
def test_after_the_primary_dies_and_the_standby_is_promoted_writes_resume_within_2_s(cluster):
    """(a) Only the borrows in flight when the primary dies see an error; borrows that start during the
    outage wait (connect retries within the pool's timeout) and land on the promoted standby."""
    old_port, new_port = cluster.primary.port, cluster.standby.port
    with ThreadSafeConnectionPool(maxconn=8, timeout=5, dsn=cluster.dsn("read-write"), name="failover-a") as pool:
        with Writers(pool) as writers:
            writers.wait_for_writes()
            failing = time.monotonic()
            cluster.stop_primary(mode="immediate")
            stopped = time.monotonic()
            time.sleep(0.5)  # an outage: nothing takes writes
            cluster.promote_standby()
            promoted = time.monotonic()
            wait_until(lambda: any(b.started > promoted + 2.5 for b in writers.snapshot()), timeout=10)
        borrows = writers.snapshot()
    errors = [b for b in borrows if b.error is not None]
    # Per writer: seconds from the promotion to its first write after it (inf: none).
    ok_after = [b for b in borrows if b.error is None and b.ended > promoted]
    back = {w: min((b.ended - promoted for b in ok_after if b.writer == w), default=inf) for w in range(WRITERS)}
    summary = (
        f"stop took {stopped - failing:.2f} s; errors per writer {_errors_per_writer(borrows)};"
        f" writes again after {sorted(round(s, 2) for s in back.values())} s;"
        f" first errors {[b.error for b in errors[:3]]}"
    )
    late = [b for b in errors if b.started >= stopped]
    assert not late, f"{len(late)} borrows that started after the primary was down failed: {summary}"
    assert all(n <= 1 for n in _errors_per_writer(borrows).values()), summary
    assert all(b.port == old_port for b in borrows if b.lent is not None and b.lent < failing)
    assert max(back.values()) <= 2.0, f"a writer did not write again within 2 s of the promotion: {summary}"
    after = [b for b in borrows if b.lent is not None and b.lent > stopped]
    assert after and all(b.port == new_port for b in after), f"lent to {Counter(b.port for b in after)}"


def test_a_primary_made_read_only_gets_no_writes_after_the_first_read_only_error(cluster, caplog):
    """(b) A switchover: the old primary stays up but read-only, the standby is promoted. The first
    SQLSTATE 25006 evicts every connection to the old server; libpq's read-write selection then picks
    the new primary, and no borrow that starts afterwards gets the old one. At most one round of 25006:
    the borrows in flight on connections opened before the eviction."""
    caplog.set_level(logging.WARNING, logger="pgpool")
    old_port, new_port = cluster.primary.port, cluster.standby.port
    with ThreadSafeConnectionPool(maxconn=8, timeout=5, dsn=cluster.dsn("read-write"), name="failover-b") as pool:
        with Writers(pool) as writers:
            writers.wait_for_writes()
            evictions_before = pool.stats()["evictions"]
            cluster.make_primary_read_only()
            assert wait_until(lambda: any(b.sqlstate == "25006" for b in writers.snapshot()), timeout=5), (
                "no write failed with SQLSTATE 25006 on the read-only primary"
            )
            time.sleep(0.3)  # the switchover's gap: the old primary refuses writes, the new one is not up
            cluster.promote_standby()
            promoted = time.monotonic()
            wait_until(lambda: any(b.started > promoted + 2 for b in writers.snapshot()), timeout=10)
        evictions = pool.stats()["evictions"] - evictions_before
        borrows = writers.snapshot()
    errors = [b for b in borrows if b.error is not None]
    read_only = [b for b in errors if b.sqlstate == "25006"]
    first = min(b.ended for b in read_only)  # the eviction ran in that borrow's return, before it ended
    summary = f"{len(read_only)} 25006 errors, errors per writer {_errors_per_writer(borrows)}, {evictions} evictions"
    assert len(read_only) <= WRITERS, f"more than one round of read-only errors: {summary}"
    lent_later = [b for b in borrows if b.lent is not None and b.lent > first]
    to_old = [b for b in lent_later if b.port == old_port]
    assert not to_old, f"{len(to_old)} borrows got the read-only old primary after the first 25006: {summary}"
    assert lent_later and all(b.port == new_port for b in lent_later)
    others = [b.error for b in errors if b.sqlstate != "25006"]
    assert not others, f"errors other than 25006: {others[:3]} ({summary})"
    assert not [b for b in errors if b.started > promoted], summary
    assert evictions == 1, f"one eviction round expected: {summary}"
    warnings = _eviction_warnings(caplog, pool)
    assert len(warnings) == evictions, warnings
    assert f"127.0.0.1:{old_port}" in warnings[0] and ("25006" in warnings[0] or "read-only" in warnings[0]), warnings


def test_drain_under_load_replaces_every_connection_without_an_error(cluster, caplog):
    """(c) drain(): the idle connections opened before it are closed at once, the lent ones when they
    come back, and no borrower sees an error; none of the old backends is lent again."""
    caplog.set_level(logging.WARNING, logger="pgpool")
    with ThreadSafeConnectionPool(
        minconn=8, maxconn=8, timeout=5, dsn=cluster.dsn("read-write"), name="failover-c"
    ) as pool:
        with cluster.connect(cluster.primary) as admin, admin.cursor() as cur:
            with Writers(pool) as writers:
                writers.wait_for_writes()
                evictions_before = pool.stats()["evictions"]
                # The server's sessions before drain(), by (pid, backend_start): a pid alone is reused.
                cur.execute(
                    "SELECT pid, backend_start FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                sessions_before = cur.fetchall()
                idle_before = {writers.session(c) for c in list(pool.idle_connections)}
                draining = time.monotonic()
                pool.drain()
                drained = time.monotonic()
                writers.wait_for_writes(count=50)
            evictions = pool.stats()["evictions"] - evictions_before
            borrows = writers.snapshot()
            old = idle_before | {b.session for b in borrows if b.lent is not None and b.lent < draining}

            # While the pool is still open: every old session was closed by drain() or on its return.
            def old_backends_left() -> int:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity a JOIN unnest(%s::int[], %s::timestamptz[])"
                    " AS b(pid, backend_start) ON a.pid = b.pid AND a.backend_start = b.backend_start",
                    ([p for p, _ in sessions_before], [t for _, t in sessions_before]),
                )
                return int(cur.fetchone()[0])

            assert wait_until(lambda: old_backends_left() == 0, timeout=5), f"{old_backends_left()} old sessions"
    errors = [b.error for b in borrows if b.error is not None]
    assert not errors, f"{len(errors)} borrowers saw an error: {errors[:3]}"
    # A borrow that began after drain() returned (one lent while it ran may finish its lend later).
    again = [b for b in borrows if b.lent is not None and b.started > drained and b.session in old]
    assert not again, f"{len(again)} borrows after drain() got a connection opened before it"
    assert [b for b in borrows if b.lent is not None and b.lent > drained], "no borrow after drain()"
    assert evictions == 1, f"drain() is one eviction round, counted {evictions}"
    warnings = _eviction_warnings(caplog, pool)
    assert len(warnings) == 1 and "drain" in warnings[0].lower(), warnings


def test_an_old_primary_back_as_a_standby_gets_no_writes_and_serves_a_standby_pool(cluster):
    """(b, the other form) A switchover where the old primary is stopped, the standby promoted and the
    old primary restarted as its standby: libpq's read-write selection never picks it again, and a
    pool asking for a standby gets it."""
    old_port, new_port = cluster.primary.port, cluster.standby.port
    with ThreadSafeConnectionPool(maxconn=8, timeout=5, dsn=cluster.dsn("read-write"), name="failover-b2") as pool:
        with Writers(pool) as writers:
            writers.wait_for_writes()
            cluster.stop_primary(mode="fast")
            stopped = time.monotonic()
            cluster.promote_standby()
            cluster.restart_as_standby()
            writers.wait_for_writes(count=50)
        borrows = writers.snapshot()
    summary = f"errors per writer {_errors_per_writer(borrows)}"
    assert not [b for b in borrows if b.error is not None and b.started >= stopped], summary
    after = [b for b in borrows if b.lent is not None and b.lent > stopped]
    assert after and all(b.port == new_port for b in after), f"lent to {Counter(b.port for b in after)}"
    with ThreadSafeConnectionPool(maxconn=2, timeout=5, dsn=cluster.dsn("standby"), name="failover-reads") as reads:
        with reads.connection() as conn:
            assert conn.info.port == old_port
            assert ServerTarget({"dsn": cluster.dsn("standby")}).unwanted(conn) is None
