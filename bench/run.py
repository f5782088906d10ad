"""``make bench``: pgpool against the other Python pools, side by side in one run.

    python -m bench.run [--quick] [--out bench/results]

Uses PGPOOL_DSN when set; otherwise starts an embedded PostgreSQL (which also allows the recovery
scenario, that restarts the server). Writes ``latest.md`` and ``latest.png`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from tqdm import tqdm

from tests.embedded_pg import EmbeddedPostgres
from tests.tcp_proxy import TcpProxy

from . import bound, callgrind, report, scenarios
from .pools import ALL, PEERS, PgPool, PgPoolChecked, PgPoolInstrumented, PgPoolWithBlock


@dataclass
class Settings:
    reps: int
    overhead_cycles: int
    query_ops: int
    duration: float
    contention: list[tuple[int, int]]
    real_work: list[tuple[int, int]]  # (threads, connections) of the indexed-UPDATE scenario
    burst_threads: int
    burst_reps: int
    connect_delay: float
    recovery_before: float
    recovery_after: float
    recovery_peers: bool  # the peers too, not only pgpool's two configurations


OVERHEAD_RUNS: dict[str, list[float]] = {}  # the last overhead(): each pool's rounds, in order

CONTENTION = [(8, 8), (32, 8), (64, 16)]
FULL = Settings(5, 20000, 3000, 3.0, CONTENTION, [(8, 8)], 32, 5, 0.05, 1.5, 3.0, True)
QUICK = Settings(2, 5000, 800, 0.6, CONTENTION, [(8, 8)], 32, 1, 0.05, 0.8, 1.5, False)


def main(argv: list[str]) -> int:
    # Peers log every connection they drop during the restart scenario; the tables count them.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    logging.getLogger("pgpool").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run, under a minute")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL

    server: EmbeddedPostgres | None = None
    dsn = os.environ.get("PGPOOL_DSN")
    if not dsn:
        server = EmbeddedPostgres(max_connections=400)
        server.init()
        server.start()
        dsn = server.dsn
    try:
        results = run_all(dsn, server, settings)
        results["mode"] = "quick" if args.quick else "full"
        results["environment"] = report.environment(dsn)
    finally:
        if server is not None:
            server.destroy()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(report.markdown(results))
    # The raw numbers too, so that the report and chart can be re-rendered without a rerun.
    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str))
    report.chart(results, out / "latest.png")
    report.latency_chart(results, out / "latency.png")
    print(f"wrote {out / 'latest.md'}, {out / 'latest.png'} and {out / 'latency.png'}")
    for line in results["verdicts"]:
        print(line)
    return 0


def run_all(dsn: str, server: EmbeddedPostgres | None, s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["overhead"] = overhead(dsn, s)
    results["overhead_runs"] = dict(OVERHEAD_RUNS)  # round by round, for the paired verdicts
    results["one_query"] = one_query(dsn, s)
    results["contention"] = contention(
        dsn, s, s.contention, scenarios.query, "3/6 contention (T threads, M connections)"
    )
    scenarios.setup_accounts(dsn)
    try:
        results["real_work"] = contention(
            dsn, s, s.real_work, scenarios.transfer, "4/6 real work (indexed UPDATE + commit, T threads, M connections)"
        )
    finally:
        scenarios.drop_accounts(dsn)
    results["cold_burst"] = cold_burst(dsn, s)
    results["recovery"] = recovery(dsn, server, s) if server is not None else None
    results["verdicts"] = report.verdicts(results)
    # Issue 18: contention against the bare FIFO bound, and instructions per cycle (callgrind).
    results["bound"] = bound.measure(dsn, bound.QUICK if s is QUICK else bound.FULL)
    results["verdicts"] += bound.verdicts(results["bound"])
    if os.path.exists(callgrind.VALGRIND):
        print("8/8 instructions per cycle (callgrind, about 75 s)", flush=True)
        try:
            counts = callgrind.measure(dsn)
        except RuntimeError as exc:  # a child failed: keep the run's other results
            results["verdicts"].append(f"FAIL instruction counts not measured: {str(exc)[:300]}")
        else:
            results["instructions"] = [c.__dict__ for c in counts]
            results["instructions_md"] = callgrind.table(counts)
            results["verdicts"] += [callgrind.verdict_text(ok, text) for ok, text in callgrind.verdicts(counts)]
    return results


def overhead(dsn: str, s: Settings) -> dict[str, tuple[float, float, float]]:
    """Microseconds per borrow + return, every pool measured in turn, round after round.

    This machine's speed drifts by tens of percent within seconds (a shared VM): measuring one pool
    after the other would compare them at different speeds. Interleaved short rounds put every pool
    through the same drift; the median of the rounds is reported."""
    kinds = [*ALL, PgPoolWithBlock, PgPoolInstrumented]
    pools = []
    for make in kinds:
        pool = make(dsn, 1, 4)
        pool.warm(1)
        pools.append((make, pool))
    rounds = s.reps * 5
    cycles = max(1000, s.overhead_cycles // 5)
    runs: dict[str, list[float]] = {make.name: [] for make in kinds}
    try:
        for make, pool in pools:
            scenarios.overhead_us(pool, cycles, make is PgPoolWithBlock)  # warm up
        for _ in tqdm(range(rounds), desc="1/6 overhead (us per getconn+putconn)", leave=True):
            for make, pool in pools:
                runs[make.name].append(scenarios.overhead_us(pool, cycles, make is PgPoolWithBlock))
    finally:
        for _, pool in pools:
            pool.close()
    OVERHEAD_RUNS.clear()
    OVERHEAD_RUNS.update(runs)
    return {name: scenarios.summary(values) for name, values in runs.items()}


def one_query(dsn: str, s: Settings) -> dict[str, tuple[float, float, float]]:
    out = {}
    for make in tqdm(ALL, desc="2/6 one query (us per borrow+SELECT 1+return)", leave=True):
        pool = make(dsn, 1, 4)
        pool.warm(1)
        runs = [scenarios.one_query_us(pool, s.query_ops) for _ in range(s.reps)]
        pool.close()
        out[make.name] = scenarios.summary(runs)
    out["no pool (the limit)"] = scenarios.summary(
        [scenarios.no_pool_query_us(dsn, s.query_ops) for _ in range(s.reps)]
    )
    return out


def contention(
    dsn: str, s: Settings, combos: list[tuple[int, int]], work: scenarios.Work, desc: str
) -> dict[str, dict[str, Any]]:
    """T threads share M connections, each op borrow + `work` + return; the ideal holds one each.

    The repetitions are interleaved (every pool once, then every pool again...), so that a pool and
    the one it is compared with run seconds apart, not minutes, on this drifting machine; the
    verdicts compare them repetition by repetition (`ops_runs`)."""
    makers = [*ALL, None]
    runs: dict[tuple[str, str], list[scenarios.Load]] = {}
    jobs = [(t, m, make) for t, m in combos for _ in range(s.reps) for make in makers]
    for threads, maxconn, make in tqdm(jobs, desc=desc, leave=True):
        if make is not None and not make.can_wait and threads > maxconn:
            continue  # cannot wait: it would raise instead
        name = make.name if make is not None else report.IDEAL
        if make is None:
            load = scenarios.ideal(dsn, min(threads, maxconn), s.duration, work)
        else:
            pool = make(dsn, maxconn, maxconn)
            pool.warm(maxconn)
            load = scenarios.contention(pool, threads, s.duration, work)
            pool.close()
        runs.setdefault((f"T={threads}, M={maxconn}", name), []).append(load)
    out: dict[str, dict[str, Any]] = {}
    for threads, maxconn in combos:
        key = f"T={threads}, M={maxconn}"
        row = out.setdefault(key, {})
        for make in makers:
            name = make.name if make is not None else report.IDEAL
            loads = runs.get((key, name))
            if not loads:
                row[name] = None
                continue
            row[name] = {
                "ops_per_s": scenarios.summary([x.ops_per_s for x in loads]),
                "ops_runs": [x.ops_per_s for x in loads],
                "p50_ms": scenarios.summary([x.percentile_ms(0.50) for x in loads]),
                "p99_ms": scenarios.summary([x.percentile_ms(0.99) for x in loads]),
                "max_ms": scenarios.summary([x.max_ms for x in loads]),
                "fairness": scenarios.summary([x.fairness for x in loads]),
                "errors": sum(x.errors for x in loads),
                "distribution": scenarios.distribution(loads),
            }
    return out


def cold_burst(dsn: str, s: Settings) -> dict[str, Any]:
    params = psycopg2.extensions.parse_dsn(dsn)
    out: dict[str, Any] = {"delay_ms": s.connect_delay * 1000, "threads": s.burst_threads}
    with TcpProxy(int(params.get("port", 5432)), connect_delay=s.connect_delay) as proxy:
        proxied = psycopg2.extensions.make_dsn(dsn, host="127.0.0.1", port=proxy.port)
        for make in tqdm(ALL, desc="5/6 cold burst (32 threads, empty pool, 50 ms connects)", leave=True):
            runs, errors = [], 0
            for _ in range(s.burst_reps):
                elapsed, failed = scenarios.cold_burst_s(
                    lambda make=make: make(proxied, 0, s.burst_threads), s.burst_threads
                )
                runs.append(elapsed)
                errors += failed
            out[make.name] = {"seconds": scenarios.summary(runs), "errors": errors}
    return out


def recovery(dsn: str, server: EmbeddedPostgres, s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kinds = [PgPool, PgPoolChecked, *(PEERS if s.recovery_peers else [])]
    for make in tqdm(kinds, desc="6/6 recovery (8 threads, server restart)", leave=True):
        pool = make(dsn, 8, 8)
        pool.warm(8)
        result = scenarios.recovery(pool, 8, server.restart, s.recovery_before, s.recovery_after)
        try:
            pool.close()
        except Exception:
            pass
        out[make.name] = result.__dict__
        time.sleep(0.2)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
