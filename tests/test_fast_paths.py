"""The lock-free fast paths (issue "Core v2") against a real server: what they skip and what they keep."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
import pytest

import pgpool
from pgpool import ThreadSafeConnectionPool

from .helpers import join_all


class CountingLock:
    """Stands in for the pool's lock and counts how often it is taken."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> bool:
        self.taken += 1
        return self.lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.lock.__exit__(*exc)

    def acquire(self, *args: Any) -> bool:
        self.taken += 1
        return self.lock.acquire(*args)

    def release(self) -> None:
        self.lock.release()


@pytest.fixture
def warm_pool(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn, timeout=5) as pool:
        pool.putconn(pool.getconn())  # the first getconn starts the housekeeper: the slow path
        yield pool


def test_borrowing_an_idle_connection_and_returning_it_clean_takes_no_lock(warm_pool):
    counter = CountingLock()
    warm_pool._state.lock = counter
    for _ in range(50):
        conn = warm_pool.getconn()
        warm_pool.putconn(conn)
        with warm_pool.connection():
            pass
    assert counter.taken == 0


def test_a_connection_returned_in_a_transaction_is_rolled_back_without_the_lock(warm_pool, admin):
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS fast_rollback (v int)")
        cur.execute("TRUNCATE fast_rollback")
    counter = CountingLock()
    warm_pool._state.lock = counter
    conn = warm_pool.getconn()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO fast_rollback VALUES (1)")
    warm_pool.putconn(conn)
    assert counter.taken == 0
    again = warm_pool.getconn()
    assert again is conn and again.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    with again.cursor() as cur:
        cur.execute("SELECT count(*) FROM fast_rollback")
        assert cur.fetchone()[0] == 0
    warm_pool.putconn(again)


def test_a_connection_killed_inside_its_transaction_is_discarded_on_return(warm_pool, terminate):
    conn = warm_pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # a transaction is open: the return must roll it back
    terminate(conn)
    warm_pool.putconn(conn)  # the rollback fails: discarded, not raised
    assert warm_pool.stats()["broken_discarded"] == 1
    fresh = warm_pool.getconn()
    assert fresh is not conn
    with fresh.cursor() as cur:
        cur.execute("SELECT 1")
    warm_pool.putconn(fresh)


@pytest.mark.parametrize("how", ["committed", "autocommit"])
def test_a_client_encoding_set_in_sql_is_restored_by_a_return_that_rolls_back_nothing(warm_pool, how):
    conn = warm_pool.getconn()
    encoding = conn.encoding
    if how == "autocommit":
        conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET client_encoding TO 'LATIN1'")
    if how == "committed":
        conn.commit()
    else:
        conn.autocommit = False
    warm_pool.putconn(conn)
    again = warm_pool.getconn()
    assert again is conn
    assert again.get_parameter_status("client_encoding") == encoding == again.encoding
    warm_pool.putconn(again)


def test_a_set_client_encoding_undone_by_the_rollback_keeps_the_connection_on_the_fast_path(warm_pool):
    conn = warm_pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SET client_encoding TO 'LATIN1'")  # inside the transaction the return rolls back
    warm_pool.putconn(conn)
    again = warm_pool.getconn()
    assert again is conn and again.get_parameter_status("client_encoding") == again.encoding
    warm_pool.putconn(again)


def test_two_threads_returning_one_connection_at_once_one_is_refused_every_time(warm_pool):
    """The lent table's atomic pop decides: exactly one putconn wins, the other raises PoolError,
    and the connection is idle once (never twice in the idle list)."""
    for _ in range(40):
        conn = warm_pool.getconn()
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def give_back(conn: Any = conn, barrier: threading.Barrier = barrier, outcomes: list[str] = outcomes) -> None:
            barrier.wait(5)
            try:
                warm_pool.putconn(conn)
                outcomes.append("ok")
            except pgpool.PoolError:
                outcomes.append("refused")

        threads = [threading.Thread(target=give_back) for _ in range(2)]
        for thread in threads:
            thread.start()
        join_all(threads)
        assert sorted(outcomes) == ["ok", "refused"]
        assert list(warm_pool.idle_connections).count(conn) == 1
    assert warm_pool.stats()["in_use"] == 0


# -- found by a hostile review of the fast paths ----------------------------------------------------


@pytest.mark.parametrize("pool_cls", [pgpool.ConnectionPool, ThreadSafeConnectionPool])
def test_a_keyed_connection_returned_without_its_key_is_never_lent_twice(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=3, dsn=dsn) as pool:
        pool.putconn(pool.getconn())
        keyed = pool.getconn("a")
        pool.putconn(keyed)  # no key: the pool must forget "a" all the same
        plain = pool.getconn()
        again = pool.getconn("a")
        assert plain is not again
        pool.putconn(plain)
        pool.putconn(again, "a")


@pytest.mark.parametrize("configure", [None, lambda conn: setattr(conn, "autocommit", True)])
def test_a_transaction_begun_in_sql_under_autocommit_never_reaches_the_next_borrower(dsn, admin, configure):
    """psycopg2's rollback() sends nothing when it believes no transaction is open."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS fast_sql_begin (v int)")
        cur.execute("TRUNCATE fast_sql_begin")
    with ThreadSafeConnectionPool(minconn=1, maxconn=3, dsn=dsn, configure=configure) as pool:
        pool.putconn(pool.getconn())
        conn = pool.getconn()
        was = conn.autocommit
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("INSERT INTO fast_sql_begin VALUES (1)")
        conn.autocommit = was
        pool.putconn(conn)
        nxt = pool.getconn()
        assert nxt.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with nxt.cursor() as cur:
            cur.execute("SELECT 1")
        nxt.commit()
        pool.putconn(nxt)
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM fast_sql_begin")
        assert cur.fetchone()[0] == 0


def test_notifications_delivered_by_the_returns_rollback_never_reach_the_next_borrower(warm_pool, admin):
    conn = warm_pool.getconn()
    with conn.cursor() as cur:
        cur.execute("LISTEN fast_review")
    conn.commit()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # a transaction left open: the return rolls it back, and reads the socket
    with admin.cursor() as cur:
        cur.execute("NOTIFY fast_review, 'for the listener'")
    time.sleep(0.05)
    warm_pool.putconn(conn)
    nxt = warm_pool.getconn()
    assert nxt.notifies == []
    warm_pool.putconn(nxt)


def test_a_bad_timeout_is_refused_even_when_a_connection_is_idle(dsn):
    with pgpool.ConnectionPool(minconn=1, maxconn=2, dsn=dsn) as pool:
        pool.putconn(pool.getconn())
        for bad in (5, -1, float("nan"), "soon"):
            with pytest.raises(ValueError, match="timeout"):
                pool.getconn(timeout=bad)
        assert pool.stats()["in_use"] == 0


@pytest.mark.parametrize("pool_cls", [pgpool.ConnectionPool, ThreadSafeConnectionPool])
def test_checkouts_count_only_connections_handed_to_borrowers(pool_cls, dsn, terminate):
    """A connection found dead before a lend was never lent: it is a discard, not a checkout."""
    with pool_cls(minconn=1, maxconn=3, dsn=dsn) as pool:
        conn = pool.getconn()
        pool.putconn(conn)
        terminate(conn)
        time.sleep(0.01)  # past the probe interval
        pool.putconn(pool.getconn())
        stats = pool.stats()
        assert (stats["checkouts"], stats["broken_discarded"]) == (2, 1)
