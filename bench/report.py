"""Turn benchmark results into ``latest.md`` (tables, environment, verdicts), ``latest.png`` (throughput and
cost) and ``latency.png`` (latency distribution and per-thread fairness)."""

from __future__ import annotations

import math
import os
import platform
import statistics
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg2

PGPOOL = "pgpool"
PACKAGES = ["pgpool", "psycopg2-binary", "psycopg2-pool", "psycopg", "psycopg-pool", "SQLAlchemy", "DBUtils", "wrapt"]


def environment(dsn: str) -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            server = str(cur.fetchone()[0])
    finally:
        conn.close()
    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "PostgreSQL": server + " on 127.0.0.1",
    }
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    return env


def fmt(triple: tuple[float, float, float] | None, digits: int = 1) -> str:
    if triple is None:
        return "—"
    med, lo, hi = triple
    if math.isinf(med):
        return "never"
    return f"{med:,.{digits}f} ({lo:,.{digits}f} to {hi:,.{digits}f})"


def ratio(value: float, reference: float) -> str:
    if not reference or math.isnan(value) or math.isnan(reference):
        return "—"
    return f"{value / reference:.2f}x"


SQLA = "sqlalchemy QueuePool"
IDEAL = "ideal (no pool)"

# The targets of issue 8 ("Core v2"): (what, how the ratio is computed, <= or >=, bound).
TARGETS = [
    ("getconn+putconn, one thread, vs psycopg2.pool", "<=", 1.5),
    ("8 threads / 8 connections (nobody waits), throughput vs the ideal (own connection each, no pool)", ">=", 0.9),
    ("32 threads / 8 connections, throughput vs SQLAlchemy's QueuePool", ">=", 1.2),
    ("32 threads / 8 connections, max latency vs SQLAlchemy's QueuePool", "<=", 0.1),
    ("64 threads / 16 connections, max latency vs SQLAlchemy's QueuePool", "<=", 0.1),
    ("`with pool.connection()` vs psycopg2.pool's getconn+putconn", "<=", 2.0),
]


def paired(mine: list[float] | None, theirs: list[float] | None, fallback: float) -> float:
    """The median of the ratios of measurements taken side by side (round by round), which this
    drifting machine's speed changes cancel out of; `fallback` when the runs were not recorded."""
    if not mine or not theirs or len(mine) != len(theirs):
        return fallback
    return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))


