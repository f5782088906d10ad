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
from typing import Any

import psycopg2.errors
from psycopg2.extensions import connection, cursor

from pgpool import BORROWED, ThreadSafeConnectionPool, with_connection, with_transaction

# -- the DAO module: decorated before any pool exists, resolved at call time ------------------------

_pool: ThreadSafeConnectionPool | None = None


def get_pool() -> ThreadSafeConnectionPool:
    assert _pool is not None, "create the pool first"
    return _pool


def _one(cur: cursor) -> tuple[Any, ...]:
    """The row of a query that returns exactly one (here, aggregates)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


@with_transaction(get_pool)
def create_schema(conn: connection = BORROWED) -> None:
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS demo_accounts")
        cur.execute("CREATE TABLE demo_accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))")
        cur.execute("INSERT INTO demo_accounts SELECT g, 100 FROM generate_series(1, 20) g")


@with_transaction(get_pool)
def transfer(source: int, target: int, amount: int, conn: connection = BORROWED) -> None:
    """Move money; the CHECK constraint refuses a transfer that would overdraw, and it rolls back whole."""
    changes = sorted([(source, -amount), (target, amount)])  # rows locked in id order: no deadlocks
    with conn.cursor() as cur:
        for account, delta in changes:
            cur.execute("UPDATE demo_accounts SET balance = balance + %s WHERE id = %s", (delta, account))


@with_connection(get_pool)
def total_balance(conn: connection = BORROWED) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT sum(balance) FROM demo_accounts")
        return int(_one(cur)[0])


@with_connection(get_pool)
def audit(conn: connection = BORROWED) -> tuple[int, int]:
    """Nested calls join this borrow: one connection for the whole audit."""
    before = total_balance()  # joins: no second connection taken
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM demo_accounts WHERE balance = 0")
        empty = int(_one(cur)[0])
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
        threads_count, transfers_per_thread = 8, 150
        outcomes = {"committed": 0, "refused": 0}
        slowest = 0.0  # seconds, the longest transfer() call: its wait for a connection included
        counts_lock = threading.Lock()

        def worker(seed: int) -> None:
            nonlocal slowest
            rng = random.Random(seed)
            for _ in range(transfers_per_thread):
                source, target = rng.sample(range(1, 21), 2)
                called = time.perf_counter()
                try:
                    transfer(source, target, rng.randint(1, 60))
                    outcome = "committed"
                except psycopg2.errors.CheckViolation:  # would overdraw: rolled back, nothing half-done
                    outcome = "refused"
                took = time.perf_counter() - called
                with counts_lock:
                    outcomes[outcome] += 1
                    slowest = max(slowest, took)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.perf_counter() - started

        total, empty = audit()
        stats = pool.stats()
        done = outcomes["committed"] + outcomes["refused"]
        mean_wait_ms = stats["wait_ms_total"] / max(stats["checkouts"], 1)
        print(
            f"{threads_count} threads made {done} random transfers in {elapsed:.2f} s,"
            f" sharing a pool of at most {stats['maxconn']} connections:"
        )
        print(f"  {outcomes['committed']} committed")
        print(
            f"  {outcomes['refused']} refused for insufficient funds (the balance >= 0 constraint)"
            " and rolled back whole, as intended"
        )
        print(f"money is conserved: the 20 accounts hold {total} in total, as at the start ({empty} are empty)")
        print(
            f"waiting for a free connection: {mean_wait_ms:.2f} ms per borrow on average"
            f" over {stats['checkouts']} borrows; the slowest transfer took {slowest * 1000:.1f} ms, its wait included"
        )
        print(
            f"connections opened: {stats['connections_opened']} (maxconn {stats['maxconn']}),"
            f" timeouts: {stats['timeouts']}, in use at the end: {stats['in_use']}"
        )
        print(f"the pool at the end: {pool!r}")
        if total != 2000 or stats["in_use"] != 0 or done != threads_count * transfers_per_thread:
            print("something went wrong", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
