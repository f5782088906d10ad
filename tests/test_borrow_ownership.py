"""A borrow belongs to the thread that made it: copied contexts and generators never share a connection."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pgpool import PoolTimeout, ThreadSafeConnectionPool, with_connection, with_transaction

from .helpers import join_all, rows

pytestmark = pytest.mark.pgbouncer


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def insert(conn, table, value) -> None:
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))


def assert_every_slot_lendable(pool) -> None:
    """Nothing lent, and `maxconn` distinct connections can be borrowed at once."""
    assert pool.stats()["in_use"] == 0, pool.stats()
    lent = [pool.getconn() for _ in range(pool.maxconn)]
    try:
        assert len({id(c) for c in lent}) == pool.maxconn
    finally:
        for conn in lent:
            pool.putconn(conn)
    assert pool.stats()["in_use"] == 0, pool.stats()


# -- copied contexts -------------------------------------------------------------------------------


@pytest.mark.needs_session  # compares backend pids, which PgBouncer's transaction mode shares
def test_to_thread_inside_a_borrow_gets_its_own_connection(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, timeout=2, dsn=dsn) as pool:

        def theirs() -> tuple[object, int]:
            with pool.connection() as conn:
                return conn, backend_pid(conn)

        async def main() -> None:
            with pool.connection() as mine:
                conn, pid = await asyncio.wait_for(asyncio.to_thread(theirs), timeout=10)
                assert conn is not mine
                assert pid != backend_pid(mine)
                assert pool.stats()["in_use"] == 1  # theirs came back; mine is still lent

        asyncio.run(main())
        assert_every_slot_lendable(pool)


@pytest.mark.needs_session  # compares backend pids, which PgBouncer's transaction mode shares
def test_executor_running_a_copied_context_inside_a_borrow_gets_its_own_connection(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, timeout=2, dsn=dsn) as pool:

        def theirs() -> tuple[object, int]:
            with pool.connection() as conn, pool.connection() as nested:
                assert nested is conn  # the executor thread's own nested borrow still joins
                return conn, backend_pid(conn)

        with ThreadPoolExecutor(max_workers=1) as executor, pool.connection() as mine:
            conn, pid = executor.submit(contextvars.copy_context().run, theirs).result(timeout=10)
            assert conn is not mine
            assert pid != backend_pid(mine)
        assert_every_slot_lendable(pool)


def test_transaction_in_a_copied_context_inside_a_transaction_is_its_own(dsn, admin, table):
    """Not a savepoint of the caller's transaction: it commits by itself, whatever the caller does."""
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, timeout=2, dsn=dsn) as pool:

        def theirs() -> object:
            with pool.transaction() as conn:
                insert(conn, table, 2)
                return conn

        class Abandon(Exception):
            pass

        with pytest.raises(Abandon), ThreadPoolExecutor(max_workers=1) as executor, pool.transaction() as mine:
            insert(mine, table, 1)
            assert executor.submit(contextvars.copy_context().run, theirs).result(timeout=10) is not mine
            assert rows(admin, table) == [2]  # committed on its own connection
            raise Abandon
        assert rows(admin, table) == [2]  # the caller's rollback did not take it
        assert_every_slot_lendable(pool)


def test_copied_context_run_after_the_borrow_ended_does_not_use_its_connection(dsn):
    """The context outlives the borrow; the connection went back and belongs to someone else now."""
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=2, dsn=dsn) as pool:
        with pool.connection():
            ctx = contextvars.copy_context()
        held = pool.getconn()  # the only connection, lent to us again
        outcome: list[object] = []

        def theirs() -> None:
            try:
                with pool.connection(timeout=0.2) as conn:
                    outcome.append(conn)
            except PoolTimeout as exc:
                outcome.append(exc)

        t = threading.Thread(target=ctx.run, args=(theirs,))
        t.start()
        join_all([t], timeout=10)
        assert len(outcome) == 1 and isinstance(outcome[0], PoolTimeout), f"got {outcome} while we hold {held}"
        pool.putconn(held)
        assert_every_slot_lendable(pool)


# -- a plain generator finished in another thread --------------------------------------------------


@pytest.mark.parametrize("finish", ["exhausted", "closed"])
def test_generator_finished_in_another_thread_returns_its_connection_once(dsn, finish):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=2, dsn=dsn) as pool:

        def pids():
            with pool.connection() as conn:
                yield backend_pid(conn)
                yield backend_pid(conn)

        gen = pids()
        first = next(gen)  # started here, in this thread
        errors: list[BaseException] = []

        def finish_it() -> None:
            try:
                if finish == "exhausted":
                    assert list(gen) == [first]
                else:
                    gen.close()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=finish_it)
        t.start()
        join_all([t], timeout=10)
        assert errors == []
        stats = pool.stats()
        assert (stats["in_use"], stats["idle"]) == (0, 1), stats
        assert len(pool.idle_connections) == 1  # back once, not twice
        assert_every_slot_lendable(pool)


