"""Server-side deaths with pg_terminate_backend: the borrower gets psycopg2's error, the slot is freed."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from pgpool import ThreadSafeConnectionPool

from ..helpers import join_all

pytestmark = pytest.mark.faults


def test_terminated_idle_connections_are_replaced_without_an_error(dsn, terminate, sessions):
    with ThreadSafeConnectionPool(minconn=3, maxconn=3, dsn=dsn) as pool:
        for conn in list(pool.idle_connections):
            terminate(conn)
        time.sleep(0.2)
        for _ in range(6):
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
        assert pool.stats()["broken_discarded"] == 3
        assert sessions(expect=3) == 3


def test_a_borrower_terminated_mid_query_gets_the_error_and_its_slot_comes_back(dsn, admin, sessions):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=5, dsn=dsn) as pool:
        errors: list[BaseException] = []
        started = threading.Event()
        pids: list[int] = []

        def long_query() -> None:
            try:
                with pool.connection() as conn, conn.cursor() as cur:
                    pids.append(conn.info.backend_pid)
                    started.set()
                    cur.execute("SELECT pg_sleep(30)")
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=long_query)
        worker.start()
        assert started.wait(timeout=10)
        time.sleep(0.2)
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
        join_all([worker], timeout=20)
        assert len(errors) == 1 and isinstance(errors[0], psycopg2.OperationalError)
        assert "terminat" in str(errors[0])  # psycopg2's own message
        stats = pool.stats()
        assert stats["in_use"] == 0 and stats["broken_discarded"] == 1
        with pool.connection(timeout=1) as conn, conn.cursor() as cur:  # the slot came back
            cur.execute("SELECT 1")
        assert sessions(expect=1) == 1


def test_a_transaction_terminated_midway_raises_and_commits_nothing(dsn, admin, terminate):
    table = f"pgpool_f_{time.monotonic_ns()}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (v int)")
    try:
        with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
            with pytest.raises(psycopg2.OperationalError), pool.transaction() as conn:
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {table} VALUES (1)")
                terminate(conn)
                time.sleep(0.1)
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {table} VALUES (2)")
            assert conn.closed
            assert pool.stats()["in_use"] == 0
            with admin.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {table}")
                assert cur.fetchone()[0] == 0
            with pool.transaction(timeout=0) as again:
                assert again is not conn
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")
