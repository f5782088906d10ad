"""Waiting instead of failing, and connects outside the lock."""

from __future__ import annotations

import _thread
import threading
import time

import psycopg2
import pytest

from pgpool import ConnectionPool, PoolTimeout, ThreadSafeConnectionPool

from .helpers import closed_port, join_all

pytestmark = pytest.mark.pgbouncer


def test_getconn_waits_for_a_connection_to_come_back(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=10, dsn=dsn) as pool:
        held = pool.getconn()
        timer = threading.Timer(0.2, pool.putconn, args=(held,))
        timer.start()
        got = pool.getconn()
        timer.join(timeout=5)
        assert got is held
        assert pool.stats()["wait_ms_total"] > 0


def test_waiters_are_served_first_come_first_served(dsn):
    order: list[int] = []
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=20, dsn=dsn) as pool:
        held = pool.getconn()

        def wait_in_line(n: int) -> None:
            conn = pool.getconn()
            order.append(n)
            pool.putconn(conn)

        threads = []
        for n in range(6):
            t = threading.Thread(target=wait_in_line, args=(n,))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 5
            while pool.stats()["waiting"] < n + 1 and time.monotonic() < deadline:
                time.sleep(0.005)  # queue them one after the other
        assert pool.stats()["waiting"] == 6
        pool.putconn(held)
        join_all(threads)
        assert order == list(range(6))