def target_ratios(results: dict[str, Any]) -> list[tuple[float, str]]:
    """The measured ratio of each target in TARGETS, with the numbers it comes from (medians; the
    ratio itself is the median of the round-by-round ratios where those were recorded)."""
    ov = results["overhead"]
    ov_runs = results.get("overhead_runs") or {}
    lean = ov["psycopg2.pool"][0]
    cont = results["contention"]

    def cell(key: str, name: str, metric: str) -> float:
        v = (cont.get(key) or {}).get(name)
        return v[metric][0] if v else float("nan")

    def runs(key: str, name: str) -> list[float] | None:
        v = (cont.get(key) or {}).get(name)
        return v.get("ops_runs") if v else None

    mine = ov[PGPOOL][0]
    out = [(paired(ov_runs.get(PGPOOL), ov_runs.get("psycopg2.pool"), mine / lean), f"{mine:.2f} vs {lean:.2f} µs")]
    me, ideal = cell("T=8, M=8", PGPOOL, "ops_per_s"), cell("T=8, M=8", IDEAL, "ops_per_s")
    out.append(
        (paired(runs("T=8, M=8", PGPOOL), runs("T=8, M=8", IDEAL), me / ideal), f"{me:,.0f} vs {ideal:,.0f} ops/s")
    )
    me, peer = cell("T=32, M=8", PGPOOL, "ops_per_s"), cell("T=32, M=8", SQLA, "ops_per_s")
    out.append(
        (paired(runs("T=32, M=8", PGPOOL), runs("T=32, M=8", SQLA), me / peer), f"{me:,.0f} vs {peer:,.0f} ops/s")
    )
    for key in ("T=32, M=8", "T=64, M=16"):
        me, peer = cell(key, PGPOOL, "max_ms"), cell(key, SQLA, "max_ms")
        out.append((me / peer, f"{me:.1f} vs {peer:.1f} ms"))
    block = ov.get("pgpool with-block", (float("nan"),))[0]
    ratio = paired(ov_runs.get("pgpool with-block"), ov_runs.get("psycopg2.pool"), block / lean)
    out.append((ratio, f"{block:.2f} vs {lean:.2f} µs"))
    return out


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per target: met or MISSED, the measured ratio, the target and the numbers behind it."""
    lines = []
    for (what, op, bound), (measured, numbers) in zip(TARGETS, target_ratios(results), strict=True):
        ok = measured <= bound if op == "<=" else measured >= bound
        lines.append(_line(ok, f"{measured:.2f}x (target {op} {bound}x): {what} [{numbers}]"))
    burst = results["cold_burst"]
    limit = 3 * burst["delay_ms"] / 1000
    seconds = burst[PGPOOL]["seconds"][0]
    lines.append(
        _line(seconds <= limit, f"cold burst {seconds * 1000:.0f} ms <= 3x one connect ({limit * 1000:.0f} ms)")
    )
    rec = results.get("recovery")
    if rec:
        for name in (PGPOOL, "pgpool check=check_connection"):
            r = rec[name]
            lines.append(_line(r["errors_after_back"] == 0, f"recovery {name}: {r['errors_after_back']} errors after"))
            lines.append(_line(r["recovery_s"] <= 1.0, f"recovery {name}: back in {r['recovery_s']:.2f} s <= 1 s"))
    return lines


def _line(ok: bool, text: str) -> str:
    return f"{'met   ' if ok else 'MISSED'} {text}"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    out = [f"# pgpool benchmark ({results['mode']} run)", ""]
    out += ["Each number is the median of the repeated measurements, with min to max in parentheses.", ""]
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()] + [""]

    out += ["## Targets", "", "```", *results["verdicts"], "```", ""]

    out += ["## 1. Overhead: getconn + putconn, no query, one thread (µs per cycle, lower is better)", ""]
    ov = results["overhead"]
    out += ["| pool | µs | vs pgpool |", "|---|---|---|"]
    for name, triple in ov.items():
        out.append(f"| {name} | {fmt(triple, 2)} | {ratio(triple[0], ov[PGPOOL][0])} |")
    out.append("")

    out += ["## 2. One query: borrow, SELECT 1, return, one thread (µs per op, lower is better)", ""]
    oq = results["one_query"]
    out += ["| pool | µs | vs pgpool |", "|---|---|---|"]
    for name, triple in oq.items():
        out.append(f"| {name} | {fmt(triple)} | {ratio(triple[0], oq[PGPOOL][0])} |")
    out.append("")

    out += ["## 3. Contention: T threads share M connections, borrow + SELECT 1 + return", ""]
    out += _load_tables(results["contention"])
    out += [
        "## 4. Real work: T threads share M connections, borrow + indexed UPDATE of a random row + commit + return",
        "",
        "What the pool costs next to a small transaction. `vs ideal`: the throughput of the same threads "
        "each holding a connection of its own, without a pool.",
        "",
    ]
    out += _load_tables(results.get("real_work") or {})

    burst = results["cold_burst"]
    out += [
        f"## 5. Cold burst: {burst['threads']} threads at an empty pool, each connect delayed "
        f"{burst['delay_ms']:.0f} ms by a proxy (ms until all have run their query)",
        "",
        "| pool | ms | vs one connect | errors |",
        "|---|---|---|---|",
    ]
    for name, v in burst.items():
        if not isinstance(v, dict):
            continue
        ms = tuple(x * 1000 for x in v["seconds"])
        out.append(f"| {name} | {fmt(ms, 0)} | {ms[0] / burst['delay_ms']:.1f}x | {v['errors']} |")
    out.append("")

    out += ["## 6. Recovery: 8 threads of steady load while the server restarts", ""]
    rec = results.get("recovery")
    if not rec:
        out += ["Skipped: runs only on the embedded server (PGPOOL_DSN was set).", ""]
    else:
        out += [
            "| pool | errors while down | errors after the server is back | throughput back after |",
            "|---|---|---|---|",
        ]
        for name, r in rec.items():
            back = "never (in the window)" if math.isinf(r["recovery_s"]) else f"{r['recovery_s']:.2f} s"
            out.append(f"| {name} | {r['errors_before_back']} | {r['errors_after_back']} | {back} |")
        out.append("")
    if results.get("bound"):
        from . import bound

        out += bound.markdown(
            results["bound"], [v for v in results["verdicts"] if v.startswith(("PASS T=", "FAIL T="))]
        )
    if results.get("instructions_md"):
        out += ["## 8. Instructions per cycle, one thread, no query (callgrind; `make bench-instructions`)", ""]
        out += [*results["instructions_md"], ""]
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        out += [notes.read_text().strip(), ""]
    return "\n".join(out)


def _load_tables(table: dict[str, dict[str, Any]]) -> list[str]:
    """The tables of a multi-threaded scenario, one per (T, M); `slowest thread`: the ops of the
    thread that did the fewest, as a fraction of the mean (1.00: every thread served alike)."""
    out = []
    for key, row in table.items():
        out += [f"### {key}", ""]
        out += [
            "| pool | ops/s | vs pgpool | vs ideal | p50 ms | p99 ms | max ms | slowest thread | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        mine = row[PGPOOL]["ops_per_s"][0]
        ideal = (row.get(IDEAL) or {}).get("ops_per_s", (float("nan"),))[0]
        for name, v in row.items():
            if v is None:
                out.append(f"| {name} | cannot wait: skipped | | | | | | | |")
                continue
            ops = v["ops_per_s"][0]
            out.append(
                f"| {name} | {fmt(v['ops_per_s'], 0)} | {ratio(ops, mine)} | {ratio(ops, ideal)} "
                f"| {fmt(v['p50_ms'], 2)} | {fmt(v['p99_ms'], 2)} | {fmt(v['max_ms'], 1)} "
                f"| {fmt(v.get('fairness'), 2)} | {v['errors']} |"
            )
        out.append("")
    return out


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(24, 10))
    _bars(axes[0][0], {k: v[0] for k, v in results["overhead"].items()}, "overhead, µs per cycle (lower is better)")
    _bars(axes[0][1], {k: v[0] for k, v in results["one_query"].items()}, "one query, µs per op (lower is better)")
    burst = {k: v["seconds"][0] * 1000 for k, v in results["cold_burst"].items() if isinstance(v, dict)}
    _bars(axes[0][2], burst, "cold burst, ms until 32 threads served (lower is better)")
    _grouped(
        axes[0][3],
        results.get("real_work") or {},
        "ops_per_s",
        "real work (indexed UPDATE + commit), ops/s (higher is better)",
    )
    _grouped(axes[1][0], results["contention"], "ops_per_s", "contention throughput, ops/s (higher is better)")
    _grouped(axes[1][1], results["contention"], "p99_ms", "contention p99 latency, ms (lower is better)")
    _grouped(axes[1][2], results["contention"], "max_ms", "contention max latency, ms (lower is better)", log=True)
    rec = results.get("recovery")
    if rec:
        values = {k: (v["recovery_s"] if not math.isinf(v["recovery_s"]) else float("nan")) for k, v in rec.items()}
        labels = [
            ("never" if math.isinf(v["recovery_s"]) else f"{v['recovery_s']:.2f} s")
            + f", {v['errors_after_back']} errors"
            for v in rec.values()
        ]
        _bars(axes[1][3], values, "recovery after restart: time, errors after (lower is better)", labels)
    else:
        axes[1][3].set_axis_off()
    fig.suptitle(f"pgpool benchmark ({results['mode']} run) — {results['environment']['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# One colour per pool, the same in every chart.
_COLORS = {
    "psycopg2.pool": "tab:orange",
    "psycopg2_pool": "tab:red",
    "psycopg_pool": "tab:purple",
    "sqlalchemy QueuePool": "tab:brown",
    "DBUtils PooledDB": "tab:olive",
}


def _color(name: str, index: int) -> str:
    if name.startswith(PGPOOL):
        return "tab:green"
    if name.startswith(("ideal", "no pool")):
        return "dimgray"
    return _COLORS.get(name, "tab:blue")


def _bars(ax: Any, values: dict[str, float], title: str, labels: list[str] | None = None) -> None:
    names = list(values)
    bars = ax.barh(names, [values[n] for n in names], color=[_color(n, i) for i, n in enumerate(names)])
    ax.bar_label(bars, labels=labels or [f"{values[n]:,.3g}" for n in names], fontsize=7, padding=2)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)


def _grouped(ax: Any, contention: dict[str, dict[str, Any]], metric: str, title: str, log: bool = False) -> None:
    keys = list(contention)
    names: list[str] = []
    for row in contention.values():
        names += [n for n in row if n not in names]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [(contention[k].get(name) or {}).get(metric, (float("nan"),))[0] for k in keys]
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, ys, width, label=name, color=_color(name, i))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def _tick(q: float) -> str:
    if q >= 1.0:
        return "max"
    if q == 0.0:
        return "min"
    return f"p{q * 100:.4g}"


def latency_chart(results: dict[str, Any], path: Path) -> None:
    """Per multi-threaded cell: the latency distribution of each pool (left) and how evenly the
    threads were served (right: each dot a thread, its ops over the mean of its run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [("SELECT 1", key, row) for key, row in results["contention"].items()]
    cells += [("indexed UPDATE", key, row) for key, row in (results.get("real_work") or {}).items()]
    fig, axes = plt.subplots(len(cells), 2, figsize=(18, 3.6 * len(cells)), squeeze=False)
    for (work, key, row), (left, right) in zip(cells, axes, strict=True):
        shown = {name: v for name, v in row.items() if v is not None and v.get("distribution", {}).get("ms")}
        for i, (name, v) in enumerate(shown.items()):
            dist = v["distribution"]
            left.plot(range(len(dist["ms"])), dist["ms"], marker=".", label=name, color=_color(name, i))
            shares = dist["thread_shares"]
            jitter = [(k % 7 - 3) * 0.06 for k in range(len(shares))]
            right.scatter(shares, [i + j for j in jitter], s=9, color=_color(name, i))
        if shown:
            q = next(iter(shown.values()))["distribution"]["q"]
            left.set_xticks(range(len(q)), [_tick(x) for x in q], fontsize=7)
        left.set_yscale("log")
        left.set_ylabel("ms per op", fontsize=8)
        left.set_title(f"{work}, {key}: latency by percentile (log, lower is better)", fontsize=10)
        left.legend(fontsize=7)
        left.grid(True, which="both", alpha=0.3)
        right.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        right.set_yticks(range(len(shown)), list(shown), fontsize=8)
        right.invert_yaxis()
        right.set_xlabel("ops of each thread / mean (1.0: fair share; 0: starved)", fontsize=8)
        right.set_title(f"{work}, {key}: per-thread ops (fairness)", fontsize=10)
        right.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"pgpool benchmark ({results['mode']} run): latency distribution and fairness")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
