"""A second interrupt landing on the entry of a cleanup's retry (a signal storm under GIL contention
delivers signals at consecutive check points): pgpool's own callers must retry until the cleanup
gets past its entry, not once. Each test simulates "interrupted on the entry" by replacing the
cleanup on the instance with one that raises KeyboardInterrupt before running the real one."""

from __future__ import annotations

import psycopg2
import psycopg2.extensions
import pytest

import pgpool


def interrupted_on_entry(real, times):
    hits = []

    def wrapper(*args, **kwargs):
        if len(hits) < times:
            hits.append(1)
            raise KeyboardInterrupt("on the entry")
        return real(*args, **kwargs)

    wrapper.hits = hits
    return wrapper


def test_getconn_interrupted_gives_back_its_slot_despite_two_interrupts_on_the_cleanup(dsn: str) -> None:
    fail = [True]

    class InterruptedConnect(psycopg2.extensions.connection):
        def __init__(self, *args, **kwargs):
            if fail[0]:
                raise KeyboardInterrupt("during the connect")
            super().__init__(*args, **kwargs)

    pool = pgpool.ThreadSafeConnectionPool(0, 2, dsn=dsn, timeout=1, connection_factory=InterruptedConnect)
    try:
        pool._lending._give_back_claim = interrupted_on_entry(pool._lending._give_back_claim, 2)
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()
        assert pool.stats()["opening"] == 0, pool.stats()  # the reserved slot came back
        fail[0] = False
        a, b = pool.getconn(), pool.getconn()  # both slots usable
        pool.putconn(a)
        pool.putconn(b)
    finally:
        pool.close()


def test_with_block_exit_finishes_the_return_despite_an_interrupt_on_the_finish(dsn: str) -> None:
    pool = pgpool.ThreadSafeConnectionPool(0, 1, dsn=dsn, timeout=1, reset=lambda conn: None)  # slow return path
    try:
        real_return, real_finish = pool._return, pool._finish_borrow
        pool._return = interrupted_on_entry(real_return, 1)  # the interrupt that sends __exit__ to its except
        pool._finish_borrow = interrupted_on_entry(real_finish, 1)  # and one on the retry's entry
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                pass
        pool._return, pool._finish_borrow = real_return, real_finish
        assert pool.stats()["in_use"] == 0, pool.stats()  # `conn` is still referenced: no GC rescue
        with pool.connection(timeout=0.5) as again:
            assert again is conn
    finally:
        pool.close()


def test_decorated_function_returns_its_connection_despite_two_interrupts_on_the_exit(dsn: str) -> None:
    pool = pgpool.ThreadSafeConnectionPool(0, 1, dsn=dsn, timeout=1)
    kept = []

    @pgpool.with_connection(pool)
    def work(conn=None):
        kept.append(conn)
        raise ValueError("the function fails")

    real_exit = pgpool.borrow.ConnectionBorrow.__exit__
    calls = []

    def exit_interrupted_twice(self, *exc):
        if len(calls) < 2:
            calls.append(1)
            raise KeyboardInterrupt("on the entry of __exit__")
        return real_exit(self, *exc)

    try:
        pgpool.borrow.ConnectionBorrow.__exit__ = exit_interrupted_twice
        try:
            with pytest.raises((ValueError, KeyboardInterrupt)):
                work()
        finally:
            pgpool.borrow.ConnectionBorrow.__exit__ = real_exit
        assert pool.stats()["in_use"] == 0, pool.stats()
    finally:
        pool.close()


def test_a_block_whose_exit_was_skipped_is_never_joined_and_its_slot_comes_back(dsn: str) -> None:
    """The one point no code can protect: an interrupt on the entry of the __exit__ that the
    application's own with statement calls. The lost borrow must not stay joinable in this thread's
    context (every later block would share its connection), and the collector frees its slot."""
    import gc

    pool = pgpool.ThreadSafeConnectionPool(0, 1, dsn=dsn, timeout=1)
    real_exit = pgpool.borrow.ConnectionBorrow.__exit__
    calls = []

    def exit_skipped(self, *exc):
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt("on the entry of __exit__")
        return real_exit(self, *exc)

    try:
        pgpool.borrow.ConnectionBorrow.__exit__ = exit_skipped
        try:
            with pool.connection() as lost:
                lost_pid = lost.info.backend_pid
        except KeyboardInterrupt:
            pass
        finally:
            pgpool.borrow.ConnectionBorrow.__exit__ = real_exit
        del lost
        gc.collect()
        with pool.connection(timeout=1) as conn, conn.cursor() as cur:  # a slot, not a join
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone()[0] != lost_pid
        assert pool.stats()["leaked"] == 1
    finally:
        pool.close()
