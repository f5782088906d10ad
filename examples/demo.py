"""A small threaded DAO workload: 8 threads share a pool of 4 connections.

Run it with ``make demo`` (which starts an embedded PostgreSQL unless PGPOOL_DSN is set), or directly
with ``PGPOOL_DSN=postgresql://127.0.0.1:5432/test python examples/demo.py``.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time

import pgpool
from pgpool import ThreadSafeConnectionPool, with_connection, with_transaction

# -- the DAO module: decorated before any pool exists, resolved at call time ------------------------

_pool: ThreadSafeConnectionPool | None = None


def get_pool() -> ThreadSafeConnectionPool:
    assert _pool is not None, "create the pool first"
    return _pool


@with_transaction(get_pool)
def create_schema(conn) -> None:
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS demo_accounts")
        cur.execute("CREATE TABLE demo_accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))")
        cur.execute("INSERT INTO demo_accounts SELECT g, 100 FROM generate_series(1, 20) g")


@with_transaction(get_pool)
def transfer(source: int, target: int, amount: int, conn) -> None:
    """Move money; the CHECK constraint makes some transfers fail, and those roll back whole."""
    changes = sorted([(source, -amount), (target, amount)])  # rows locked in id order: no deadlocks
    with conn.cursor() as cur:
        for account, delta in changes:
            cur.execute("UPDATE demo_accounts SET balance = balance + %s WHERE id = %s", (delta, account))


@with_connection(get_pool)
def total_balance(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT sum(balance) FROM demo_accounts")
        return int(cur.fetchone()[0])


@with_connection(get_pool)
def audit(conn) -> tuple[int, int]:
    """Nested calls join this borrow: one connection for the whole audit."""
    before = total_balance()  # joins: no second connection taken
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM demo_accounts WHERE balance = 0")
        empty = int(cur.fetchone()[0])
    return before, empty


def main() -> int:
    global _pool
    dsn = os.environ.get("PGPOOL_DSN")
    if not dsn:
        print("set PGPOOL_DSN, or run `make demo`, which starts an embedded PostgreSQL", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with ThreadSafeConnectionPool(minconn=2, maxconn=4, timeout=5, name="demo", dsn=dsn) as pool:
        _pool = pool
        create_schema()
        ok = failed = 0
        counts_lock = threading.Lock()

        def worker(seed: int) -> None:
            nonlocal ok, failed
            rng = random.Random(seed)
            for _ in range(150):
                source, target = rng.sample(range(1, 21), 2)
                try:
                    transfer(source, target, rng.randint(1, 60))
                    outcome = "ok"
                except pgpool.PoolTimeout:
                    raise
                except Exception:  # the CHECK constraint: rolled back, nothing half-done
                    outcome = "failed"
                with counts_lock:
                    if outcome == "ok":
                        ok += 1
                    else:
                        failed += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.perf_counter() - started

        total, empty = audit()
        stats = pool.stats()
        print(f"8 threads, {ok + failed} transfers in {elapsed:.2f} s: {ok} committed, {failed} rolled back")
        print(f"money is conserved: total balance {total} (expected 2000), {empty} empty accounts")
        print(f"pool: {pool!r}")
        print(
            "stats: {checkouts} checkouts, {connections_opened} connections opened (maxconn {maxconn}), "
            "{wait_ms_total} ms waited in total, {timeouts} timeouts".format(**stats)
        )
        if total != 2000 or stats["in_use"] != 0:
            print("something went wrong", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
