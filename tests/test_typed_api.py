"""The typed way to write DAO functions: ``conn: connection = pgpool.BORROWED``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg2.extensions
import pytest
from psycopg2.extensions import connection

import pgpool
from pgpool import ThreadSafeConnectionPool

ROOT = Path(__file__).resolve().parents[1]


def test_borrowed_is_replaced_by_a_borrowed_connection_in_every_calling_style(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as pool:

        @pgpool.with_connection(pool)
        def backend(conn: connection = pgpool.BORROWED) -> int:
            assert isinstance(conn, psycopg2.extensions.connection)
            return int(conn.info.backend_pid)

        left_out = backend()
        assert backend(conn=pgpool.BORROWED) == left_out  # the same idle connection, borrowed again
        assert backend(pgpool.BORROWED) == left_out
        with pool.connection() as mine:
            assert backend(conn=mine) == mine.info.backend_pid
        assert pool.stats()["in_use"] == 0


def test_a_function_called_without_its_decorator_says_so_at_the_first_use_of_conn():
    def count(conn: connection = pgpool.BORROWED) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        return 1

    with pytest.raises(TypeError, match="without its @with_connection or @with_transaction decorator"):
        count()
    assert repr(pgpool.BORROWED) == "pgpool.BORROWED"


def test_a_pool_used_as_a_context_manager_keeps_its_class(dsn):
    with ThreadSafeConnectionPool(minconn=0, dsn=dsn) as pool:
        assert type(pool) is ThreadSafeConnectionPool
        stats: pgpool.PoolStats = pool.stats()
        assert stats["name"] == pool.name


def test_the_typed_example_runs(base_dsn):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "typed_dao.py")],
        env=dict(os.environ, PGPOOL_DSN=base_dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "notes;" in done.stdout
