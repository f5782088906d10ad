"""Edges found by a hostile review of the "cannot leak" promises, each pinned by a test."""

from __future__ import annotations

import contextvars
import ctypes
import gc
import os
import select
import threading
import time
from collections import deque

import psycopg2
import pytest

import pgpool
from pgpool import PoolError, ThreadSafeConnectionPool

from .helpers import join_all, wait_until

pytestmark = pytest.mark.needs_session


def test_a_decorated_generator_collected_while_the_pool_lock_is_held_does_not_deadlock(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn, timeout=5) as pool:

        @pgpool.with_connection(pool)
        def rows(conn=None):
            yield 1
            yield 2

        gen = rows()
        next(gen)  # holds its own borrow
        cycle = [gen]
        cycle.append(cycle)  # only the cycle collector can free it
        del gen, cycle
        done = threading.Event()

        def collect_under_the_lock() -> None:
            with pool._state.lock:  # as if the collector ran inside one of the pool's own methods
                gc.collect()
            done.set()

        collector = threading.Thread(target=collect_under_the_lock)
        collector.start()
        collector.join(5)
        assert done.is_set(), "the finalizer deadlocked on the pool's lock"
        conn = pool.getconn()  # ends the collected generator's borrow first (rolled back, returned)
        assert pool.stats()["in_use"] == 1
        pool.putconn(conn)


def test_a_second_thread_stepping_a_running_decorated_generator_is_refused_and_nothing_is_lost(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=5) as pool:
        inside, release = threading.Event(), threading.Event()

        @pgpool.with_connection(pool)
        def slow(conn=None):
            inside.set()
            release.wait(5)
            yield conn.info.backend_pid
            yield 2

        gen = slow()
        results: list[object] = []
        first = threading.Thread(target=lambda: results.append(next(gen)))
        first.start()
        assert inside.wait(5)
        with pytest.raises(ValueError, match="generator already executing"):
            next(gen)
        release.set()
        join_all([first])
        assert list(gen) == [2]  # the generator goes on, then ends its borrow
        assert pool.stats()["in_use"] == 0


def test_a_context_copied_from_a_finished_thread_never_joins_its_borrow(dsn):
    """Thread idents are reused; the borrow's owner is the Thread object, which is not."""
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn, timeout=5) as pool:
        left: dict[str, object] = {}

        def holder() -> None:
            def gen():
                with pool.connection() as conn:
                    yield conn

            g = gen()
            left["conn"] = next(g)  # suspended inside the borrow, in this thread's context
            left["ctx"] = contextvars.copy_context()
            left["gen"] = g

        for _ in range(5):
            first = threading.Thread(target=holder)
            first.start()
            join_all([first])
            got: list[object] = []

            def borrow(got=got) -> None:
                with pool.connection() as conn:
                    got.append(conn)

            second = threading.Thread(target=left["ctx"].run, args=(borrow,))  # type: ignore[attr-defined]
            second.start()
            join_all([second])
            assert got[0] is not left["conn"]
            left["gen"].close()  # type: ignore[attr-defined]
        assert pool.stats()["in_use"] == 0


def test_two_threads_getting_the_same_key_at_once_share_one_connection(dsn, monkeypatch):
    real_connect = psycopg2.connect

    def slow_connect(*args, **kwargs):
        time.sleep(0.2)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg2, "connect", slow_connect)
    with ThreadSafeConnectionPool(minconn=0, maxconn=4, dsn=dsn) as pool:
        got: list[object] = []
        threads = [threading.Thread(target=lambda: got.append(pool.getconn("job-1"))) for _ in range(2)]
        for t in threads:
            t.start()
        join_all(threads)
        assert got[0] is got[1]
        pool.putconn(key="job-1")
        assert pool.stats()["in_use"] == 0


@pytest.mark.parametrize("pool_cls", [pgpool.ConnectionPool, ThreadSafeConnectionPool], ids=["plain", "threadsafe"])
def test_a_client_encoding_set_in_sql_does_not_reach_the_next_borrower(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SET client_encoding TO 'LATIN1'")
            conn.commit()
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SHOW client_encoding")
            assert cur.fetchone()[0] == conn.encoding == "UTF8"
            cur.execute("SELECT length('café')")
            assert cur.fetchone()[0] == 4


def test_getconn_waits_for_a_connection_being_returned_instead_of_reporting_exhaustion(dsn):
    def slow_reset(conn) -> None:
        time.sleep(0.3)

    with ThreadSafeConnectionPool(1, 1, dsn=dsn, reset=slow_reset) as pool:
        conn = pool.getconn()
        returning = threading.Thread(target=pool.putconn, args=(conn,))
        returning.start()
        assert wait_until(lambda: pool._state.returning == 1, timeout=5)
        again = pool.getconn()  # timeout=0, but nothing is lent: it waits for the return
        join_all([returning])
        assert again is conn
        pool.putconn(again)


def test_a_configure_that_keeps_notices_in_a_deque_is_cleaned_on_return(dsn):
    def configure(conn) -> None:
        conn.notices = deque(maxlen=10)  # as psycopg2's documentation suggests

    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, configure=configure) as pool:
        with pool.connection() as conn, conn.cursor() as cur:
            pid = conn.info.backend_pid
            cur.execute("DO $$ BEGIN RAISE NOTICE 'for me only'; END $$")
        with pool.connection() as conn:
            assert conn.info.backend_pid == pid and not conn.notices
        assert pool.stats()["broken_discarded"] == 0