def test_a_waiter_that_timed_out_never_swallows_a_connection(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        held = pool.getconn()
        for _ in range(20):
            with pytest.raises(PoolTimeout):
                pool.getconn(timeout=0.01)
        pool.putconn(held)
        assert pool.stats()["waiting"] == 0
        assert pool.getconn(timeout=0) is held  # still there, at once


def test_a_waiter_served_at_its_deadline_keeps_the_connection(dsn):
    """Hand-over and time-out race: whichever wins, the connection is never lost."""
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        for delay in (0.045, 0.05, 0.055):
            held = pool.getconn()
            timer = threading.Timer(delay, pool.putconn, args=(held,))
            timer.start()
            try:
                got = pool.getconn(timeout=0.05)
            except PoolTimeout:
                got = None
            timer.join(timeout=5)
            if got is not None:
                pool.putconn(got)
            assert pool.stats()["in_use"] == 0
            assert list(pool.idle_connections) == [held]


def test_pool_timeout_names_the_pool_the_wait_and_maxconn(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, timeout=0.1, name="reports", dsn=dsn) as pool:
        held = [pool.getconn(), pool.getconn()]
        with pytest.raises(PoolTimeout, match=r"pool 'reports' after 0\.10 sec \(maxconn=2, 2 in use\)"):
            pool.getconn()
        assert pool.stats()["timeouts"] == 1
        for conn in held:
            pool.putconn(conn)


def test_timeout_can_be_given_per_call(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=30, dsn=dsn) as pool:
        held = pool.getconn()
        for borrow in (pool.getconn, pool.connection, pool.transaction):
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                result = borrow(timeout=0.05)
                if not isinstance(result, psycopg2.extensions.connection):
                    with result:
                        pass
            assert time.monotonic() - started < 10
        pool.putconn(held)


def test_single_threaded_pool_refuses_to_wait(dsn):
    with pytest.raises(ValueError, match="timeout must be 0 for a ConnectionPool"):
        ConnectionPool(minconn=0, timeout=1, dsn=dsn)
    with ConnectionPool(minconn=0, dsn=dsn) as pool:
        with pytest.raises(ValueError, match="timeout must be 0"):
            pool.getconn(timeout=1)


def test_a_slot_freed_by_a_garbage_collected_leak_reaches_a_waiter(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=10, dsn=dsn) as pool:
        borrowed = threading.Event()

        def leak() -> None:
            conn = pool.getconn()
            borrowed.set()
            time.sleep(0.2)
            del conn  # never returned: the pool holds it weakly, so the slot frees

        leaker = threading.Thread(target=leak)
        leaker.start()
        assert borrowed.wait(timeout=10)
        conn = pool.getconn(timeout=5)
        join_all([leaker])
        assert pool.stats()["wait_ms_total"] >= 100
        pool.putconn(conn)


# -- connects outside the lock ---------------------------------------------------------------------


class SlowConnect:
    """psycopg2.connect taking `delay` seconds, counting how many run at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.real = psycopg2.connect
        self.running = 0
        self.peak = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay)
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def test_a_burst_opens_connections_in_parallel_never_more_than_maxconn(dsn, monkeypatch, sessions):
    slow = SlowConnect(0.3)
    monkeypatch.setattr(psycopg2, "connect", slow)
    with ThreadSafeConnectionPool(minconn=0, maxconn=4, timeout=20, dsn=dsn) as pool:
        barrier = threading.Barrier(10)

        def borrow() -> None:
            barrier.wait(timeout=10)
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.05)")

        threads = [threading.Thread(target=borrow) for _ in range(10)]
        for t in threads:
            t.start()
        join_all(threads)
        assert slow.peak == 4  # in parallel, and bounded by maxconn
        assert slow.calls == 4
        assert sessions(expect=4) == 4


@pytest.mark.timing
def test_a_slow_connect_does_not_stall_threads_that_can_use_an_idle_connection(dsn, monkeypatch):
    with ThreadSafeConnectionPool(minconn=1, maxconn=3, timeout=10, dsn=dsn) as pool:
        slow = SlowConnect(1.0)
        monkeypatch.setattr(psycopg2, "connect", slow)
        first = pool.getconn()  # the idle one
        opener = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
        opener.start()
        while slow.running == 0:
            time.sleep(0.005)
        started = time.monotonic()
        pool.putconn(first)  # while the other thread is connecting
        again = pool.getconn()
        elapsed = time.monotonic() - started
        pool.putconn(again)
        join_all([opener])
        assert again is first
        assert elapsed < 0.5, f"returning and taking an idle connection took {elapsed:.3f} s during a connect"


# -- server down -----------------------------------------------------------------------------------


def test_connect_error_propagates_without_timeout(dsn):
    with ThreadSafeConnectionPool(minconn=0, dsn=dsn, port=closed_port()) as pool:
        with pytest.raises(psycopg2.OperationalError):
            pool.getconn()
        assert pool.stats()["connect_errors"] == 1
        assert pool.stats()["opening"] == 0


@pytest.mark.timing
def test_connect_is_retried_with_backoff_until_the_timeout_then_pool_timeout_chains_the_error(dsn):
    with ThreadSafeConnectionPool(minconn=0, dsn=dsn, port=closed_port(), name="down") as pool:
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match=r"pool 'down'.*last connect error") as info:
            pool.getconn(timeout=0.6)
        elapsed = time.monotonic() - started
        assert isinstance(info.value.__cause__, psycopg2.OperationalError)
        errors = pool.stats()["connect_errors"]
        assert 3 <= errors <= 12, f"{errors} connect attempts in {elapsed:.2f} s: no backoff?"
        assert pool.stats()["opening"] == 0


@pytest.mark.embedded
def test_getconn_waits_through_a_server_restart(embedded, dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as pool:
        embedded.stop()
        restarter = threading.Timer(0.5, embedded.start)
        restarter.start()
        try:
            with pool.connection(timeout=30) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        finally:
            restarter.join(timeout=30)
            if not embedded.is_running():
                embedded.start()
        assert pool.stats()["connect_errors"] >= 1


# -- interrupted threads ---------------------------------------------------------------------------


def test_a_waiter_interrupted_by_keyboard_interrupt_leaves_the_line_and_loses_nothing(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=10, dsn=dsn) as pool:
        held = pool.getconn()
        interrupter = threading.Timer(0.1, _thread.interrupt_main)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()
        interrupter.join(timeout=5)
        assert pool.stats()["waiting"] == 0
        pool.putconn(held)
        assert pool.getconn(timeout=0) is held  # not handed to the waiter that left


def test_a_connect_interrupted_by_keyboard_interrupt_gives_its_slot_back(dsn, monkeypatch):
    real_connect = psycopg2.connect
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:

        def interrupted(**kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(psycopg2, "connect", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()
        assert pool.stats()["opening"] == 0
        monkeypatch.setattr(psycopg2, "connect", real_connect)
        pool.putconn(pool.getconn())


def test_a_cleanup_interrupted_by_keyboard_interrupt_discards_the_connection(dsn):
    def reset(conn):
        raise KeyboardInterrupt

    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, reset=reset) as pool:
        conn = pool.getconn()
        with pytest.raises(KeyboardInterrupt):
            pool.putconn(conn)
        assert conn.closed
        assert pool.stats()["in_use"] == 0
