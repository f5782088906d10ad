"""Turn benchmark results into ``latest.md`` (tables, environment, verdicts) and ``latest.png``."""

from __future__ import annotations

import math
import os
import platform
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


def verdicts(results: dict[str, Any]) -> list[str]:
    """Check the targets of the benchmark issue; each line says met or MISSED, with the numbers."""
    lines = []
    ov = results["overhead"]
    mine = ov[PGPOOL][0]
    lean, p3 = ov["psycopg2.pool"][0], ov["psycopg_pool"][0]
    lines.append(_line(mine <= 1.2 * lean, f"overhead {mine:.2f} us <= 1.2x psycopg2.pool ({lean:.2f} us)"))
    lines.append(_line(mine <= 0.5 * p3, f"overhead {mine:.2f} us <= 0.5x psycopg_pool ({p3:.2f} us)"))
    for key in ("T=32, M=8", "T=64, M=16"):
        row = results["contention"].get(key)
        if not row:
            continue
        me = row[PGPOOL]
        peers = {k: v for k, v in row.items() if v is not None and k not in (PGPOOL, "ideal (no pool)")}
        best_name = max(peers, key=lambda k: peers[k]["ops_per_s"][0])
        best = peers[best_name]["ops_per_s"][0]
        ops = me["ops_per_s"][0]
        ideal = row["ideal (no pool)"]["ops_per_s"][0]
        lines.append(_line(ops >= 1.4 * best, f"{key}: {ops:,.0f} ops/s >= 1.4x best peer {best_name} ({best:,.0f})"))
        lines.append(_line(ops >= 0.65 * ideal, f"{key}: {ops:,.0f} ops/s >= 0.65x ideal ({ideal:,.0f})"))
        for metric in ("p99_ms", "max_ms"):
            best_tail = min(v[metric][0] for v in peers.values())
            lines.append(
                _line(me[metric][0] <= best_tail, f"{key}: {metric} {me[metric][0]:.1f} <= best peer's {best_tail:.1f}")
            )
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
    for key, row in results["contention"].items():
        out += [f"### {key}", ""]
        out += ["| pool | ops/s | vs pgpool | p50 ms | p99 ms | max ms | errors |", "|---|---|---|---|---|---|---|"]
        mine = row[PGPOOL]["ops_per_s"][0]
        for name, v in row.items():
            if v is None:
                out.append(f"| {name} | cannot wait: skipped | | | | | |")
                continue
            out.append(
                f"| {name} | {fmt(v['ops_per_s'], 0)} | {ratio(v['ops_per_s'][0], mine)} | {fmt(v['p50_ms'], 2)} "
                f"| {fmt(v['p99_ms'], 2)} | {fmt(v['max_ms'], 1)} | {v['errors']} |"
            )
        out.append("")

    burst = results["cold_burst"]
    out += [
        f"## 4. Cold burst: {burst['threads']} threads at an empty pool, each connect delayed "
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

    out += ["## 5. Recovery: 8 threads of steady load while the server restarts", ""]
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
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        out += [notes.read_text().strip(), ""]
    return "\n".join(out)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    _bars(axes[0][0], {k: v[0] for k, v in results["overhead"].items()}, "overhead, µs per cycle (lower is better)")
    _bars(axes[0][1], {k: v[0] for k, v in results["one_query"].items()}, "one query, µs per op (lower is better)")
    burst = {k: v["seconds"][0] * 1000 for k, v in results["cold_burst"].items() if isinstance(v, dict)}
    _bars(axes[0][2], burst, "cold burst, ms until 32 threads served (lower is better)")
    _grouped(axes[1][0], results["contention"], "ops_per_s", "contention throughput, ops/s (higher is better)")
    _grouped(axes[1][1], results["contention"], "p99_ms", "contention p99 latency, ms (lower is better)")
    rec = results.get("recovery")
    if rec:
        values = {k: (v["recovery_s"] if not math.isinf(v["recovery_s"]) else float("nan")) for k, v in rec.items()}
        labels = [
            ("never" if math.isinf(v["recovery_s"]) else f"{v['recovery_s']:.2f} s")
            + f", {v['errors_after_back']} errors"
            for v in rec.values()
        ]
        _bars(axes[1][2], values, "recovery after restart: time, errors after (lower is better)", labels)
    else:
        axes[1][2].set_axis_off()
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


def _grouped(ax: Any, contention: dict[str, dict[str, Any]], metric: str, title: str) -> None:
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
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
