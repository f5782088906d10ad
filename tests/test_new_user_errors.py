"""A new user's first mistakes get errors that say what to do, and the faithful core's documented types."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest

import pgpool
from pgpool import BORROWED, ConnectionPool, PoolClosed, ThreadSafeConnectionPool, with_connection, with_transaction


@pytest.mark.parametrize(
    ("option", "meant"),
    [("max_conn", "maxconn"), ("min_conn", "minconn"), ("idle_timout", "idle_timeout"), ("timeOut", "timeout")],
)
def test_a_misspelt_pool_option_names_the_nearest_option_and_no_dsn(pool_cls, option, meant):
    with pytest.raises(ValueError) as info:
        pool_cls(minconn=0, name="typo", **{option: 5})
    message = str(info.value)
    assert f"did you mean {meant}?" in message and "'typo'" in message and repr(option) in message, message
    assert "dsn" not in message, message  # nobody passed one


def test_an_invalid_dsn_is_still_called_one(pool_cls):
    with pytest.raises(ValueError, match="invalid dsn"):
        pool_cls(minconn=0, dsn="host=127.0.0.1 bogus_keyword=1")


def test_a_bare_decorator_is_refused_when_decorating_naming_the_function():
    with pytest.raises(TypeError, match=r"@with_connection on \S*load\(\) needs the pool"):

        @with_connection  # type: ignore[arg-type]
        def load(item_id: int, conn=BORROWED):
            return item_id

    with pytest.raises(TypeError, match=r"@with_transaction on \S*save\(\) needs the pool"):

        @with_transaction  # type: ignore[arg-type]
        def save(conn):
            pass


@pytest.mark.parametrize("cls", [ConnectionPool, ThreadSafeConnectionPool])
def test_a_pool_class_instead_of_a_pool_is_refused_when_decorating(cls):
    with pytest.raises(TypeError, match=rf"on \S*load\(\) got the class {cls.__name__}, not a pool"):

        @with_connection(cls)
        def load(conn=BORROWED):
            pass


def test_a_factory_without_arguments_and_a_bound_method_factory_are_accepted(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:

        class App:
            def get_pool(self):
                return pool

        @with_connection(App().get_pool)
        def one(conn=BORROWED):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone()[0]

        assert one() == 1


def test_a_factory_returning_none_names_the_decorated_function():
    @with_connection(lambda: None)
    def report(conn=BORROWED):
        pass

    with pytest.raises(TypeError, match=r"the pool factory of \S*report\(\) returned None"):
        report()


def test_getconn_with_a_key_after_close_raises_pool_closed(pool_cls, dsn):
    pool = pool_cls(minconn=0, maxconn=2, dsn=dsn)
    conn = pool.getconn("worker")
    pool.close()
    with pytest.raises(PoolClosed):
        pool.getconn("worker")
    pool.putconn(conn, "worker")
    assert conn.closed  # came back to a closed pool: closed


def test_return_times_is_a_dict_whose_writes_age_the_connection(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, idle_timeout=60, dsn=dsn) as pool:
        conn = pool.getconn()
        pool.putconn(conn)
        times = pool.return_times
        assert isinstance(times, dict) and set(times) == {conn}
        pool.return_times[conn] -= 120  # older than idle_timeout: the next getconn closes it
        assert pool.getconn() is not conn
        assert conn.closed


@pytest.mark.parametrize("how", ["transaction", "decorator"])
def test_a_transaction_whose_block_swallowed_an_sql_error_raises_instead_of_reporting_a_commit(dsn, admin, how):
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS swallowed (n int)")
        cur.execute("TRUNCATE swallowed")
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:

        def body(conn):
            with conn.cursor() as cur:
                cur.execute("INSERT INTO swallowed VALUES (1)")
                try:
                    cur.execute("SELECT 1 / 0")
                except psycopg2.errors.DivisionByZero:
                    pass  # the block goes on: PostgreSQL has aborted the transaction

        @with_transaction(pool)
        def decorated(conn=BORROWED):
            body(conn)

        with pytest.raises(pgpool.TransactionRolledBack, match="rolled back by the server") as info:
            if how == "transaction":
                with pool.transaction() as conn:
                    body(conn)
            else:
                decorated()
        assert isinstance(info.value, psycopg2.errors.InFailedSqlTransaction)
        assert pool.stats()["in_use"] == 0
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM swallowed")
            assert cur.fetchone()[0] == 0


def test_a_failed_savepoint_that_the_outer_block_caught_still_commits_the_outer(dsn, admin):
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS swallowed_inner (n int)")
        cur.execute("TRUNCATE swallowed_inner")
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.transaction() as conn:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO swallowed_inner VALUES (1)")
            try:
                with pool.transaction() as inner, inner.cursor() as cur:
                    cur.execute("SELECT 1 / 0")
            except psycopg2.errors.DivisionByZero:
                pass  # rolled back to the savepoint: the outer transaction is healthy
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM swallowed_inner")
            assert cur.fetchone()[0] == 1


def test_a_failing_configure_is_raised_at_once_even_with_a_timeout(dsn):
    """Chosen over psycopg_pool's retry-then-PoolTimeout: no retry can fix a configure that raises,
    and a timeout would only hide the real error (README, Hooks)."""
    import time

    def configure(conn):
        raise RuntimeError("configure says no")

    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=5, configure=configure) as pool:
        begun = time.monotonic()
        with pytest.raises(RuntimeError, match="configure says no"):
            pool.getconn()
        assert time.monotonic() - begun < 2
        assert pool.stats()["opening"] == 0 and pool.stats()["in_use"] == 0
