"""``make bench-instructions``: instructions per borrow on the paths users write, counted by callgrind.

    python -m bench.callgrind [--cycles N] [--out bench/results/instructions.md] [--annotate DIR]

Issue 18 judges single-thread costs in instructions per cycle, as a ratio to psycopg2.pool's
getconn+putconn: on this machine they repeat to 0.2% where timings drift by tens of percent.

Each path runs in its own ``valgrind --tool=callgrind`` process, twice: with N cycles and with 2N.
Everything but the cycles (interpreter start-up, imports, connecting, the warm-up, exit) is the same in
both runs, so (instructions(2N) - instructions(N)) / N is the cost of one cycle alone. Threads are
counted apart (``--separate-threads=yes``): the table shows the main thread's count and the other
threads' (the housekeeper), and the verdicts judge their sum, since work deferred to the housekeeper
still costs the GIL. The housekeeper's timer rounds make that column move by tens of instructions.

One thing is pinned for determinism: the pool's socket probe. pgpool skips its ``poll()`` for a
connection probed less than ``PROBE_INTERVAL`` (1 ms) ago; natively a cycle takes about 2 µs, so a
tight loop probes once in hundreds of cycles, but under callgrind (about 50x slower) it would probe
every other cycle, at moments that depend on the clock. The child sets ``PROBE_INTERVAL`` to infinity,
which is what the native loop sees nearly always.

Uses PGPOOL_DSN when set, else an embedded PostgreSQL it starts itself. Connections stay idle: a
clean connection's borrow and return send nothing to the server, so the counts do not depend on it.

``--annotate DIR`` also keeps the callgrind files there and prints, for the transaction and decorator
paths (or those named by ``--annotate-paths``), the C functions that cost the most per cycle (self
cost, from ``callgrind_annotate`` on both runs, differenced), which shows what the Python costs
turn into: object creation, ContextVar calls, psycopg2's getters, ctypes, wrapt.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CYCLES = 2000
WARMUP = 300  # cycles before the counted ones: CPython's specialisation settles, caches fill
ROOT = Path(__file__).resolve().parent.parent
MARGIN = 0.05  # how much over the bare wrapt decorator's ratio the @with_connection path may go


@dataclass(frozen=True)
class Path_:
    key: str
    label: str
    op: str  # "<=" or "" (no target: a reference)
    target: float | None  # ratio to the reference path


# The paths of issue 18, in the order of its table; "psycopg2" is the reference (1.0x).
PATHS = [
    Path_("psycopg2", "psycopg2.pool getconn+putconn (ThreadedConnectionPool: the reference)", "", None),
    Path_("psycopg2-simple", "psycopg2.pool getconn+putconn (SimpleConnectionPool: no lock)", "", None),
    Path_("getconn", "pgpool getconn+putconn", "<=", 1.5),
    Path_("connection", "with pool.connection()", "<=", 2.0),
    Path_("transaction", "with pool.transaction()", "<=", 2.2),
    Path_("decorator", "@with_connection function called without conn", "<=", 2.7),
    Path_("wrapt", "bare @wrapt.decorator opening pool.connection() (wrapt's own cost)", "", None),
    Path_("otel", "with pool.connection(), pool instrumented by pgpool.otel (SDK)", "<=", 3.0),
]
# Pieces of those paths, for attribution (``--paths``; not in the default run): each measures part of
# a path, so that differences between them say what a piece costs.
PIECES = [
    Path_("connection-make", "pool.connection() alone (the context manager built, never entered)", "", None),
    Path_("transaction-make", "pool.transaction() alone (built, never entered)", "", None),
    Path_("wrapt-pass", "bare @wrapt.decorator passing the call through (no borrow)", "", None),
    Path_("decorator-explicit", "@with_connection function called with conn= (no borrow)", "", None),
]
BY_KEY = {p.key: p for p in PATHS + PIECES}
ANNOTATED = ["transaction", "decorator"]


# -- the child: one path, a fixed number of cycles, under valgrind -----------------------------


def _cycle(key: str, dsn: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """The operation of path `key` (one cycle), and what closes what it opened."""
    if key in ("psycopg2", "psycopg2-simple"):
        import psycopg2.pool

        kind = psycopg2.pool.ThreadedConnectionPool if key == "psycopg2" else psycopg2.pool.SimpleConnectionPool
        ref = kind(1, 4, dsn)
        get, put = ref.getconn, ref.putconn

        def op() -> None:
            put(get())

        return op, ref.closeall

    import pgpool

    for name, module in list(sys.modules.items()):  # see the module docstring: the probe, pinned
        if name.startswith("pgpool") and hasattr(module, "PROBE_INTERVAL"):
            module.PROBE_INTERVAL = float("inf")  # type: ignore[attr-defined]
    pool: Any = pgpool.ThreadSafeConnectionPool(1, 4, timeout=30, dsn=dsn)
    close = pool.close
    if key == "getconn":
        pget, pput = pool.getconn, pool.putconn

        def op() -> None:
            pput(pget())

    elif key in ("connection", "otel"):
        if key == "otel":
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            import pgpool.otel

            provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
            instrumentation = pgpool.otel.instrument(pool, provider)

            def close() -> None:
                instrumentation.uninstrument()
                provider.shutdown()
                pool.close()

        borrow = pool.connection

        def op() -> None:
            with borrow():
                pass

    elif key == "transaction":
        transaction = pool.transaction

        def op() -> None:
            with transaction():
                pass

    elif key == "decorator":

        @pgpool.with_connection(pool)
        def dao(conn: Any = pgpool.BORROWED) -> None:
            pass

        op = dao  # type: ignore[assignment]

    elif key == "wrapt":
        import wrapt

        @wrapt.decorator  # type: ignore[misc]
        def borrowing(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            with pool.connection() as conn:
                return wrapped(*args, conn=conn, **kwargs)

        @borrowing  # type: ignore[misc]
        def bare(conn: Any = None) -> None:
            pass

        op = bare

    elif key == "connection-make":
        make = pool.connection

        def op() -> None:
            make()

    elif key == "transaction-make":
        make = pool.transaction

        def op() -> None:
            make()

    elif key == "wrapt-pass":
        import wrapt

        @wrapt.decorator  # type: ignore[misc]
        def passing(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return wrapped(*args, **kwargs)

        @passing  # type: ignore[misc]
        def bare() -> None:
            pass

        op = bare

    elif key == "decorator-explicit":
        held = pool.getconn()

        @pgpool.with_connection(pool)
        def dao(conn: Any = pgpool.BORROWED) -> None:
            pass

        def op() -> None:
            dao(conn=held)

        def close() -> None:
            pool.putconn(held)
            pool.close()

    else:
        raise SystemExit(f"unknown path {key!r}")
    return op, close


def child(key: str, cycles: int, dsn: str) -> None:
    op, close = _cycle(key, dsn)
    for _ in range(WARMUP):
        op()
    for _ in range(cycles):
        op()
    close()


# -- the parent: run every path twice under callgrind, difference, report ----------------------


@dataclass
class Count:
    key: str
    per_cycle: float  # the main thread's instructions per cycle
    background: float  # the other threads' (the housekeeper: its timer rounds, and work deferred to it)
    totals: tuple[int, int]  # main thread's instructions with N and 2N cycles
    files: tuple[Path, Path] | None = None

    @property
    def judged(self) -> float:
        """What the verdicts judge: every thread's instructions. Work a path defers to the housekeeper
        (pgpool.otel records borrow times there) still costs the GIL; the timer rounds add +-50."""
        return self.per_cycle + self.background


def _run(key: str, cycles: int, dsn: str, workdir: Path, tree: Path) -> tuple[int, int, Path]:
    out = workdir / f"{key}-{cycles}.out"
    cmd = [
        VALGRIND,
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),  # a script, not -m: the pgpool imported is the one on PYTHONPATH
        "--child",
        key,
        "--cycles",
        str(cycles),
    ]
    env = {**os.environ, "PGPOOL_DSN": dsn, "PYTHONHASHSEED": "0", "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind run of {key} ({cycles} cycles) failed:\n{done.stderr[-3000:]}")
    # --separate-threads: one file per thread, -01 the main one
    main = out.with_name(out.name + "-01")
    others = sum(_total(f) for f in out.parent.glob(out.name + "-*") if f != main)
    return _total(main), others, main


def _total(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


def measure(
    dsn: str, cycles: int = CYCLES, keys: list[str] | None = None, keep: Path | None = None, rev: str | None = None
) -> list[Count]:
    """Instructions per cycle of each path (all of PATHS by default), runs in parallel, one per CPU.

    Of the pgpool in this checkout, or with `rev`, of that commit's (exported to a temporary folder:
    others may be editing the checkout)."""
    keys = keys or [p.key for p in PATHS]
    workdir = keep or Path(tempfile.mkdtemp(prefix="pgpool-callgrind-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tree = ROOT
    if rev is not None:
        tree = Path(tempfile.mkdtemp(prefix="pgpool-rev-"))
        archive = subprocess.run(["git", "archive", rev, "pgpool"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    jobs = [(k, n) for k in keys for n in (cycles, 2 * cycles)]
    try:
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
            futures = {job: ex.submit(_run, job[0], job[1], dsn, workdir, tree) for job in jobs}
            got = {job: f.result() for job, f in futures.items()}
        out = []
        for k in keys:
            (one, bg1, f1), (two, bg2, f2) = got[(k, cycles)], got[(k, 2 * cycles)]
            out.append(Count(k, (two - one) / cycles, (bg2 - bg1) / cycles, (one, two), (f1, f2) if keep else None))
        return out
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        if tree != ROOT:
            shutil.rmtree(tree, ignore_errors=True)


def verdicts(counts: list[Count]) -> list[tuple[bool | None, str]]:
    """One line per path: PASS/FAIL against issue 18's target, or "info" for the references."""
    by = {c.key: c.judged for c in counts}
    ref = by.get("psycopg2")
    lines: list[tuple[bool | None, str]] = []
    for c in counts:
        p = BY_KEY[c.key]
        if not ref:
            lines.append((None, f"{p.label}: {c.judged:,.0f} instructions per cycle"))
            continue
        r = c.judged / ref
        if p.target is None:
            lines.append((None, f"{p.label}: {r:.2f}x ({c.judged:,.0f} instructions)"))
            continue
        ok = r <= p.target
        bound = f"target <= {p.target}x"
        if c.key == "decorator" and "wrapt" in by:
            wr = by["wrapt"] / ref
            ok = ok and r <= wr + MARGIN
            bound += f" and <= wrapt's {wr:.2f}x + {MARGIN}x"
        lines.append((ok, f"{p.label}: {r:.2f}x ({bound}; {c.judged:,.0f} instructions)"))
    return lines


