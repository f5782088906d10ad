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

from . import report, scenarios
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
    return results


def overhead(dsn: str, s: Settings) -> dict[str, tuple[float, float, float]]:
    out = {}
    kinds = [*ALL, PgPoolWithBlock, PgPoolInstrumented]
    for make in tqdm(kinds, desc="1/6 overhead (us per getconn+putconn)", leave=True):
        pool = make(dsn, 1, 4)
        pool.warm(1)
        with_block = make is PgPoolWithBlock
        scenarios.overhead_us(pool, s.overhead_cycles // 5, with_block)  # warm up
        runs = [scenarios.overhead_us(pool, s.overhead_cycles, with_block) for _ in range(s.reps)]
        pool.close()
        out[make.name] = scenarios.summary(runs)
    return out


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
    """T threads share M connections, each op borrow + `work` + return; the ideal holds one each."""
    out: dict[str, dict[str, Any]] = {}
    jobs = [(t, m, make) for t, m in combos for make in [*ALL, None]]
    for threads, maxconn, make in tqdm(jobs, desc=desc, leave=True):
        key = f"T={threads}, M={maxconn}"
        row = out.setdefault(key, {})
        name = make.name if make is not None else "ideal (no pool)"
        if make is not None and not make.can_wait and threads > maxconn:
            row[name] = None  # cannot wait: it would raise instead
            continue
        loads = []
        for _ in range(s.reps):
            if make is None:
                loads.append(scenarios.ideal(dsn, min(threads, maxconn), s.duration, work))
                continue
            pool = make(dsn, maxconn, maxconn)
            pool.warm(maxconn)
            loads.append(scenarios.contention(pool, threads, s.duration, work))
            pool.close()
        row[name] = {
            "ops_per_s": scenarios.summary([x.ops_per_s for x in loads]),
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