@pytest.mark.parametrize("maxconn", [1.5, 2.000001, True, "3"])
def test_maxconn_must_be_a_whole_number_or_infinity(dsn, maxconn):
    with pytest.raises(ValueError, match="maxconn must be an integer"):
        ThreadSafeConnectionPool(minconn=0, maxconn=maxconn, dsn=dsn)


def test_a_dsn_with_an_unquoted_password_containing_a_space_never_shows_a_piece_of_it():
    with pytest.raises(ValueError) as info:
        ThreadSafeConnectionPool(minconn=0, dsn="host=127.0.0.1 password=se cretpart")
    assert "cretpart" not in str(info.value)


def test_the_housekeeper_survives_an_exception_raised_into_its_thread(dsn):
    with ThreadSafeConnectionPool(minconn=2, maxconn=4, dsn=dsn) as pool:
        pool.putconn(pool.getconn())  # starts the housekeeper
        thread = pool._housekeeper._thread
        assert thread is not None and thread.ident is not None
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
        pool.clear()  # wakes it: the exception lands, then it must still refill minconn
        assert wait_until(lambda: pool.stats()["idle"] == 2, timeout=10)
        assert thread.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_leaving_an_inherited_transaction_neither_raises_nor_touches_the_parents_work(dsn, admin):
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS review_fork (v int)")
        cur.execute("TRUNCATE review_fork")
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as pool:
        read, write = os.pipe()
        pid = -1
        try:
            with pool.transaction() as conn:
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO review_fork VALUES (1)")
                pid = os.fork()
            # The child got here by leaving the inherited block: it must not have raised, and its
            # next borrow is a fresh connection of its own.
            if pid == 0:
                with pool.connection() as mine, mine.cursor() as cur:
                    cur.execute("SELECT 1")
                os.write(write, b"\0")
                os._exit(0)
        except BaseException:
            if pid == 0:
                os.write(write, b"\5")
                os._exit(5)
            raise
        os.close(write)
        ready, _, _ = select.select([read], [], [], 10)
        if not ready:
            os.kill(pid, 9)
        assert ready, "the child hung"
        assert os.read(read, 1) == b"\0", "leaving the inherited transaction raised in the child"
        os.close(read)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM review_fork")
        assert cur.fetchone()[0] == 1  # the parent's commit, once; the child committed nothing
        cur.execute("DROP TABLE review_fork")


def test_putconn_of_a_connection_under_a_foreign_key_is_refused(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pytest.raises(PoolError, match="no connection is lent under key"):
            pool.putconn(key="never")


def test_a_dropped_generators_finally_runs_before_its_connection_goes_back(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn, timeout=5) as pool:
        seen: dict[str, object] = {}

        @pgpool.with_connection(pool)
        def rows(conn=None):
            try:
                yield 1
                yield 2
            finally:
                # Still this generator's connection: nobody else may be lent it meanwhile.
                other = pool.getconn()
                seen["shared"] = other is conn
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                pool.putconn(other)

        gen = rows()
        next(gen)
        cycle = [gen]
        cycle.append(cycle)
        del gen, cycle
        gc.collect()
        # No call on the pool: its housekeeper ends the dropped borrow, the finally first.
        assert wait_until(lambda: "shared" in seen and pool.stats()["in_use"] == 0, timeout=2)
        assert seen == {"shared": False}


@pytest.mark.timing
def test_a_waiter_is_served_when_the_generator_holding_the_only_connection_is_dropped(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=5) as pool:

        @pgpool.with_connection(pool)
        def rows(conn=None):
            yield 1
            yield 2

        gen = rows()
        next(gen)
        waited: list[float] = []

        def wait_for_it() -> None:
            started = time.monotonic()
            pool.putconn(pool.getconn())
            waited.append(time.monotonic() - started)

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 1)
        del gen  # collected at once: its borrow is queued, and the waiter ends it
        join_all([waiter])
        assert waited and waited[0] < 3, waited


def test_an_interrupt_after_putconn_served_a_waiter_never_returns_the_waiters_connection(dsn):
    """The interrupt lands on a line event right after the return was settled (a C-call boundary)."""
    import inspect
    import sys

    from pgpool._returning import Returning

    source, first = inspect.getsourcelines(Returning._return)
    target = first + next(i for i, line in enumerate(source) if line.strip() == "if to_close:")
    fired: list[bool] = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is Returning._return.__code__:
            return local
        return None

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return local

    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn, timeout=3) as pool:
        a, b = pool.getconn(), pool.getconn()
        got: list[object] = []
        release = threading.Event()

        def waiter() -> None:
            conn = pool.getconn()
            got.append(conn)
            release.wait(5)
            pool.putconn(conn)

        thread = threading.Thread(target=waiter)
        thread.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 1)
        a.autocommit = True  # a session characteristic to restore: the slow return path serves the waiter
        with a.cursor() as cur:
            cur.execute("SELECT 1")
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                pool.putconn(a)
        finally:
            sys.settrace(None)
        assert fired and wait_until(lambda: bool(got))
        assert got[0] is a
        with pytest.raises(pgpool.PoolTimeout):
            pool.getconn(timeout=0.3)  # the waiter's connection is not lent a second time
        release.set()
        join_all([thread])
        pool.putconn(b)
        assert pool.stats()["in_use"] == 0
