"""Handing out only healthy connections: probe, check, lifetime, configure, settings restore, reset."""

from __future__ import annotations

import os
import time

import psycopg2
import psycopg2.extensions
import pytest

import pgpool
from pgpool import ThreadSafeConnectionPool

pytestmark = pytest.mark.pgbouncer


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def show(conn, setting: str) -> str:
    with conn.cursor() as cur:
        cur.execute(f"SHOW {setting}")
        value = str(cur.fetchone()[0])
    conn.rollback()
    return value


def test_getconn_replaces_an_idle_connection_the_server_terminated(pool_cls, dsn, terminate):
    with pool_cls(minconn=1, dsn=dsn) as pool:
        dead = pool.idle_connections[-1]
        terminate(dead)
        time.sleep(0.2)  # let the FATAL message reach the socket
        with pool.connection() as conn:
            assert conn is not dead
            assert backend_pid(conn) > 0
        assert dead.closed
        assert pool.stats()["broken_discarded"] == 1


@pytest.mark.needs_session
def test_probe_keeps_a_healthy_connection_that_received_a_notification(pool_cls, dsn, admin):
    """A readable socket is not always a dead one: the real check tells them apart."""
    with pool_cls(minconn=0, dsn=dsn) as pool:
        with pool.connection() as conn:
            conn.autocommit = True
            conn.cursor().execute("LISTEN pgpool_probe")
        with admin.cursor() as cur:
            cur.execute("NOTIFY pgpool_probe, 'hello'")
        time.sleep(0.2)
        with pool.connection() as again:
            assert again is conn
            assert [n.payload for n in again.notifies] == ["hello"]
        assert pool.stats()["broken_discarded"] == 0


def test_check_hook_failure_discards_the_connection_and_tries_the_next(pool_cls, dsn):
    rejected = []

    def check(conn):
        if not rejected:
            rejected.append(conn)
            raise RuntimeError("not this one")

    with pool_cls(minconn=2, dsn=dsn, check=check) as pool:
        with pool.connection() as conn:
            assert conn is not rejected[0]
        assert rejected[0].closed
        assert pool.stats()["broken_discarded"] == 1


def test_check_connection_raises_on_a_dead_connection_and_leaves_a_live_one_idle(dsn, terminate):
    conn = psycopg2.connect(dsn)
    try:
        pgpool.check_connection(conn)
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert conn.autocommit is False
        terminate(conn)
        with pytest.raises(psycopg2.OperationalError):
            pgpool.check_connection(conn)
    finally:
        conn.close()


def test_check_connection_as_the_check_hook_replaces_a_silently_dead_connection(pool_cls, dsn, terminate):
    with pool_cls(minconn=1, dsn=dsn, check=pgpool.check_connection) as pool:
        dead = pool.idle_connections[-1]
        terminate(dead)
        with pool.connection() as conn:
            assert conn is not dead


def test_max_lifetime_retires_a_connection_when_it_comes_back(pool_cls, dsn):
    with pool_cls(minconn=0, dsn=dsn, max_lifetime=0.3) as pool:
        conn = pool.getconn()
        time.sleep(0.4)
        pool.putconn(conn)
        assert conn.closed
        assert not pool.idle_connections


def test_max_lifetime_retires_an_idle_connection_instead_of_lending_it(pool_cls, dsn):
    with pool_cls(minconn=0, dsn=dsn, max_lifetime=0.3, idle_timeout=0) as pool:
        old = pool.getconn()
        pool.putconn(old)
        time.sleep(0.4)
        conn = pool.getconn()
        assert conn is not old and old.closed
        pool.putconn(conn)


def test_max_lifetime_has_a_few_percent_of_jitter(dsn):
    with ThreadSafeConnectionPool(minconn=20, dsn=dsn, max_lifetime=100) as pool:
        now = time.monotonic()
        remaining = [info.expires - now for info in pool._state.conns.values()]
    assert all(90 <= r <= 100 for r in remaining)
    assert len({round(r, 3) for r in remaining}) > 1, "all connections would expire together"


def test_configure_runs_once_on_each_new_connection_before_its_first_use(pool_cls, dsn):
    configured = []

    def configure(conn):
        configured.append(conn)
        with conn.cursor() as cur:
            cur.execute("SET search_path TO pg_catalog, public")  # opens a transaction: committed

    with pool_cls(minconn=0, dsn=dsn, configure=configure) as pool:
        for _ in range(3):
            with pool.connection() as conn:
                assert show(conn, "search_path") == "pg_catalog, public"
        with pool.connection() as a:
            pass
        assert configured.count(a) == 1
        assert len(configured) == len({id(c) for c in configured})


