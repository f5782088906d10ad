"""Fork safety, with a real os.fork(): the child starts from zero, the parent's sessions survive."""

from __future__ import annotations

import gc
import os
import time
import traceback

import pytest

from pgpool import ThreadSafeConnectionPool

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    # Python 3.12+ warns on fork() with threads running (our housekeepers): forking is the test.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = int(cur.fetchone()[0])
    conn.rollback()
    return pid


def in_child(work) -> int:
    """Run work() in a forked child; return its exit status (0: every assertion held)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish in 60 s")


def test_child_starts_from_zero_connections_and_parent_keeps_its_own(dsn, sessions):
    with ThreadSafeConnectionPool(minconn=2, maxconn=4, timeout=5, dsn=dsn) as pool:
        lent = pool.getconn()  # started the housekeeper thread too
        parent_pids = {backend_pid(c) for c in pool.idle_connections} | {backend_pid(lent)}

        def child() -> None:
            stats = pool.stats()
            assert stats["idle"] == 0 and stats["in_use"] == 0, stats
            with pool.connection() as conn:
                assert backend_pid(conn) not in parent_pids
            pool.close()
            gc.collect()

        assert in_child(child) == 0
        # Every parent session is still there and answers.
        assert {backend_pid(c) for c in pool.idle_connections} | {backend_pid(lent)} == parent_pids
        pool.putconn(lent)
        assert sessions(expect=len(parent_pids)) == len(parent_pids)


def test_child_dropping_the_pool_does_not_end_the_parent_sessions(dsn):
    with ThreadSafeConnectionPool(minconn=3, dsn=dsn) as pool:
        parent_pids = [backend_pid(c) for c in pool.idle_connections]

        def child() -> None:
            nonlocal pool
            del pool  # garbage collecting psycopg2 connections sends Terminate: it must go nowhere
            gc.collect()

        assert in_child(child) == 0
        assert [backend_pid(c) for c in pool.idle_connections] == parent_pids


def test_a_connection_borrowed_before_fork_is_unusable_in_the_child_and_intact_in_the_parent(dsn):
    with ThreadSafeConnectionPool(minconn=0, dsn=dsn) as pool:
        conn = pool.getconn()
        before = backend_pid(conn)

        def child() -> None:
            try:
                backend_pid(conn)
            except Exception:
                return  # refused: the child cannot talk on the parent's session
            raise AssertionError("the child used the parent's session")

        assert in_child(child) == 0
        assert backend_pid(conn) == before
        pool.putconn(conn)
