"""Issue 11, session state and hooks: what configure set holds for every borrower, nothing else of one
borrower (encoding, notices, notifications) reaches the next, a reset that leaves a transaction open
fails, and the check hook runs on every connection before it is lent."""

from __future__ import annotations

import logging
import time

import psycopg2
import psycopg2.errors
import pytest

import pgpool
from pgpool import ThreadSafeConnectionPool

from .helpers import rows

RESETS = pytest.mark.parametrize("reset", [None, pgpool.reset_session], ids=["no-reset", "reset_session"])


def scalar(conn, sql: str, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


@pytest.fixture
def text_table(admin):
    """A fresh table (t text) for the test, dropped afterwards."""
    name = f"pgpool_text_{time.monotonic_ns()}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (t text)")
    yield name
    with admin.cursor() as cur:
        cur.execute(f"DROP TABLE {name}")


# -- what configure set holds for every borrower ---------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False], ids=["readme-autocommit", "transaction-left-open"])
def test_configured_search_path_holds_for_every_borrower_with_reset_session(pool_cls, dsn, autocommit):
    """The README's configure + reset=pgpool.reset_session: DISCARD ALL must not undo what configure set."""

    def configure(conn):
        conn.autocommit = autocommit  # without autocommit, pgpool commits what configure left open
        with conn.cursor() as cur:
            cur.execute("SET search_path TO pgpool_app, public")

    with pool_cls(minconn=0, maxconn=1, dsn=dsn, configure=configure, reset=pgpool.reset_session) as pool:
        pids = set()
        for _ in range(4):
            with pool.connection() as conn:
                pids.add(conn.info.backend_pid)
                assert scalar(conn, "SHOW search_path") == "pgpool_app, public"
                conn.rollback()
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SET search_path TO pg_catalog")  # a borrower's own change: reset clears it
        assert len(pids) == 1, "the same connection every time: reset, not replaced"


# What a borrower does to the session characteristics before returning the connection.
FLIPS = {
    "untouched": None,
    "readonly-false": ("readonly", False),  # psycopg2 sends SET default_transaction_read_only TO off
    "autocommit-false": ("autocommit", False),  # psycopg2 resets default_transaction_read_only too
}


@RESETS
@pytest.mark.parametrize("flip", list(FLIPS))
def test_a_pool_configured_read_only_in_autocommit_refuses_writes_for_every_borrower(
    pool_cls, dsn, admin, table, reset, flip
):
    def configure(conn):
        conn.set_session(readonly=True, autocommit=True)

    with pool_cls(minconn=0, maxconn=1, dsn=dsn, configure=configure, reset=reset) as pool:
        pids = set()
        for _ in range(3):
            with pool.connection() as conn:
                pids.add(conn.info.backend_pid)
                assert (conn.autocommit, conn.readonly) == (True, True)
                with conn.cursor() as cur, pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                    cur.execute(f"INSERT INTO {table} VALUES (1)")
                if FLIPS[flip]:
                    setattr(conn, *FLIPS[flip])
        assert len(pids) == 1
    assert rows(admin, table) == []


# -- nothing of one borrower reaches the next ------------------------------------------------------


@RESETS
def test_client_encoding_changed_by_a_borrower_is_restored_on_return(pool_cls, dsn, admin, text_table, reset):
    """After set_client_encoding('LATIN1'), psycopg2 and the server agree again, on the original encoding."""
    with pool_cls(minconn=0, maxconn=1, dsn=dsn, reset=reset) as pool:
        with pool.connection() as conn:
            original = conn.encoding
            assert original != "LATIN1"
            conn.set_client_encoding("LATIN1")
            assert scalar(conn, "SHOW client_encoding") == "LATIN1"
        with pool.connection() as again:
            assert again is conn
            server = scalar(again, "SHOW client_encoding")
            assert (again.encoding, server) == (original, original)
            with again.cursor() as cur:
                cur.execute(f"INSERT INTO {text_table} VALUES (%s)", ("café",))
                cur.execute("SELECT length(%s), 'caf' || chr(233)", ("café",))
                assert cur.fetchone() == (4, "café")
                cur.execute(f"SELECT t FROM {text_table}")
                assert cur.fetchone()[0] == "café"
            again.commit()
    with admin.cursor() as cur:
        cur.execute(f"SELECT t FROM {text_table}")
        assert cur.fetchall() == [("café",)]  # stored right, not cafÃ©