def verdict_text(ok: bool | None, text: str) -> str:
    return f"{'info' if ok is None else 'PASS' if ok else 'FAIL'} {text}"


def table(counts: list[Count]) -> list[str]:
    by = {c.key: c.judged for c in counts}
    ref = by.get("psycopg2")
    rows = [
        "| path | instructions per cycle (all threads) | vs psycopg2.pool | target | main thread | other threads |",
        "|---|---|---|---|---|---|",
    ]
    for c in counts:
        p = BY_KEY[c.key]
        ratio = f"{c.judged / ref:.2f}x" if ref else "—"
        target = f"<= {p.target}x" if p.target is not None else "(reference)"
        if c.key == "decorator":
            target += " and <= (wrapt) + 0.05x"
        rows.append(f"| {p.label} | {c.judged:,.0f} | {ratio} | {target} | {c.per_cycle:,.0f} | {c.background:,.0f} |")
    return rows


def markdown(counts: list[Count], cycles: int, seconds: float, code: str) -> str:
    out = [
        "# Instructions per cycle (callgrind)",
        "",
        f"`python -m bench.callgrind`: each path under `valgrind --tool=callgrind`, {cycles:,} and "
        f"{2 * cycles:,} cycles after {WARMUP} warm-up cycles, (difference) / {cycles:,}; all threads; "
        f"probe interval pinned (see bench/callgrind.py). Code: {code}. Python {sys.version.split()[0]}. "
        f"{seconds:.0f} s.",
        "",
        *table(counts),
        "",
        "```",
        *(verdict_text(ok, t) for ok, t in verdicts(counts)),
        "```",
        "",
    ]
    return "\n".join(out)


