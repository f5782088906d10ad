"""Fork at the edges: while a parent thread runs a query, inside a borrow, and the child's own stats.

Each child reports on a pipe what it got through and exits with os._exit (never into pytest): 0 when
every check held, CHECK_FAILED or CRASHED with the traceback on the pipe, and a child that hangs is
killed after a few seconds and fails the test.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import traceback
from collections.abc import Callable

import pytest
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from pgpool import ThreadSafeConnectionPool

from .helpers import rows, wait_until

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    # Python 3.12+ warns on fork() with threads running (our housekeepers): forking is the test.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

CHECK_FAILED = 3  # an assertion in the child failed
CRASHED = 4  # the child raised something else
BORROW_EXIT_RAISED = 5  # leaving the borrow inherited from the parent raised in the child

COUNTERS = (
    "checkouts",
    "connections_opened",
    "connections_closed",
    "connect_errors",
    "timeouts",
    "broken_discarded",
    "wait_ms_total",
)


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = int(cur.fetchone()[0])
    conn.rollback()
    return pid


def insert(conn, table, value) -> None:
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))


class Child:
    """One side of a fork with a pipe from the child to the parent: `pid` is 0 in the child."""

    def __init__(self) -> None:
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            self._fd = write
        else:
            os.close(write)
            self._fd = read

    # -- in the child

    def say(self, line: str) -> None:
        os.write(self._fd, line.encode() + b"\n")

    def exit(self, code: int, error: BaseException | None = None) -> None:
        """End the child at once: no pytest teardown, no atexit, no finalizer."""
        try:
            if error is not None:
                self.say("".join(traceback.format_exception(error)))
        finally:
            os._exit(code)

    def run(self, work: Callable[[Child], None]) -> None:
        """Run work(self) and exit with its outcome; never returns."""
        try:
            work(self)
        except AssertionError as exc:
            self.exit(CHECK_FAILED, exc)
        except BaseException as exc:
            self.exit(CRASHED, exc)
        self.exit(0)

    # -- in the parent

    def wait(self, timeout: float) -> tuple[int | None, str]:
        """Wait for the child's exit code (None: it hung and was killed) and what it said."""
        deadline = time.monotonic() + timeout
        code = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.02)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        chunks = []
        while chunk := os.read(self._fd, 65536):  # the child is gone: the pipe ends
            chunks.append(chunk)
        os.close(self._fd)
        return code, b"".join(chunks).decode(errors="replace")


def fork_and_wait(work: Callable[[Child], None], timeout: float = 10) -> tuple[int | None, str]:
    child = Child()
    if child.pid == 0:
        child.run(work)  # never returns
    return child.wait(timeout)


def test_child_forked_while_a_parent_thread_runs_a_query_does_not_hang(dsn, admin, sessions):
    with ThreadSafeConnectionPool(minconn=0, maxconn=3, timeout=5, dsn=dsn) as pool:
        started = threading.Event()
        outcome: dict[str, object] = {}

        def long_query() -> None:
            try:
                with pool.connection() as conn:
                    outcome["pid"] = backend_pid(conn)
                    started.set()
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_sleep(2), 42")
                        outcome["value"] = cur.fetchone()[1]
                    outcome["pid_after"] = backend_pid(conn)
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                started.set()

        t = threading.Thread(target=long_query)
        t.start()
        try:
            assert started.wait(10) and "error" not in outcome, outcome
            parent_pid = outcome["pid"]

            def running() -> bool:
                with admin.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
                        " AND query LIKE 'SELECT pg_sleep%%'",
                        (parent_pid,),
                    )
                    return bool(cur.fetchone()[0])

            # The thread is inside execute(), holding its connection's lock, when we fork.
            assert wait_until(running, timeout=5)

            def child(me: Child) -> None:
                me.say("forked")
                stats = pool.stats()
                assert (stats["in_use"], stats["idle"]) == (0, 0), stats
                with pool.connection(timeout=3) as conn:
                    me.say("borrowed")
                    assert backend_pid(conn) != parent_pid
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        assert cur.fetchone() == (1,)
                me.say("queried")
                pool.close()
                gc.collect()
                me.say("closed")

            started_at = time.monotonic()
            code, said = fork_and_wait(child, timeout=5)
            took = time.monotonic() - started_at
            assert code is not None, f"the child hung and was killed after {took:.1f} s; it said: {said!r}"
            assert code == 0, f"the child exited with {code}: {said}"
        finally:
            t.join(timeout=10)
        assert not t.is_alive()
        assert "error" not in outcome, outcome
        assert outcome["value"] == 42 and outcome["pid_after"] == parent_pid
        with pool.connection() as conn:  # the parent's session, intact and lent again
            assert backend_pid(conn) == parent_pid
        assert sessions(expect=1) == 1  # the child's own session is gone, the parent's is not


