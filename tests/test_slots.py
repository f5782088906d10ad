"""maxconn bounds what the server sees, and no slot is ever lost: slow logging, interrupts in the
housekeeper's start and in garbage collection, dead hand-overs, refills that hold the only slot."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

import pgpool
from pgpool import ConnectionPool, PoolError, ThreadSafeConnectionPool

from .helpers import join_all, wait_until

pytestmark = pytest.mark.needs_session


class SlowCloseLog(logging.Handler):
    """Sleeps on every "closing connection" record, counting the server's sessions meanwhile."""

    def __init__(self, count_sessions, delay: float = 0.3) -> None:
        super().__init__(level=logging.INFO)
        self.count_sessions = count_sessions
        self.delay = delay
        self.seen: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "closing connection" in record.getMessage():
            time.sleep(self.delay)
            self.seen.append(self.count_sessions())


@pytest.fixture
def slow_close_log(sessions):
    logger = logging.getLogger("pgpool")
    handler = SlowCloseLog(sessions)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def borrow_in_thread(pool, got: list, timeout: float = 5) -> threading.Thread:
    def run() -> None:
        with pool.connection(timeout=timeout) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            got.append(conn.info.backend_pid)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_slow_log_handler_never_lets_the_server_see_more_than_maxconn_sessions(dsn, sessions, slow_close_log):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=5) as pool:
        conn = pool.getconn()
        got: list[int] = []
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], sessions())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            waiter = borrow_in_thread(pool, got)
            assert wait_until(lambda: pool.stats()["waiting"] == 1)
            pool.putconn(conn, close=True)  # the slot goes to the waiter, after the close is logged
            join_all([waiter])
        finally:
            stop.set()
            join_all([sampler])
        assert got and got[0] != conn.info.backend_pid
        assert peak[0] <= 1, f"the server saw {peak[0]} sessions with maxconn=1"


def test_clear_with_a_slow_log_handler_keeps_the_sessions_within_maxconn(dsn, sessions, slow_close_log):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn, timeout=5) as pool:
        a, b = pool.getconn(), pool.getconn()
        pool.putconn(a)
        pool.putconn(b)
        got: list[int] = []
        clearing = threading.Thread(target=pool.clear)
        clearing.start()
        borrowers = [borrow_in_thread(pool, got) for _ in range(2)]
        join_all([clearing, *borrowers])
        assert len(got) == 2
        assert slow_close_log.seen and max(slow_close_log.seen) <= 2, slow_close_log.seen


def test_a_housekeeper_start_that_fails_neither_fails_the_borrower_nor_stops_close(dsn, sessions, monkeypatch):
    real_start = threading.Thread.start
    calls = []

    def interrupted_start(self, *args, **kwargs):
        if "housekeeper" in self.name and not calls:
            calls.append(self.name)
            raise KeyboardInterrupt
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    pool = ThreadSafeConnectionPool(minconn=1, maxconn=2, dsn=dsn)
    conn = pool.getconn()  # the start fails in the launcher thread, not in this one, and is tried again
    assert calls and pool._housekeeper.started
    pool.putconn(conn)
    assert [t for t in threading.enumerate() if t.name == f"{pool.name}-housekeeper"]
    pool.close()  # used to raise "cannot join thread before it is started" and leave sessions open
    assert sessions(expect=0) == 0


def test_an_interrupt_while_the_housekeeper_starts_leaves_the_pool_working(dsn, sessions, monkeypatch):
    """Interrupted right after it launched the housekeeper, the borrower loses nothing, and the
    housekeeper that did start is the pool's one housekeeper."""
    import _thread

    real = _thread.start_new_thread
    calls = []

    def launch_then_interrupt(*args, **kwargs):
        ident = real(*args, **kwargs)
        if not calls:
            calls.append(ident)
            raise KeyboardInterrupt
        return ident

    monkeypatch.setattr(_thread, "start_new_thread", launch_then_interrupt)
    pool = ThreadSafeConnectionPool(minconn=1, maxconn=2, dsn=dsn)
    with pytest.raises(KeyboardInterrupt):
        pool.getconn()
    assert calls and pool.stats()["in_use"] == 0
    assert wait_until(lambda: pool._housekeeper._thread is not None, timeout=5)
    for _ in range(3):
        pool.putconn(pool.getconn())
    assert pool._housekeeper.started
    assert len([t for t in threading.enumerate() if t.name == f"{pool.name}-housekeeper"]) == 1
    pool.close()
    assert sessions(expect=0) == 0


def test_an_interrupt_in_the_collector_cannot_lose_the_slot_of_a_leaked_connection(dsn):
    """The weakref callback is one C call (deque.append): no Python code in it to interrupt."""
    pgpool_dir = os.path.dirname(pgpool.__file__)

    def interrupt_any_pgpool_call(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(pgpool_dir):
            raise KeyboardInterrupt
        return None

    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=2) as pool:
        leaked = pool.getconn()
        sys.settrace(interrupt_any_pgpool_call)
        try:
            del leaked
            gc.collect()
        finally:
            sys.settrace(None)
        conn = pool.getconn()
        pool.putconn(conn)
        assert pool.stats()["leaked"] == 1


