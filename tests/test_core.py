"""The faithful core: the reference pool's behaviour, and its defects fixed."""

from __future__ import annotations

import threading
import time

import psycopg2
import psycopg2.extensions
import psycopg2.pool
import pytest

import pgpool
from pgpool import PoolError, ThreadSafeConnectionPool

from .helpers import closed_port, rows, wait_until

pytestmark = pytest.mark.pgbouncer

# -- construction and attributes -------------------------------------------------------------------


def test_minconn_connections_are_opened_at_construction(pool_cls, dsn, sessions):
    with pool_cls(minconn=3, dsn=dsn) as pool:
        assert len(pool.idle_connections) == 3
        assert sessions(expect=3) == 3


def test_documented_attributes_exist_with_their_meaning(pool_cls, dsn):
    with pool_cls(2, 5, 30, dsn=dsn, connect_timeout=5) as pool:
        assert (pool.minconn, pool.maxconn, pool.idle_timeout) == (2, 5, 30)
        assert pool.connect_kwargs == {"dsn": dsn, "connect_timeout": 5}
        assert len(pool.idle_connections) == 2
        assert set(pool.return_times) == set(pool.idle_connections)
        conn = pool.getconn()
        assert conn in pool.connections_in_use
        assert conn not in pool.idle_connections
        assert conn not in pool.return_times
        pool.putconn(conn)
        assert pool.idle_connections[-1] is conn
        assert conn not in pool.connections_in_use


def test_dsn_defaults_to_empty_so_libpq_environment_variables_work(pool_cls, base_dsn, monkeypatch, app_name):
    params = psycopg2.extensions.parse_dsn(base_dsn)
    monkeypatch.setenv("PGHOST", params.get("host", "127.0.0.1"))
    monkeypatch.setenv("PGPORT", params.get("port", "5432"))
    monkeypatch.setenv("PGDATABASE", params.get("dbname", "postgres"))
    if "user" in params:
        monkeypatch.setenv("PGUSER", params["user"])
    monkeypatch.setenv("PGAPPNAME", app_name)
    with pool_cls(minconn=1) as pool:
        assert pool.connect_kwargs == {"dsn": ""}
        conn = pool.getconn()
        assert conn.info.port == int(params.get("port", "5432"))
        pool.putconn(conn)


def test_positional_sizes_work_on_both_classes(pool_cls, dsn):
    with pool_cls(1, 10, 60, dsn=dsn) as pool:
        assert (pool.minconn, pool.maxconn, pool.idle_timeout) == (1, 10, 60)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"minconn": -1}, "minconn"),
        ({"maxconn": 0}, "maxconn"),
        ({"minconn": 5, "maxconn": 2}, "maxconn must be >= minconn"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"timeout": -1}, "timeout"),
        ({"max_lifetime": 0}, "max_lifetime"),
        ({"leak_timeout": -3}, "leak_timeout"),
    ],
)
def test_bad_sizes_raise_value_error_naming_the_parameter_before_connecting(pool_cls, kwargs, parameter):
    # The dsn points at a closed port: had the pool tried to connect, OperationalError would come out.
    with pytest.raises(ValueError, match=parameter) as info:
        pool_cls(dsn=f"host=127.0.0.1 port={closed_port()}", name="sizes", **kwargs)
    assert "'sizes'" in str(info.value)


def test_non_callable_hooks_are_refused(pool_cls, dsn):
    for hook in ("check", "configure", "reset"):
        with pytest.raises(TypeError, match=hook):
            pool_cls(minconn=0, dsn=dsn, **{hook: "SELECT 1"})


