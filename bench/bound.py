"""Contention against the bare FIFO bound (issue 18): pgpool, the bound and SQLAlchemy, interleaved.

    python -m bench.bound [--quick]

32 threads share 8 connections, each op borrow + SELECT 1 + return; every round runs each pool once
(pgpool, `pools.FifoBound`, SQLAlchemy's QueuePool), so pools compared run seconds apart on this
drifting machine, and the verdicts take the median of the round-by-round ratios. Then 8 threads / 8
connections, pgpool against the ideal (each thread its own connection, no pool), interleaved the same
way. Uses PGPOOL_DSN when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from . import scenarios
from .pools import FifoBound, PgPool, SQLAlchemyPool


@dataclass
class Settings:
    rounds: int
    duration: float


FULL = Settings(8, 2.0)
QUICK = Settings(3, 0.6)

IDEAL = "ideal (no pool)"
PGPOOL = PgPool.name
BOUND = FifoBound.name
SQLA = SQLAlchemyPool.name

# Issue 18's contention targets: (cell, measured, compared with, metric, op, bound).
TARGETS = [
    ("T=32, M=8", PGPOOL, BOUND, "ops_per_s", ">=", 0.9, "throughput vs the bare FIFO bound"),
    ("T=32, M=8", PGPOOL, SQLA, "max_ms", "<=", 0.1, "max latency vs SQLAlchemy's QueuePool"),
    ("T=8, M=8", PGPOOL, IDEAL, "ops_per_s", ">=", 0.9, "throughput vs the ideal (own connection each)"),
]


def measure(dsn: str, s: Settings) -> dict[str, dict[str, Any]]:
    """Round by round, per cell and pool: ops/s, p50/p99/max ms, slowest thread's share, errors."""
    cells: list[tuple[str, int, int, list[Any]]] = [
        ("T=32, M=8", 32, 8, [PgPool, FifoBound, SQLAlchemyPool]),
        ("T=8, M=8", 8, 8, [PgPool, None]),
    ]
    jobs = [(cell, t, m, make) for cell, t, m, makers in cells for _ in range(s.rounds) for make in makers]
    loads: dict[str, dict[str, list[scenarios.Load]]] = {}
    for cell, threads, maxconn, make in tqdm(jobs, desc="7/7 contention vs the FIFO bound", leave=True):
        if make is None:
            name, load = IDEAL, scenarios.ideal(dsn, maxconn, s.duration)
        else:
            pool = make(dsn, maxconn, maxconn)
            pool.warm(maxconn)
            try:
                name, load = make.name, scenarios.contention(pool, threads, s.duration)
            finally:
                pool.close()
        loads.setdefault(cell, {}).setdefault(name, []).append(load)
    out: dict[str, dict[str, Any]] = {}
    for cell, by_pool in loads.items():
        for name, runs in by_pool.items():
            out.setdefault(cell, {})[name] = {
                "ops_runs": [x.ops_per_s for x in runs],
                "max_runs": [x.max_ms for x in runs],
                "ops_per_s": scenarios.summary([x.ops_per_s for x in runs]),
                "p50_ms": scenarios.summary([x.percentile_ms(0.50) for x in runs]),
                "p99_ms": scenarios.summary([x.percentile_ms(0.99) for x in runs]),
                "max_ms": scenarios.summary([x.max_ms for x in runs]),
                "fairness": scenarios.summary([x.fairness for x in runs]),
                "errors": sum(x.errors for x in runs),
            }
    return out


def verdicts(results: dict[str, dict[str, Any]]) -> list[str]:
    """PASS/FAIL per target: the median of the round-by-round ratios (each round's pools side by side)."""
    lines = []
    for cell, mine, theirs, metric, op, bound, what in TARGETS:
        a = results.get(cell, {}).get(mine)
        b = results.get(cell, {}).get(theirs)
        if not a or not b:
            lines.append(f"FAIL {cell}: {what}: not measured")
            continue
        key = "ops_runs" if metric == "ops_per_s" else "max_runs"
        ratios = [x / y for x, y in zip(a[key], b[key], strict=True) if y]
        measured = statistics.median(ratios) if ratios else float("nan")
        ok = measured >= bound if op == ">=" else measured <= bound
        unit = "ops/s" if metric == "ops_per_s" else "ms"
        lo, hi = (min(ratios), max(ratios)) if ratios else (float("nan"),) * 2
        lines.append(
            f"{'PASS' if ok else 'FAIL'} {cell} {what}: {measured:.2f}x (target {op} {bound}x; rounds "
            f"{lo:.2f}-{hi:.2f}x; {a[metric][0]:,.1f} vs {b[metric][0]:,.1f} {unit})"
        )
    return lines


def markdown(results: dict[str, dict[str, Any]], lines: list[str]) -> list[str]:
    out = [
        "## 7. Contention against the bare FIFO bound (issue 18): interleaved rounds, borrow + SELECT 1 + return",
        "",
        "The bound: `bench/pools.py` `FifoBound` (a deque, one lock, a lock per waiter, a rollback on return, "
        "no checks). Ratios are medians of round-by-round ratios.",
        "",
        "```",
        *lines,
        "```",
        "",
    ]
    for cell, row in results.items():
        out += [f"### {cell}", "", "| pool | ops/s | p50 ms | p99 ms | max ms | slowest thread | errors |"]
        out += ["|---|---|---|---|---|---|---|"]
        for name, v in row.items():
            out.append(
                f"| {name} | {_fmt(v['ops_per_s'], 0)} | {_fmt(v['p50_ms'], 2)} | {_fmt(v['p99_ms'], 2)} "
                f"| {_fmt(v['max_ms'], 1)} | {_fmt(v['fairness'], 2)} | {v['errors']} |"
            )
        out.append("")
    return out


def _fmt(triple: tuple[float, float, float], digits: int) -> str:
    med, lo, hi = triple
    return f"{med:,.{digits}f} ({lo:,.{digits}f} to {hi:,.{digits}f})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    server = None
    dsn = os.environ.get("PGPOOL_DSN")
    if not dsn:
        from tests.embedded_pg import EmbeddedPostgres

        server = EmbeddedPostgres(max_connections=400)
        server.init()
        server.start()
        dsn = server.dsn
    try:
        results = measure(dsn, QUICK if args.quick else FULL)
    finally:
        if server is not None:
            server.destroy()
    lines = verdicts(results)
    print("\n".join(markdown(results, lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