@RESETS
def test_pending_notices_and_notifications_do_not_reach_the_next_borrower(pool_cls, dsn, reset):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn, reset=reset) as pool:
        with pool.connection() as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("DO $$ BEGIN RAISE NOTICE 'pgpool notice for nobody'; END $$")
                cur.execute("LISTEN pgpool_pending")
                cur.execute("NOTIFY pgpool_pending, 'for nobody'")
            conn.poll()
            assert any("pgpool notice for nobody" in n for n in conn.notices)
            assert [n.payload for n in conn.notifies] == ["for nobody"]
        with pool.connection() as again:
            assert again is conn
            assert list(again.notices) == []
            assert list(again.notifies) == []
            again.rollback()
            again.autocommit = True
            with again.cursor() as cur:
                cur.execute("UNLISTEN *")


# -- a reset that leaves a transaction open --------------------------------------------------------


def test_a_reset_that_leaves_a_transaction_open_discards_the_connection_with_a_warning(
    pool_cls, dsn, admin, table, caplog
):
    def reset(conn):
        with conn.cursor() as cur:  # no autocommit, no commit: a transaction is left open
            cur.execute("RESET ALL")
            cur.execute(f"INSERT INTO {table} VALUES (2)")

    caplog.set_level(logging.WARNING, logger="pgpool")
    with pool_cls(minconn=0, maxconn=1, dsn=dsn, reset=reset, name="leaky-reset") as pool:
        with pool.connection() as conn:
            first_pid = conn.info.backend_pid
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (1)")  # uncommitted: rolled back
        assert conn.closed
        with pool.connection() as again:
            assert again.info.backend_pid != first_pid
        assert pool.stats()["in_use"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "pgpool" and r.levelno >= logging.WARNING]
    assert any("'leaky-reset'" in m for m in warnings), warnings
    assert rows(admin, table) == []


# -- the check hook ---------------------------------------------------------------------------------


def test_check_runs_on_a_brand_new_connection_before_it_is_lent(pool_cls, dsn):
    checked: list[int] = []

    def check(conn):
        checked.append(conn.info.backend_pid)

    with pool_cls(minconn=0, maxconn=1, dsn=dsn, check=check) as pool:
        conn = pool.getconn()
        assert checked == [conn.info.backend_pid]  # new, and checked before getconn returned
        pool.putconn(conn)
        with pool.connection() as again:
            assert again is conn
        assert checked == [conn.info.backend_pid] * 2


@pytest.mark.timing
def test_a_check_that_always_fails_ends_in_pool_timeout(dsn, sessions):
    calls = []

    def check(conn):
        calls.append(conn.info.backend_pid)
        raise RuntimeError("never healthy")

    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn, timeout=0.5, check=check, name="sick") as pool:
        start = time.monotonic()
        with pytest.raises(pgpool.PoolTimeout, match="'sick'"):
            pool.getconn()
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed < 5, f"gave up after {elapsed:.2f} s"
        assert calls, "the check ran on the new connections"
        assert pool.stats()["in_use"] == 0
        assert sessions(expect=0) == 0


class Boom(BaseException):
    """Not an Exception: like KeyboardInterrupt, it must propagate."""


@pytest.mark.parametrize("minconn", [0, 2], ids=["new-connection", "idle-connection"])
def test_a_check_raising_a_base_exception_propagates_and_loses_no_slot(pool_cls, dsn, sessions, minconn):
    booms = [Boom("check interrupted")]

    def check(conn):
        if booms:
            raise booms.pop()

    with pool_cls(minconn=minconn, maxconn=2, dsn=dsn, check=check) as pool:
        with pytest.raises(Boom) as info:  # kept: its traceback must not keep the slot taken
            pool.getconn()
        assert pool.stats()["in_use"] == 0
        held = [pool.getconn(), pool.getconn()]  # maxconn at once
        assert len({c.info.backend_pid for c in held}) == 2
        assert pool.stats()["in_use"] == 2
        for conn in held:
            pool.putconn(conn)
        assert pool.stats()["in_use"] == 0
        assert sessions() <= 2
    assert info.type is Boom
