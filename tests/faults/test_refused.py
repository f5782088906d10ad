"""A server refusing connections: psycopg2's error reaches the caller and no slot is lost."""

from __future__ import annotations

import logging
import time

import psycopg2
import psycopg2.extensions
import pytest

from pgpool import PoolTimeout, ThreadSafeConnectionPool

from ..embedded_pg import EmbeddedPostgres
from ..helpers import closed_port

pytestmark = pytest.mark.faults


def assert_no_slot_lost(pool) -> None:
    stats = pool.stats()
    assert stats["opening"] == 0 and stats["in_use"] == 0 and stats["waiting"] == 0, stats


@pytest.fixture
def limited_role(admin):
    """A role allowed one session: its second connect is refused by the server."""
    name = "pgpool_limited"
    with admin.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {name}")
        cur.execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 1")
    yield name
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
        cur.execute(f"DROP ROLE {name}")


def test_connection_limit_reached_reaches_the_caller_and_loses_no_slot(dsn, limited_role):
    with ThreadSafeConnectionPool(minconn=0, maxconn=3, dsn=dsn, user=limited_role) as pool:
        first = pool.getconn()
        for _ in range(3):
            with pytest.raises(psycopg2.OperationalError, match="too many connections for role"):
                pool.getconn()
        assert pool.stats()["opening"] == 0 and pool.stats()["in_use"] == 1
        pool.putconn(first)
        assert_no_slot_lost(pool)
        assert pool.getconn() is first


@pytest.mark.embedded
def test_server_max_connections_reached_reaches_the_caller_and_loses_no_slot(embedded):
    """A server of its own, with room for 4 sessions (none reserved), so the others are not disturbed."""
    with EmbeddedPostgres(max_connections=4, superuser_reserved_connections=0) as tiny:
        hogs = [psycopg2.connect(tiny.dsn) for _ in range(3)]
        try:
            with ThreadSafeConnectionPool(minconn=0, maxconn=3, dsn=tiny.dsn) as pool:
                first = pool.getconn()  # the 4th and last session
                for _ in range(3):
                    with pytest.raises(psycopg2.OperationalError, match="too many clients already"):
                        pool.getconn()
                assert pool.stats()["opening"] == 0 and pool.stats()["in_use"] == 1
                hogs.pop().close()  # room for one more
                second = pool.getconn(timeout=5)
                pool.putconn(first)
                pool.putconn(second)
                assert_no_slot_lost(pool)
        finally:
            for hog in hogs:
                hog.close()


def test_a_missing_database_reaches_the_caller_and_loses_no_slot(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, dbname="pgpool_no_such_db") as pool:
        for _ in range(3):
            with pytest.raises(psycopg2.OperationalError, match='database "pgpool_no_such_db" does not exist'):
                pool.getconn()
        assert_no_slot_lost(pool)
        assert pool.stats()["connect_errors"] == 3


def test_a_refused_connect_with_a_timeout_becomes_a_pool_timeout_with_the_cause():
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, host="127.0.0.1", port=closed_port()) as pool:
        with pytest.raises(PoolTimeout, match="refused") as info:
            pool.getconn(timeout=0.3)
        assert isinstance(info.value.__cause__, psycopg2.OperationalError)
        assert_no_slot_lost(pool)


@pytest.mark.parametrize(
    ("setting", "said"),
    [({"dbname": "pgpool_no_such_db"}, "does not exist"), ({"user": "pgpool_no_such_role"}, "does not exist")],
    ids=["database", "role"],
)
def test_a_database_or_role_that_does_not_exist_is_raised_at_once_not_retried(dsn, setting, said, caplog):
    """A typo in the settings: waiting the whole timeout would only delay the real error."""
    caplog.set_level(logging.WARNING, logger="pgpool")
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=5, **setting) as pool:
        begun = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match=said):
            pool.getconn()
        assert time.monotonic() - begun < 2, "retried a connect no retry can fix"
        assert pool.stats()["connect_errors"] == 1
        assert said in caplog.text, "the failed connect was not logged when it happened"
        assert_no_slot_lost(pool)


def test_a_permanent_connect_error_at_construction_is_logged_and_raised_at_once(dsn, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool")
    begun = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="does not exist"):
        ThreadSafeConnectionPool(minconn=1, maxconn=1, dsn=dsn, timeout=5, dbname="pgpool_no_such_db")
    assert time.monotonic() - begun < 2
    assert "does not exist" in caplog.text


@pytest.fixture
def password_role(embedded, admin):
    """A role that must give a password, on the embedded server (whose other roles are trusted)."""
    name = "pgpool_pw"
    hba = embedded.pgdata / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {name} 127.0.0.1/32 scram-sha-256\n" + original)
    with admin.cursor() as cur:
        cur.execute("SELECT pg_reload_conf()")
        cur.execute(f"DROP ROLE IF EXISTS {name}")
        cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'right-password'")
    yield name
    hba.write_text(original)
    with admin.cursor() as cur:
        cur.execute("SELECT pg_reload_conf()")
        cur.execute(f"DROP ROLE {name}")


@pytest.mark.embedded
def test_a_wrong_password_reaches_the_caller_masked_and_loses_no_slot(dsn, password_role, caplog):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, user=password_role, password="wrong-password") as pool:
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            pool.getconn()
        begun = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed") as info:
            pool.getconn(timeout=5)  # a wrong password is refused for good: raised at once, not retried
        assert time.monotonic() - begun < 2
        assert "wrong-password" not in str(info.value)
        assert "wrong-password" not in caplog.text
        assert_no_slot_lost(pool)
        pool.connect_kwargs["password"] = "right-password"
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user")
            assert cur.fetchone()[0] == password_role


@pytest.mark.embedded
def test_a_pool_created_while_the_server_starts_waits_for_it_within_its_timeout(embedded):
    """A server of its own, stopped: the pool's minconn connects retry with backoff until it is up."""
    import threading
    import time

    with EmbeddedPostgres() as starting:
        starting.stop()
        starter = threading.Timer(0.7, starting.start)
        starter.start()
        try:
            begun = time.monotonic()
            with ThreadSafeConnectionPool(minconn=2, maxconn=2, dsn=starting.dsn, timeout=30) as pool:
                took = time.monotonic() - begun
                assert pool.stats()["idle"] == 2 and pool.stats()["connect_errors"] >= 1
                assert took >= 0.5
        finally:
            starter.join(60)


@pytest.mark.embedded
def test_a_pool_created_while_the_server_is_down_times_out_chained_or_fails_at_once(embedded):
    with EmbeddedPostgres() as down:
        down.stop()
        with pytest.raises(PoolTimeout, match="last connect error") as info:
            ThreadSafeConnectionPool(minconn=1, dsn=down.dsn, timeout=0.5)
        assert isinstance(info.value.__cause__, psycopg2.OperationalError)
        with pytest.raises(psycopg2.OperationalError):  # timeout=0: the reference behaviour
            ThreadSafeConnectionPool(minconn=1, dsn=down.dsn)
