"""A full outage: the embedded server restarts while the pool is idle and while it is under load."""

from __future__ import annotations

import threading
import time

import pytest

from pgpool import ThreadSafeConnectionPool

from ..helpers import join_all, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.embedded]


def test_after_a_restart_while_idle_the_pool_returns_to_minconn_by_itself(embedded, dsn, sessions):
    with ThreadSafeConnectionPool(minconn=3, maxconn=5, timeout=10, dsn=dsn) as pool:
        pool.putconn(pool.getconn())  # the housekeeper runs from here on
        old = list(pool.idle_connections)
        embedded.restart()
        # Nobody borrows: the housekeeper notices the dead idle connections and replaces them.
        assert wait_until(lambda: sessions() == 3 and not set(pool.idle_connections) & set(old), timeout=10)
        assert all(c.closed for c in old)
        for _ in range(5):
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")


def test_every_request_that_starts_after_a_restart_under_load_succeeds(embedded, dsn):
    events: list[tuple[float, bool, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    with ThreadSafeConnectionPool(minconn=4, maxconn=4, timeout=20, dsn=dsn) as pool:

        def load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    with pool.connection() as conn, conn.cursor() as cur:
                        cur.execute("SELECT 1")
                    outcome = (started, True, "")
                except Exception as exc:
                    outcome = (started, False, repr(exc))
                    time.sleep(0.01)
                with lock:
                    events.append(outcome)

        workers = [threading.Thread(target=load) for _ in range(8)]
        for t in workers:
            t.start()
        time.sleep(0.5)
        embedded.restart()
        back = time.monotonic()
        time.sleep(1.5)
        stop.set()
        join_all(workers)
    after = [e for e in events if e[0] >= back]
    assert len(after) > 50, f"only {len(after)} requests after the restart"
    failed = [e for e in after if not e[1]]
    assert not failed, f"{len(failed)} requests failed after the server was back, e.g. {failed[0][2]}"
