"""Soak: 64 threads, 200,000 borrows with failures injected; nothing leaks, nobody shares."""

from __future__ import annotations

import os
import random
import threading

import psycopg2
import pytest

from pgpool import ThreadSafeConnectionPool

from ..helpers import join_all

pytestmark = pytest.mark.faults

THREADS = 64
BORROWS = 200_000
MAXCONN = 16


class Injected(Exception):
    pass


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_with_injected_failures_keeps_every_promise(dsn, sessions):
    holders: dict[int, int] = {}
    holders_lock = threading.Lock()
    shared: list[str] = []
    counts = {"ok": 0, "raised": 0, "terminated": 0, "closed": 0}
    counts_lock = threading.Lock()
    per_thread = BORROWS // THREADS
    rss: list[int] = []
    warmed = threading.Barrier(THREADS, action=lambda: rss.append(rss_bytes()))

    with ThreadSafeConnectionPool(minconn=4, maxconn=MAXCONN, timeout=60, dsn=dsn) as pool:

        def work(seed: int) -> None:
            rng = random.Random(seed)
            mine = dict.fromkeys(counts, 0)
            for i in range(per_thread):
                if i == per_thread // 10:
                    warmed.wait(timeout=120)
                roll = rng.random()
                try:
                    with pool.connection() as conn:
                        with holders_lock:
                            if id(conn) in holders:
                                shared.append(f"{id(conn):x} held by {holders[id(conn)]} and {seed}")
                            holders[id(conn)] = seed
                        try:
                            with conn.cursor() as cur:
                                if roll < 0.0005:
                                    mine["terminated"] += 1
                                    cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
                                elif roll < 0.001:
                                    mine["closed"] += 1
                                    conn.close()
                                else:
                                    cur.execute("SELECT 1")
                                    if roll < 0.02:
                                        mine["raised"] += 1
                                        raise Injected
                                    mine["ok"] += 1
                        finally:
                            with holders_lock:
                                del holders[id(conn)]
                except (Injected, psycopg2.Error):
                    pass
            with counts_lock:
                for key, value in mine.items():
                    counts[key] += value

        workers = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for t in workers:
            t.start()
        join_all(workers, timeout=600)
        stats = pool.stats()
        assert not shared, shared[:3]
        assert sum(counts.values()) == per_thread * THREADS
        assert counts["terminated"] > 0 and counts["closed"] > 0 and counts["raised"] > 0
        assert stats["in_use"] == 0 and stats["waiting"] == 0 and stats["opening"] == 0
        assert stats["idle"] + stats["in_use"] == sessions(expect=stats["idle"])
        assert stats["idle"] <= MAXCONN
        grown = rss_bytes() - rss[0]
        assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over the soak"