def test_constructor_closes_what_it_opened_when_a_connect_fails(dsn, sessions, monkeypatch):
    real_connect = psycopg2.connect
    calls = []

    def connect_twice(**kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise psycopg2.OperationalError("server went away")
        return real_connect(**kwargs)

    monkeypatch.setattr(psycopg2, "connect", connect_twice)
    with pytest.raises(psycopg2.OperationalError):
        ThreadSafeConnectionPool(minconn=3, dsn=dsn)
    monkeypatch.undo()
    assert len(calls) == 3
    assert sessions(expect=0) == 0


def test_pool_error_is_also_a_psycopg2_pool_error():
    assert issubclass(PoolError, psycopg2.pool.PoolError)
    assert issubclass(pgpool.PoolTimeout, PoolError)
    assert issubclass(pgpool.PoolClosed, PoolError)
    assert PoolError.__module__ == "pgpool"


# -- getconn ---------------------------------------------------------------------------------------


def test_getconn_lends_the_most_recently_returned_connection(pool_cls, dsn):
    with pool_cls(minconn=0, dsn=dsn) as pool:
        first, second = pool.getconn(), pool.getconn()
        pool.putconn(first)
        pool.putconn(second)
        assert pool.getconn() is second
        assert pool.getconn() is first


def test_getconn_opens_a_connection_when_none_is_idle(pool_cls, dsn, sessions):
    with pool_cls(minconn=0, maxconn=3, dsn=dsn) as pool:
        conns = [pool.getconn() for _ in range(3)]
        assert len({id(c) for c in conns}) == 3
        assert sessions(expect=3) == 3


def test_getconn_raises_pool_error_when_maxconn_are_in_use(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=2, dsn=dsn, name="tiny") as pool:
        held = [pool.getconn(), pool.getconn()]
        with pytest.raises(PoolError, match=r"connection pool exhausted.*'tiny'.*maxconn=2"):
            pool.getconn()
        assert len(held) == 2


def test_maxconn_counts_connections_taken_from_the_idle_list(pool_cls, dsn, sessions):
    """The reference only counted freshly opened connections, so idle ones let maxconn be exceeded."""
    with pool_cls(minconn=2, maxconn=2, dsn=dsn) as pool:
        held = [pool.getconn(), pool.getconn()]  # both come from the idle list
        with pytest.raises(PoolError):
            pool.getconn()
        assert sessions(expect=2) == 2
        assert all(not c.closed for c in held)


def test_getconn_skips_and_closes_a_connection_idle_longer_than_idle_timeout(pool_cls, dsn):
    with pool_cls(minconn=0, idle_timeout=0.2, dsn=dsn) as pool:
        stale = pool.getconn()
        pool.putconn(stale)
        time.sleep(0.4)
        fresh = pool.getconn()
        assert fresh is not stale
        assert stale.closed


def test_getconn_skips_and_closes_an_idle_connection_that_is_in_a_transaction(pool_cls, dsn):
    with pool_cls(minconn=0, dsn=dsn) as pool:
        conn = pool.getconn()
        pool.putconn(conn)
        conn.cursor().execute("SELECT 1")  # behind the pool's back: now INTRANS while idle
        fresh = pool.getconn()
        assert fresh is not conn
        assert conn.closed


# -- putconn ---------------------------------------------------------------------------------------


def test_putconn_rolls_back_what_the_borrower_did_not_commit(pool_cls, dsn, admin, table):
    with pool_cls(minconn=0, dsn=dsn) as pool:
        conn = pool.getconn()
        conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
        pool.putconn(conn)
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert rows(admin, table) == []
        assert pool.idle_connections[-1] is conn


def test_putconn_of_a_connection_in_a_failed_transaction_rolls_back_and_keeps_it(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        conn = pool.getconn()
        with pytest.raises(psycopg2.DataError):
            conn.cursor().execute("SELECT 1/0")
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        pool.putconn(conn)
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert list(pool.idle_connections) == [conn]
        with pool.connection() as again, again.cursor() as cur:
            cur.execute("SELECT 1")


def test_putconn_discards_a_broken_connection_and_frees_its_slot(pool_cls, dsn, terminate):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        conn = pool.getconn()
        terminate(conn)
        with pytest.raises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
        pool.putconn(conn)
        assert conn.closed
        assert conn not in pool.idle_connections
        assert pool.stats()["broken_discarded"] == 1
        pool.putconn(pool.getconn())  # the slot came back


def test_putconn_of_a_connection_broken_mid_transaction_does_not_raise(pool_cls, dsn, terminate, table):
    """The reference called rollback() on it, which raised and leaked the slot."""
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        conn = pool.getconn()
        conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
        terminate(conn)
        time.sleep(0.1)
        pool.putconn(conn)
        assert conn.closed
        assert pool.stats()["in_use"] == 0
        pool.putconn(pool.getconn())


def test_putconn_of_a_closed_connection_discards_it(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        conn = pool.getconn()
        conn.close()
        pool.putconn(conn)
        assert not pool.idle_connections
        pool.putconn(pool.getconn())


def test_putconn_with_close_discards_the_connection_and_frees_its_slot(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        conn = pool.getconn()
        pool.putconn(conn, close=True)
        assert conn.closed
        assert not pool.idle_connections
        again = pool.getconn()
        assert again is not conn
        pool.putconn(again)


def test_putconn_twice_raises_and_keeps_one_copy(pool_cls, dsn):
    with pool_cls(minconn=0, dsn=dsn, name="twice") as pool:
        conn = pool.getconn()
        pool.putconn(conn)
        with pytest.raises(PoolError, match=r"already returned.*'twice'"):
            pool.putconn(conn)
        assert list(pool.idle_connections) == [conn]
        first, second = pool.getconn(), pool.getconn()
        assert first is not second


def test_putconn_of_a_foreign_connection_raises_and_leaves_it_open(pool_cls, dsn, sessions):
    foreign = psycopg2.connect(dsn)
    try:
        with pool_cls(minconn=0, dsn=dsn, name="mine") as pool:
            with pytest.raises(PoolError, match=r"not lent by pool 'mine'"):
                pool.putconn(foreign)
            assert not foreign.closed
            assert not pool.idle_connections
            assert sessions(expect=1) == 1
    finally:
        foreign.close()


def test_putconn_of_a_connection_from_another_pool_raises(pool_cls, dsn):
    with pool_cls(minconn=0, dsn=dsn) as one, pool_cls(minconn=0, dsn=dsn) as other:
        conn = one.getconn()
        with pytest.raises(PoolError):
            other.putconn(conn)
        one.putconn(conn)


@pytest.mark.parametrize("value", [None, "conn", 42])
def test_putconn_of_something_not_a_connection_raises_pool_error(pool_cls, dsn, value):
    with pool_cls(minconn=0, dsn=dsn, name="typed") as pool:
        with pytest.raises(PoolError, match=r"'typed' can only take back a psycopg2 connection"):
            pool.putconn(value)


def test_idle_timeout_zero_closes_returned_connections_beyond_minconn(pool_cls, dsn, sessions):
    with pool_cls(minconn=1, idle_timeout=0, dsn=dsn) as pool:
        a, b = pool.getconn(), pool.getconn()
        pool.putconn(a)
        assert list(pool.idle_connections) == [a]
        pool.putconn(b)
        assert b.closed
        assert list(pool.idle_connections) == [a]
        assert sessions(expect=1) == 1


def test_putconn_drops_idle_connections_older_than_idle_timeout(pool_cls, dsn):
    with pool_cls(minconn=0, idle_timeout=0.3, dsn=dsn) as pool:
        old, new = pool.getconn(), pool.getconn()
        pool.putconn(old)
        time.sleep(0.5)
        pool.putconn(new)
        assert old.closed
        assert list(pool.idle_connections) == [new]


def test_putconn_reopens_connections_until_minconn_exist(pool_cls, dsn, terminate, sessions):
    with pool_cls(minconn=2, dsn=dsn) as pool:
        a = pool.getconn()
        terminate(a)
        with pytest.raises(psycopg2.OperationalError):
            a.cursor().execute("SELECT 1")
        pool.putconn(a)  # broken: discarded, then refilled by the housekeeper, at once
        assert a.closed
        assert wait_until(lambda: len(pool.idle_connections) == 2, timeout=5)
        assert sessions(expect=2) == 2


def test_putconn_succeeds_when_the_minconn_refill_fails_and_retries_later(pool_cls, dsn, terminate, caplog):
    with pool_cls(minconn=1, dsn=dsn, connect_timeout=2) as pool:
        conn = pool.getconn()
        terminate(conn)
        with pytest.raises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
        pool.connect_kwargs["port"] = closed_port()  # the server is "down" for new connections
        started = time.monotonic()
        pool.putconn(conn)  # must not raise, nor wait for a connect
        assert time.monotonic() - started < 1
        assert wait_until(lambda: pool.stats()["connect_errors"] >= 1, timeout=5)
        assert "connect failed" in caplog.text
        del pool.connect_kwargs["port"]  # the server is back
        again = pool.getconn()
        pool.putconn(again)
        assert len(pool.idle_connections) >= 1


def test_clear_closes_every_idle_connection(pool_cls, dsn, sessions):
    with pool_cls(minconn=0, dsn=dsn) as pool:  # minconn=0: the housekeeper does not refill
        lent, *others = [pool.getconn() for _ in range(3)]
        for conn in others:
            pool.putconn(conn)
        idle = list(pool.idle_connections)
        assert len(idle) == 2
        pool.clear()
        assert all(c.closed for c in idle)
        assert not pool.idle_connections
        assert not lent.closed
        assert sessions(expect=1) == 1
        pool.putconn(lent)


# -- threads ---------------------------------------------------------------------------------------


def test_threads_never_share_a_connection_and_the_server_never_sees_more_than_maxconn(dsn, sessions):
    """The reference reached 16 server sessions with 16 threads and maxconn=5."""
    threads_count, maxconn, rounds = 16, 5, 40
    holders: dict[int, int] = {}
    holders_lock = threading.Lock()
    errors: list[BaseException] = []
    peak_sessions = 0
    stop = threading.Event()
    barrier = threading.Barrier(threads_count)

    with ThreadSafeConnectionPool(minconn=maxconn, maxconn=maxconn, timeout=10, dsn=dsn) as pool:

        def work(n: int) -> None:
            try:
                barrier.wait(timeout=10)
                for _ in range(rounds):
                    conn = pool.getconn()
                    with holders_lock:
                        assert id(conn) not in holders, "a connection was lent to two threads at once"
                        holders[id(conn)] = n
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_backend_pid()")
                        assert cur.fetchone()[0] == conn.info.backend_pid
                    with holders_lock:
                        del holders[id(conn)]
                    pool.putconn(conn)
            except BaseException as exc:
                errors.append(exc)

        def sample() -> None:
            nonlocal peak_sessions
            while not stop.is_set():
                peak_sessions = max(peak_sessions, sessions())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads_count)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=60)
        stop.set()
        sampler.join(timeout=10)
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in workers)
        assert 1 <= peak_sessions <= maxconn
        stats = pool.stats()
        assert stats["checkouts"] == threads_count * rounds
        assert stats["connections_opened"] == maxconn
        assert stats["idle"] == maxconn and stats["in_use"] == 0
