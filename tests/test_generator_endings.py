"""A decorated generator's borrow ends when the generator does, whatever ends it; no session of the
pool is left idle in transaction once the borrow that opened it is gone."""

from __future__ import annotations

import gc

import pytest

from pgpool import BORROWED, ThreadSafeConnectionPool, with_connection, with_transaction

from .helpers import wait_until

pytestmark = pytest.mark.needs_session


def in_transaction(admin, app_name: str) -> int:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state LIKE 'idle in transaction%%'",
            (app_name,),
        )
        return int(cur.fetchone()[0])


@pytest.fixture
def locked_table(admin):
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS gen_rows (n int)")
        cur.execute("TRUNCATE gen_rows")
    return "gen_rows"


def writer(pool):
    @with_transaction(pool)
    def produce(conn=BORROWED):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO gen_rows VALUES (1)")  # holds a row lock until the borrow ends
            yield 1
            yield 2

    return produce


def test_a_generator_dropped_unfinished_is_rolled_back_and_given_back_with_no_other_call(
    dsn, admin, app_name, locked_table
):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as pool:
        gen = writer(pool)()
        next(gen)
        assert in_transaction(admin, app_name) == 1
        del gen  # nobody borrows afterwards: the housekeeper ends it
        assert wait_until(lambda: in_transaction(admin, app_name) == 0 and pool.stats()["in_use"] == 0, timeout=1.5)
        with admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM gen_rows")
            assert cur.fetchone()[0] == 0  # rolled back


def test_a_generator_in_a_reference_cycle_is_ended_once_collected(dsn, admin, app_name, locked_table):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as pool:
        gen = writer(pool)()
        next(gen)
        cycle = [gen]
        cycle.append(cycle)
        del gen, cycle
        gc.collect()
        assert wait_until(lambda: in_transaction(admin, app_name) == 0 and pool.stats()["in_use"] == 0, timeout=1.5)


@pytest.mark.parametrize("decorator", [with_connection, with_transaction])
def test_close_ends_every_generator_borrow_and_closes_its_session_before_it_returns(
    dsn, admin, app_name, sessions, decorator
):
    pool = ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn)
    finished = []

    @decorator(pool)
    def rows(conn=BORROWED):
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            yield 1
            yield 2
        finally:
            finished.append(True)

    live = rows()
    next(live)
    dropped = rows()
    next(dropped)
    cycle = [dropped]
    cycle.append(cycle)
    del dropped, cycle  # unreachable but not yet collected
    pool.close()
    assert finished == [True, True]  # both were closed: their finally clauses ran
    assert sessions(expect=0) == 0
    with pytest.raises(StopIteration):
        next(live)  # ended with its pool, as an exhausted generator


def test_an_exhausted_transaction_generator_commits(dsn, admin, locked_table):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        assert list(writer(pool)()) == [1, 2]
        with admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM gen_rows")
            assert cur.fetchone()[0] == 1