def test_a_leaked_connection_collected_without_putconn_is_reported_once_at_warning(dsn, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool")
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, name="forgetful") as pool:
        pool.getconn()  # dropped at once
        gc.collect()
        pool.putconn(pool.getconn())
        pool.putconn(pool.getconn())
    reports = [r.getMessage() for r in caplog.records if "garbage collected" in r.getMessage()]
    assert len(reports) == 1 and "'forgetful'" in reports[0]


def test_a_waiter_handed_a_dead_connection_keeps_its_place_in_line(dsn, terminate):
    order: list[str] = []
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=10) as pool:
        held = pool.getconn()

        def wait_and_hold(label: str) -> None:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                order.append(label)
                time.sleep(0.2)

        first = threading.Thread(target=wait_and_hold, args=("first",))
        first.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 1)
        second = threading.Thread(target=wait_and_hold, args=("second",))
        second.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 2)
        terminate(held)  # the holder does not notice: its connection still looks idle
        pool.putconn(held)  # handed to the first waiter, whose probe finds it dead
        join_all([first, second])
    assert order == ["first", "second"]


def slow_connect(monkeypatch, delay: float) -> None:
    real = psycopg2.connect

    def connect(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(psycopg2, "connect", connect)


@pytest.mark.parametrize("pool_cls", [ConnectionPool, ThreadSafeConnectionPool], ids=["plain", "threadsafe"])
def test_getconn_never_reports_exhaustion_while_a_refill_holds_the_only_slot(pool_cls, dsn, monkeypatch):
    with pool_cls(1, 1, dsn=dsn) as pool:
        slow_connect(monkeypatch, 0.2)
        conn = pool.getconn()
        conn.close()
        pool.putconn(conn)  # the plain pool reopens here; the thread-safe one in the background
        again = pool.getconn()  # not "exhausted (0 lent, 1 opening)"
        assert not again.closed
        pool.putconn(again)
        pool.clear()  # minconn == maxconn: the refill takes the only slot again
        third = pool.getconn()
        pool.putconn(third)


def test_putconn_of_a_closed_connection_leaves_minconn_idle_in_the_plain_pool(dsn):
    with ConnectionPool(1, 1, idle_timeout=0, dsn=dsn) as pool:
        conn = pool.getconn()
        conn.close()
        pool.putconn(conn)
        assert len(pool.idle_connections) == 1 and pool.idle_connections[0] is not conn


@pytest.mark.timing
def test_idle_timeout_never_closes_what_minconn_would_reopen(dsn):
    with ThreadSafeConnectionPool(minconn=2, maxconn=4, idle_timeout=0.1, dsn=dsn) as pool:
        pids = sorted(c.info.backend_pid for c in pool.idle_connections)
        extra = [pool.getconn() for _ in range(4)]
        for conn in extra:
            pool.putconn(conn)
        assert wait_until(lambda: pool.stats()["idle"] == 2, timeout=5)
        time.sleep(0.6)  # several idle_timeouts on a quiet pool
        stats = pool.stats()
        assert stats["connections_opened"] == 4 and stats["connections_closed"] == 2, stats
        kept = sorted(c.info.backend_pid for c in pool.idle_connections)
        assert len(kept) == 2 and all(not c.closed for c in pool.idle_connections)
        assert set(kept) <= set(pids) | {c.info.backend_pid for c in extra}


def test_getconn_with_a_key_returns_the_same_connection_until_it_is_put_back(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as pool:
        a = pool.getconn("worker-1")
        assert pool.getconn("worker-1") is a
        b = pool.getconn("worker-2")
        assert b is not a
        pool.putconn(a, "worker-1")  # psycopg2.pool's putconn(conn, key): not close=True
        assert not a.closed and a in pool.idle_connections
        pool.putconn(key="worker-2")
        assert not b.closed and pool.stats()["in_use"] == 0
        with pytest.raises(PoolError, match="no connection is lent under key"):
            pool.putconn(key="worker-3")


def test_closeall_closes_the_pool(dsn, sessions):
    pool = ThreadSafeConnectionPool(minconn=2, dsn=dsn)
    pool.closeall()
    assert pool.closed and sessions(expect=0) == 0


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "psycopg2_pool_tests.py"


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"the reference suite is not at {REFERENCE}")
def test_the_reference_test_suite_passes_as_it_is(base_dsn):
    """psycopg2_pool's own tests, run from shared/ (not copied: it is LGPL), against the test server."""
    params = psycopg2.extensions.parse_dsn(base_dsn)
    env = dict(os.environ)
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("dbname", "PGDATABASE"), ("user", "PGUSER")):
        if key in params:
            env[var] = params[key]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REFERENCE)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "10 passed" in done.stdout