def test_configure_failure_closes_the_connection_and_reaches_the_caller(pool_cls, dsn, sessions):
    def configure(conn):
        raise RuntimeError("cannot configure")

    with pool_cls(minconn=0, maxconn=1, dsn=dsn, configure=configure) as pool:
        for _ in range(2):  # the slot is not lost
            with pytest.raises(RuntimeError, match="cannot configure"):
                pool.getconn()
        assert sessions(expect=0) == 0
        assert pool.stats()["opening"] == 0


def test_session_characteristics_are_restored_on_return(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.connection() as conn:
            conn.set_session(
                isolation_level=psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
                readonly=True,
                deferrable=True,
                autocommit=True,
            )
        with pool.connection() as again:
            assert again is conn
            assert (again.autocommit, again.isolation_level, again.readonly, again.deferrable) == (
                False,
                None,
                None,
                None,
            )
            assert show(again, "transaction_read_only") == "off"


def test_settings_made_by_configure_are_the_ones_restored(pool_cls, dsn):
    def configure(conn):
        conn.autocommit = True

    with pool_cls(minconn=0, maxconn=1, dsn=dsn, configure=configure) as pool:
        with pool.connection() as conn:
            conn.autocommit = False
        with pool.connection() as again:
            assert again.autocommit is True


def test_without_reset_session_state_survives_a_return(pool_cls, dsn):
    """What the README warns about: without reset, SET parameters reach the next borrower."""
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.connection() as conn:
            conn.autocommit = True
            conn.cursor().execute("SET work_mem = '7MB'")
        with pool.connection() as again:
            assert show(again, "work_mem") == "7MB"


def test_reset_session_clears_what_a_borrower_set(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn, reset=pgpool.reset_session) as pool:
        with pool.connection() as conn:
            conn.autocommit = True
            conn.cursor().execute("SET work_mem = '7MB'")
            conn.cursor().execute("CREATE TEMP TABLE scratch (v int)")
        with pool.connection() as again:
            assert again is conn
            assert show(again, "work_mem") != "7MB"
            with again.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'")
                assert cur.fetchone()[0] == 0


def test_reset_runs_after_the_rollback_on_every_return(pool_cls, dsn):
    seen = []

    def reset(conn):
        seen.append(conn.info.transaction_status)

    with pool_cls(minconn=0, dsn=dsn, reset=reset) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")  # left INTRANS
        with pool.connection():
            pass
    assert seen == [psycopg2.extensions.TRANSACTION_STATUS_IDLE] * 2


def test_a_connection_whose_reset_fails_is_discarded(pool_cls, dsn):
    def reset(conn):
        raise RuntimeError("reset failed")

    with pool_cls(minconn=0, maxconn=1, dsn=dsn, reset=reset) as pool:
        with pool.connection() as conn:
            pass
        assert conn.closed
        assert not pool.idle_connections
        assert pool.stats()["broken_discarded"] == 1
        with pool.connection() as again:  # the slot came back
            assert again is not conn


def test_a_connection_returned_in_copy_mode_is_discarded(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        conn = pool.getconn()
        conn.autocommit = True
        with conn.cursor() as cur, pytest.raises(psycopg2.ProgrammingError):
            cur.execute("COPY (SELECT 1) TO STDOUT")  # psycopg2 refuses, leaving the protocol in COPY
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_ACTIVE
        pool.putconn(conn)
        assert conn.closed
        with pool.connection() as again, again.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)


def test_the_probe_works_on_file_numbers_above_1024(pool_cls, dsn, terminate):
    """select.select() cannot watch descriptors above 1024; the probe uses poll(), which can."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"cannot open 1200 files here (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            fillers.append(fd)
            if fd > 1100:
                break
        with pool_cls(minconn=1, dsn=dsn) as pool:
            dead = pool.idle_connections[-1]
            assert dead.fileno() > 1024
            terminate(dead)
            time.sleep(0.2)
            with pool.connection() as conn:
                assert conn is not dead
                assert conn.fileno() > 1024
                assert backend_pid(conn) > 0
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