def test_fork_inside_a_borrow_leaves_the_child_without_one(pool_cls, dsn, admin, table, sessions):
    with pool_cls(minconn=0, maxconn=2, dsn=dsn) as pool:
        child = None
        try:
            with pool.connection() as conn:
                parent_pid = backend_pid(conn)
                child = Child()
                if child.pid == 0:
                    try:
                        with pool.connection() as fresh:  # lexically nested, but the borrow is the parent's
                            assert fresh is not conn
                            fresh_pid = backend_pid(fresh)
                            assert fresh_pid != parent_pid
                        child.say(f"fresh connection {fresh_pid}")
                        with pool.transaction() as tx:  # a transaction of its own, not on the parent's session
                            assert tx is not conn
                            insert(tx, table, 1)
                        child.say("committed")
                    except AssertionError as exc:
                        child.exit(CHECK_FAILED, exc)
                    except BaseException as exc:
                        child.exit(CRASHED, exc)
                    # Fall through: the child now leaves the borrow it inherited.
                else:
                    code, said = child.wait(timeout=10)
                    assert backend_pid(conn) == parent_pid  # still ours, still working
                    assert conn.info.transaction_status == TRANSACTION_STATUS_IDLE  # the child sent nothing
        except BaseException as exc:
            if child is not None and child.pid == 0:
                child.exit(BORROW_EXIT_RAISED, exc)
            raise
        if child is not None and child.pid == 0:

            def after_the_inherited_borrow(me: Child) -> None:
                me.say("left the inherited borrow")
                assert pool.stats()["in_use"] == 0, pool.stats()
                pool.close()

            child.run(after_the_inherited_borrow)  # never returns
        assert child is not None
        assert code == 0, f"the child exited with {code}: {said}"
        assert "left the inherited borrow" in said
        assert rows(admin, table) == [1]
        assert pool.stats()["in_use"] == 0 and list(pool.idle_connections) == [conn]
        with pool.connection() as again:
            assert backend_pid(again) == parent_pid
        assert sessions(expect=1) == 1


def test_child_stats_counters_start_from_zero(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=3, dsn=dsn) as pool:
        with pool.connection():
            pass
        lent = pool.getconn()
        idle = pool.getconn()
        pool.putconn(idle)
        parent = {name: pool.stats()[name] for name in COUNTERS}
        assert parent["checkouts"] == 3 and parent["connections_opened"] == 2, parent

        def child(me: Child) -> None:
            stats = pool.stats()
            counters = {name: stats[name] for name in COUNTERS}
            me.say(f"after fork: {counters}")
            assert counters == dict.fromkeys(COUNTERS, 0), f"the child inherited the parent's counters: {counters}"
            with pool.connection():
                pass
            stats = pool.stats()
            me.say(f"after one borrow: {stats}")
            assert (stats["checkouts"], stats["connections_opened"]) == (1, 1), stats
            pool.close()

        code, said = fork_and_wait(child)
        pool.putconn(lent)
        assert code == 0, f"the child exited with {code}: {said}"
        assert {name: pool.stats()[name] for name in COUNTERS} == parent  # the child's story is its own
