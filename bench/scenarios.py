"""The measurements: each function runs one scenario once against one pool and returns numbers."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from .pools import Adapter

Work = Callable[[Any], None]  # what an op does with the connection it borrowed


def query(conn: Any) -> None:
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchone()
    cur.close()


ACCOUNTS = "pgpool_bench_accounts"
ACCOUNT_ROWS = 10_000


def setup_accounts(dsn: str) -> None:
    """The table of the real-work scenario: ACCOUNT_ROWS rows behind a primary key."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {ACCOUNTS}")
            cur.execute(f"CREATE TABLE {ACCOUNTS} (id int PRIMARY KEY, balance bigint NOT NULL)")
            cur.execute(f"INSERT INTO {ACCOUNTS} SELECT g, 0 FROM generate_series(1, {ACCOUNT_ROWS}) g")
            cur.execute(f"ANALYZE {ACCOUNTS}")
        conn.commit()
    finally:
        conn.close()


def drop_accounts(dsn: str) -> None:
    """Leave a shared server as found."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {ACCOUNTS}")
        conn.commit()
    finally:
        conn.close()


def transfer(conn: Any) -> None:
    """Real work: one indexed UPDATE of a random row, committed (a transaction of one statement)."""
    cur = conn.cursor()
    cur.execute(f"UPDATE {ACCOUNTS} SET balance = balance + 1 WHERE id = %s", (random.randint(1, ACCOUNT_ROWS),))
    cur.close()
    conn.commit()


def borrow_and_query(pool: Adapter, work: Work = query) -> None:
    """One operation of the multi-threaded scenarios: borrow, `work` (SELECT 1 by default), give back."""
    conn = pool.get()
    try:
        work(conn)
    finally:
        pool.put(conn)


def overhead_us(pool: Adapter, cycles: int, with_block: bool = False) -> float:
    """Microseconds per borrow + return, no query, one thread."""
    get, put = pool.get, pool.put
    if with_block:
        borrow = pool.pool.connection  # type: ignore[attr-defined]
        started = time.perf_counter()
        for _ in range(cycles):
            with borrow():
                pass
        return (time.perf_counter() - started) / cycles * 1e6
    started = time.perf_counter()
    for _ in range(cycles):
        put(get())
    return (time.perf_counter() - started) / cycles * 1e6


def one_query_us(pool: Adapter, ops: int) -> float:
    """Microseconds per borrow + SELECT 1 + return, one thread."""
    get, put = pool.get, pool.put
    started = time.perf_counter()
    for _ in range(ops):
        conn = get()
        query(conn)
        put(conn)
    return (time.perf_counter() - started) / ops * 1e6


def no_pool_query_us(dsn: str, ops: int) -> float:
    """The limit: one connection held, SELECT 1 and rollback (what a return does), one thread."""
    conn = psycopg2.connect(dsn)
    try:
        started = time.perf_counter()
        for _ in range(ops):
            query(conn)
            conn.rollback()
        return (time.perf_counter() - started) / ops * 1e6
    finally:
        conn.close()


@dataclass
class Load:
    """What a multi-threaded run measured."""

    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds per successful op
    errors: int = 0
    per_thread: list[int] = field(default_factory=list)  # successful ops of each thread (fairness)

    @property
    def ops_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def max_ms(self) -> float:
        return max(self.latencies, default=float("nan")) * 1000

    @property
    def fairness(self) -> float:
        """Ops of the thread that did the fewest, as a fraction of the mean (1.0: perfectly fair)."""
        if not self.per_thread or not sum(self.per_thread):
            return float("nan")
        return min(self.per_thread) / (sum(self.per_thread) / len(self.per_thread))


# Where the latency distribution is sampled for the plot: fractions of ops at or below (1.0: the max).
QUANTILES = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0]


def distribution(loads: list[Load]) -> dict[str, list[float]]:
    """What the latency plot needs from the runs of one cell: latency quantiles (ms) and the ops of
    every thread divided by the mean of its run."""
    ordered = sorted(x for load in loads for x in load.latencies)
    quantiles = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 for q in QUANTILES] if ordered else []
    shares = []
    for load in loads:
        mean = sum(load.per_thread) / len(load.per_thread) if load.per_thread else 0
        shares += [n / mean for n in load.per_thread] if mean else []
    return {"q": QUANTILES, "ms": quantiles, "thread_shares": sorted(shares)}


def run_threads(threads: int, duration: float, op: Callable[[], None]) -> Load:
    """Run `op` in a loop from `threads` threads for `duration` seconds; time every op."""
    barrier = threading.Barrier(threads + 1)
    results: list[tuple[list[float], int]] = []
    lock = threading.Lock()
    deadline = 0.0

    def worker() -> None:
        mine: list[float] = []
        errors = 0
        barrier.wait(timeout=60)
        clock = time.perf_counter
        while True:
            started = clock()
            if started >= deadline:
                break
            try:
                op()
            except Exception:
                errors += 1
                continue
            mine.append(clock() - started)
        with lock:
            results.append((mine, errors))

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    deadline = time.perf_counter() + duration
    barrier.wait(timeout=60)
    started = time.perf_counter()
    for t in workers:
        t.join(timeout=duration + 60)
    load = Load(seconds=time.perf_counter() - started)
    for latencies, errors in results:
        load.latencies.extend(latencies)
        load.errors += errors
        load.per_thread.append(len(latencies))
    return load


def contention(pool: Adapter, threads: int, duration: float, work: Work = query) -> Load:
    return run_threads(threads, duration, lambda: borrow_and_query(pool, work))


def ideal(dsn: str, threads: int, duration: float, work: Work = query) -> Load:
    """min(T, M) threads each holding its own connection: no pool at all (`work`, then a rollback,
    which is what a return does)."""
    conns = [psycopg2.connect(dsn) for _ in range(threads)]  # connected before timing
    handed = iter(conns)
    local = threading.local()
    lock = threading.Lock()

    def op() -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            with lock:
                conn = local.conn = next(handed)
        work(conn)
        conn.rollback()

    try:
        return run_threads(threads, duration, op)
    finally:
        for conn in conns:
            conn.close()


def cold_burst_s(make_pool: Callable[[], Adapter], threads: int) -> tuple[float, int]:
    """Seconds until `threads` threads, arriving together at an empty pool, have all run a query."""
    pool = make_pool()
    barrier = threading.Barrier(threads + 1)
    errors = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal errors
        barrier.wait(timeout=60)
        try:
            borrow_and_query(pool)
        except Exception:
            with lock:
                errors += 1

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    barrier.wait(timeout=60)
    started = time.perf_counter()
    for t in workers:
        t.join(timeout=120)
    elapsed = time.perf_counter() - started
    pool.close()
    return elapsed, errors


@dataclass
class Recovery:
    errors_before_back: int
    errors_after_back: int
    recovery_s: float  # from the server being back to throughput back at half its level before


def recovery(pool: Adapter, threads: int, restart: Callable[[], None], before: float, after: float) -> Recovery:
    """A steady load while the server restarts: errors the application sees and time to recover."""
    events: list[tuple[float, float, bool]] = []  # (start, end, ok)
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        mine = []
        while not stop.is_set():
            started = time.perf_counter()
            ok = True
            try:
                borrow_and_query(pool)
            except Exception:
                ok = False
                time.sleep(0.01)  # an application would not spin on errors either
            mine.append((started, time.perf_counter(), ok))
        with lock:
            events.extend(mine)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    time.sleep(before)
    restart()
    back = time.perf_counter()
    time.sleep(after)
    stop.set()
    for t in workers:
        t.join(timeout=60)

    baseline = sum(1 for s, e, ok in events if ok and t0 + 0.2 <= e < t0 + before) / max(before - 0.2, 0.1)
    window = 0.1
    recovered_at = float("inf")
    start = back  # slide a 100 ms window from the moment the server is back
    while start < back + after - window:
        done = sum(1 for s, e, ok in events if ok and start <= e < start + window)
        if done / window >= baseline / 2:
            recovered_at = start - back
            break
        start += window / 2
    return Recovery(
        errors_before_back=sum(1 for s, e, ok in events if not ok and s < back),
        errors_after_back=sum(1 for s, e, ok in events if not ok and s >= back),
        recovery_s=recovered_at,
    )


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, min and max of repeated measurements."""
    return statistics.median(values), min(values), max(values)
