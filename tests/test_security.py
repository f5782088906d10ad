"""No session state reaches the next borrower with reset=pgpool.reset_session; without it, what survives."""

from __future__ import annotations

import pytest

import pgpool
from pgpool import ThreadSafeConnectionPool


def scalar(conn, sql: str, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


@pytest.fixture
def role(admin):
    name = "pgpool_test_role"
    with admin.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {name}")
        cur.execute(f"CREATE ROLE {name}")
    yield name
    with admin.cursor() as cur:
        cur.execute(f"DROP ROLE {name}")


# Each case: (what a borrower does, how the next borrower looks at it, what it sees if the state leaked).
CASES = {
    "set role": ("SET ROLE pgpool_test_role", "SELECT current_user", "pgpool_test_role"),
    "search_path": ("SET search_path TO pg_catalog", "SHOW search_path", "pg_catalog"),
    "set parameter": ("SET statement_timeout = '4321ms'", "SHOW statement_timeout", "4321ms"),
    "temporary table": (
        "CREATE TEMP TABLE pgpool_scratch (v int)",
        "SELECT to_regclass('pg_temp.pgpool_scratch') IS NOT NULL",
        True,
    ),
    "prepared statement": (
        "PREPARE pgpool_stmt AS SELECT 1",
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'pgpool_stmt'",
        1,
    ),
    "advisory lock": (
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND pid = pg_backend_pid()",
        1,
    ),
    "listen": ("LISTEN pgpool_channel", "SELECT count(*) FROM pg_listening_channels()", 1),
}


def leave_state_behind(pool, statement: str):
    with pool.connection() as conn:
        conn.autocommit = True  # committed session state: a rollback does not undo it
        with conn.cursor() as cur:
            cur.execute(statement)
    return conn


@pytest.mark.parametrize("case", list(CASES))
def test_reset_session_keeps_session_state_from_the_next_borrower(dsn, role, case):
    statement, probe, leaked = CASES[case]
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, reset=pgpool.reset_session) as pool:
        first = leave_state_behind(pool, statement)
        with pool.connection() as conn:
            assert conn is first  # the same session, cleaned
            assert scalar(conn, probe) != leaked


@pytest.mark.parametrize("case", list(CASES))
def test_without_reset_session_state_survives_a_return_as_the_readme_says(dsn, role, case):
    statement, probe, leaked = CASES[case]
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        first = leave_state_behind(pool, statement)
        with pool.connection() as conn:
            assert conn is first
            assert scalar(conn, probe) == leaked
            conn.rollback()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("DISCARD ALL")  # leave nothing for the role fixture's DROP ROLE


def test_uncommitted_set_is_undone_by_the_rollback_on_return(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SET statement_timeout = '4321ms'")  # inside the implicit transaction
        with pool.connection() as conn:
            assert scalar(conn, "SHOW statement_timeout") != "4321ms"