def code_under_test(rev: str | None) -> str:
    """Which pgpool was measured: a commit, or the checkout (saying when pgpool/ has uncommitted changes)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    commit = git("log", "-1", "--format=%h %s", rev or "HEAD")[:72] or "?"
    if rev is not None:
        return f"commit {commit}"
    dirty = git("status", "--porcelain", "--", "pgpool")
    return f"checkout at {commit}" + (" + uncommitted changes in pgpool/" if dirty else "")


# -- attribution: callgrind_annotate on both runs, differenced ---------------------------------

_LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(?:\*\s+)?(.+?)\s*$")


def _functions(path: Path, inclusive: bool) -> dict[str, int]:
    cmd = ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", str(path)]
    text = subprocess.run(cmd, capture_output=True, text=True).stdout
    costs: dict[str, int] = {}
    body = False
    for line in text.splitlines():
        if "file:function" in line:
            body = True
            continue
        if not body:
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name = m.group(2)
        name = re.sub(r"\s+\[[^\]]*\]$", "", name)  # the object file
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def attribution(count: Count, cycles: int, top: int = 15, inclusive: bool = False) -> list[tuple[str, float]]:
    """The C functions that cost the most per cycle on `count`'s path (from its two runs)."""
    assert count.files is not None
    one, two = (_functions(f, inclusive) for f in count.files)
    diff = {name: (two.get(name, 0) - one.get(name, 0)) / cycles for name in set(one) | set(two)}
    ranked = sorted(diff.items(), key=lambda kv: -kv[1])
    return [(name, cost) for name, cost in ranked if cost >= 1][:top]


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=CYCLES)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "instructions.md"))
    parser.add_argument("--paths", nargs="*", choices=list(BY_KEY), help="default: all of PATHS")
    parser.add_argument("--annotate", metavar="DIR", help="keep the callgrind files in DIR and attribute costs")
    parser.add_argument("--annotate-paths", nargs="*", default=ANNOTATED, choices=list(BY_KEY))
    parser.add_argument("--rev", help="measure the pgpool of this commit (default: the checkout as it is)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.cycles, os.environ["PGPOOL_DSN"])
        return 0
    if not os.path.exists(VALGRIND):
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2

    server = None
    dsn = os.environ.get("PGPOOL_DSN")
    if not dsn:
        from tests.embedded_pg import EmbeddedPostgres

        server = EmbeddedPostgres()
        server.init()
        server.start()
        dsn = server.dsn
    started = time.monotonic()
    try:
        keep = Path(args.annotate) if args.annotate else None
        rev = (
            args.rev
            and subprocess.run(
                ["git", "rev-parse", "--verify", args.rev + "^{commit}"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )  # once: others may commit while this runs
        counts = measure(dsn, args.cycles, args.paths, keep, rev or None)
    finally:
        if server is not None:
            server.destroy()
    seconds = time.monotonic() - started
    print("\n".join(table(counts)))
    print()
    for ok, text in verdicts(counts):
        print(verdict_text(ok, text))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    code = code_under_test(rev or None)
    print(f"code: {code}")
    out.write_text(markdown(counts, args.cycles, seconds, code))
    print(f"\nwrote {out} ({seconds:.0f} s)")
    if keep is not None:
        for c in counts:
            if c.key not in args.annotate_paths:
                continue
            for inclusive in (False, True):
                kind = "inclusive" if inclusive else "self"
                print(f"\n{BY_KEY[c.key].label}: top C functions per cycle ({kind} cost)")
                for name, cost in attribution(c, args.cycles, inclusive=inclusive):
                    print(f"  {cost:>9,.0f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