@pytest.mark.parametrize("finish", ["exhausted", "closed"])
def test_after_a_generator_finished_elsewhere_the_first_thread_borrows_for_real(dsn, finish):
    """The generator's thread must not "join" the returned connection while another thread gets it."""
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=2, dsn=dsn) as pool:

        def pids():
            with pool.connection() as conn:
                yield backend_pid(conn)
                yield backend_pid(conn)

        gen = pids()
        next(gen)

        def finish_it() -> None:
            try:
                list(gen) if finish == "exhausted" else gen.close()
            except Exception:
                pass  # the test above asserts there is none; this one is about what comes next

        t = threading.Thread(target=finish_it)
        t.start()
        join_all([t], timeout=10)

        with pool.connection() as mine:
            got: list[object] = []

            def other() -> None:
                try:
                    got.append(pool.getconn(timeout=0.2))
                except PoolTimeout as exc:
                    got.append(exc)

            t = threading.Thread(target=other)
            t.start()
            join_all([t], timeout=10)
            assert len(got) == 1 and isinstance(got[0], PoolTimeout), f"maxconn=1, we hold {mine}, it got {got}"
            assert pool.stats()["in_use"] == 1, pool.stats()
        assert_every_slot_lendable(pool)


# -- decorated generators take their own connection ------------------------------------------------


@pytest.mark.parametrize("finish", ["exhausted", "closed"])
def test_connection_generator_started_inside_a_borrow_takes_its_own_and_outlives_it(pool_cls, dsn, finish):
    with pool_cls(minconn=0, maxconn=2, dsn=dsn) as pool:

        @with_connection(pool)
        def pids(conn):
            for _ in range(3):
                yield conn, backend_pid(conn)

        with pool.connection() as outer:
            outer_pid = backend_pid(outer)
            gen = pids()
            theirs, pid = next(gen)
            assert theirs is not outer and pid != outer_pid
        # The caller's borrow ended; the generator keeps its own connection and goes on using it.
        assert outer in pool.idle_connections and theirs in pool.connections_in_use
        assert next(gen) == (theirs, pid)
        with pool.connection() as again:
            assert again is outer  # the idle one: never the generator's
            assert pool.stats()["in_use"] == 2
        if finish == "exhausted":
            assert list(gen) == [(theirs, pid)]
        else:
            gen.close()
        assert theirs in pool.idle_connections
        assert_every_slot_lendable(pool)


def test_transaction_generator_closed_early_inside_a_transaction_rolls_back_only_its_own_work(
    pool_cls, dsn, admin, table
):
    with pool_cls(minconn=0, maxconn=2, dsn=dsn) as pool:

        @with_transaction(pool)
        def writer(values, conn):
            for value in values:
                insert(conn, table, value)
                yield conn

        with pool.transaction() as outer:
            insert(outer, table, 1)
            gen = writer([10, 11, 12])
            assert next(gen) is not outer
            assert next(gen) is not outer
            insert(outer, table, 2)
            gen.close()  # abandoned half-way: its own transaction rolls back
            insert(outer, table, 3)
            assert rows(admin, table) == []  # the caller's transaction is still open
        assert rows(admin, table) == [1, 2, 3]  # and commits everything it did
        assert_every_slot_lendable(pool)


def test_transaction_generator_inside_a_transaction_commits_on_its_own(pool_cls, dsn, admin, table):
    class Abandon(Exception):
        pass

    with pool_cls(minconn=0, maxconn=2, dsn=dsn) as pool:

        @with_transaction(pool)
        def writer(values, conn):
            for value in values:
                insert(conn, table, value)
                yield conn

        with pytest.raises(Abandon), pool.transaction() as outer:
            insert(outer, table, 1)
            assert [conn is outer for conn in writer([10, 11])] == [False, False]
            assert rows(admin, table) == [10, 11]  # exhausted: committed at once, not at the caller's end
            raise Abandon
        assert rows(admin, table) == [10, 11]  # the caller's rollback took only its own row
        assert_every_slot_lendable(pool)


def test_transaction_generator_outliving_the_callers_transaction_keeps_its_own(pool_cls, dsn, admin, table):
    with pool_cls(minconn=0, maxconn=2, dsn=dsn) as pool:

        @with_transaction(pool)
        def writer(values, conn):
            for value in values:
                insert(conn, table, value)
                yield conn

        with pool.transaction() as outer:
            insert(outer, table, 1)
            gen = writer([10, 11, 12])
            theirs = next(gen)
        assert rows(admin, table) == [1]  # the caller committed its row only
        assert next(gen) is theirs
        gen.close()
        assert rows(admin, table) == [1]
        assert_every_slot_lendable(pool)
