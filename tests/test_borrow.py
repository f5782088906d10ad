"""Borrowing that cannot leak: pool.connection(), pool.transaction() and propagation."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from pgpool import ConnectionPool, PoolError, ThreadSafeConnectionPool

from .helpers import rows

pytestmark = pytest.mark.pgbouncer


def insert(conn, table, value) -> None:
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))


class Boom(Exception):
    pass


# -- pool.connection() -----------------------------------------------------------------------------


def test_connection_block_returns_the_connection_when_it_ends(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.connection() as conn:
            assert conn in pool.connections_in_use
        assert list(pool.idle_connections) == [conn]


def test_connection_block_returns_the_connection_when_it_raises(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pytest.raises(Boom), pool.connection() as conn:
            raise Boom
        assert list(pool.idle_connections) == [conn]
        assert pool.stats()["in_use"] == 0


def test_connection_block_returns_the_connection_on_early_return(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:

        def find() -> int:
            for _ in range(3):
                with pool.connection() as conn, conn.cursor() as cur:
                    cur.execute("SELECT 7")
                    return int(cur.fetchone()[0])
            return 0

        assert find() == 7
        assert pool.stats()["in_use"] == 0
        assert len(pool.idle_connections) == 1


def test_connection_block_returns_the_connection_on_keyboard_interrupt(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pytest.raises(KeyboardInterrupt), pool.connection():
            raise KeyboardInterrupt
        assert pool.stats()["in_use"] == 0
        pool.putconn(pool.getconn())


def test_connection_block_rolls_back_what_it_did_not_commit(pool_cls, dsn, admin, table):
    with pool_cls(minconn=0, dsn=dsn) as pool:
        with pool.connection() as conn:
            insert(conn, table, 1)
        assert rows(admin, table) == []
        with pool.connection() as conn:
            insert(conn, table, 2)
            conn.commit()
        assert rows(admin, table) == [2]


# -- pool.transaction() ----------------------------------------------------------------------------


def test_transaction_commits_when_the_block_ends_normally(pool_cls, dsn, admin, table):
    with pool_cls(minconn=0, dsn=dsn) as pool:
        with pool.transaction() as conn:
            insert(conn, table, 1)
        assert rows(admin, table) == [1]


def test_transaction_rolls_back_and_propagates_the_exception_unchanged(pool_cls, dsn, admin, table):
    error = Boom("the original")
    with pool_cls(minconn=0, dsn=dsn) as pool:
        with pytest.raises(Boom) as info, pool.transaction() as conn:
            insert(conn, table, 1)
            raise error
        assert info.value is error
        assert rows(admin, table) == []
        assert pool.stats()["in_use"] == 0


def test_transaction_works_on_an_autocommit_connection(pool_cls, dsn, admin, table):
    def autocommit(conn):
        conn.autocommit = True

    with pool_cls(minconn=0, dsn=dsn, configure=autocommit) as pool:
        with pool.transaction() as conn:
            insert(conn, table, 1)
            insert(conn, table, 2)
            assert rows(admin, table) == []  # not autocommitted one by one
        assert rows(admin, table) == [1, 2]
        with pytest.raises(Boom), pool.transaction() as conn:
            insert(conn, table, 3)
            raise Boom
        assert rows(admin, table) == [1, 2]
        with pool.connection() as conn:
            assert conn.autocommit is True  # the mode is restored


def test_transaction_whose_commit_fails_raises_and_leaves_nothing(pool_cls, dsn, admin):
    name = f"pgpool_d_{time.monotonic_ns()}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    try:
        with pool_cls(minconn=0, dsn=dsn) as pool:
            with pytest.raises(psycopg2.IntegrityError), pool.transaction() as conn:
                insert(conn, name, 1)
                insert(conn, name, 1)  # fails only at commit
            assert rows(admin, name) == []
            with pool.connection() as again:
                assert again.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP TABLE {name}")


# -- propagation -----------------------------------------------------------------------------------


def test_nested_connection_joins_the_outer_borrow(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.connection() as outer:
            with pool.connection() as inner:
                assert inner is outer  # maxconn=1: a second borrow would have failed
            assert outer in pool.connections_in_use  # only the outermost returns it
        assert pool.stats()["checkouts"] == 1
        assert list(pool.idle_connections) == [outer]


def test_nested_transaction_is_a_savepoint_the_outer_can_survive(pool_cls, dsn, admin, table):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.transaction() as conn:
            insert(conn, table, 1)
            with pytest.raises(Boom), pool.transaction() as inner:
                assert inner is conn
                insert(inner, table, 2)
                raise Boom
            with pool.transaction() as inner:
                insert(inner, table, 3)
            assert rows(admin, table) == []  # nothing committed before the outer ends
        assert rows(admin, table) == [1, 3]


def test_transaction_inside_a_plain_connection_commits_at_its_own_end(pool_cls, dsn, admin, table):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.connection() as conn:
            insert(conn, table, 0)  # the plain block's own work, not committed yet
            with pool.transaction() as inner:
                assert inner is conn
                insert(inner, table, 1)
            assert rows(admin, table) == [0, 1]  # the nested transaction committed both
            insert(conn, table, 2)  # plain borrow again: rolled back on return
        assert rows(admin, table) == [0, 1]


def test_connection_inside_a_transaction_joins_it(pool_cls, dsn, admin, table):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pytest.raises(Boom), pool.transaction() as conn:
            with pool.connection() as inner:
                assert inner is conn
                insert(inner, table, 1)
            raise Boom
        assert rows(admin, table) == []


def test_different_pools_never_share_a_connection(pool_cls, dsn):
    with pool_cls(minconn=0, dsn=dsn) as one, pool_cls(minconn=0, dsn=dsn) as two:
        with one.connection() as a, two.connection() as b:
            assert a is not b
            assert a in one.connections_in_use and b in two.connections_in_use


def test_another_thread_borrows_its_own_connection(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as pool:
        seen = []
        with pool.connection() as mine:

            def other() -> None:
                with pool.connection() as theirs:
                    seen.append(theirs)

            t = threading.Thread(target=other)
            t.start()
            t.join(timeout=10)
        assert len(seen) == 1 and seen[0] is not mine


def test_borrow_after_a_failed_getconn_does_not_think_it_is_nested(dsn):
    with ConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        held = pool.getconn()
        with pytest.raises(PoolError), pool.connection():
            pass
        pool.putconn(held)
        with pool.connection() as conn:
            assert conn is held
