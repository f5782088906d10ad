"""Load the Django example under gunicorn and check what the server saw.

    python examples/django_app/load_check.py [--requests 1000] [--kinds gthread,sync,gevent]

For each worker kind: migrates the ledger afresh, starts gunicorn on a free loopback port, sends the
requests (transfers and reads) from 16 client threads, and checks that every request succeeded, that
the server never had more of the app's sessions than workers x maxconn, that no session is left
``idle in transaction`` afterwards, that the money is all there (transfers only move it) and one
transfer row exists per transfer made, and that stopping gunicorn leaves no session. PGPOOL_DSN names
the server. Exits non-zero on any problem.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2

EXAMPLES = Path(__file__).resolve().parent.parent
APP_NAME = "pgpool-django-example"
WORKERS = 2
MAXCONN = 4
CONFIGS = {
    "gthread": (
        "django_app/gunicorn.conf.py",
        {"PGPOOL_EXAMPLE_WORKER_CLASS": "gthread", "PGPOOL_EXAMPLE_THREADS": "4"},
    ),
    "sync": ("django_app/gunicorn.conf.py", {"PGPOOL_EXAMPLE_WORKER_CLASS": "sync", "PGPOOL_EXAMPLE_THREADS": "1"}),
    "gevent": ("django_app/gunicorn_gevent.conf.py", {}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(dsn: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(dsn, application_name="pgpool-django-example-checker")
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def _sessions(dsn: str, state: str | None = None) -> int:
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    rows = _query(dsn, sql + " AND state = %s", APP_NAME, state) if state else _query(dsn, sql, APP_NAME)
    count = rows[0][0]
    assert isinstance(count, int)
    return count


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "django_app/manage.py", *args], cwd=EXAMPLES, env=env, check=True, timeout=120)


def _request(base: str, path: str, post: bool) -> int:
    req = urllib.request.Request(base + path, data=b"" if post else None, method="POST" if post else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _wait_ready(base: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode} before serving")
        if _request(base, "/accounts", post=False) == 200:
            return
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not serve within 30 s")


def run_kind(kind: str, dsn: str, requests: int) -> list[str]:
    """Serve and load one worker kind; return the problems found."""
    config, extra = CONFIGS[kind]
    port = _free_port()
    env = {
        **os.environ,
        **extra,
        "PGPOOL_DSN": dsn,
        "PGPOOL_EXAMPLE_BIND": f"127.0.0.1:{port}",
        "PGPOOL_EXAMPLE_WORKERS": str(WORKERS),
        "PGPOOL_EXAMPLE_MAXCONN": str(MAXCONN),
        "DJANGO_SETTINGS_MODULE": "django_app.settings",
        "PYTHONPATH": str(EXAMPLES),
    }
    _manage(env, "migrate", "ledger", "zero", "--verbosity", "0")
    _manage(env, "migrate", "--verbosity", "0")
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", config]
    process = subprocess.Popen(gunicorn, cwd=EXAMPLES, env=env)
    base = f"http://127.0.0.1:{port}"
    problems: list[str] = []
    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.wait(0.05):
            peak = max(peak, _sessions(dsn))

    sampler = threading.Thread(target=sample, name="session-sampler")
    try:
        _wait_ready(base, process, time.monotonic() + 30)
        sampler.start()
        start = time.monotonic()
        posts = [random.random() < 0.6 for _ in range(requests)]
        with ThreadPoolExecutor(max_workers=16) as clients:
            codes = list(clients.map(lambda post: _request(base, "/transfer" if post else "/accounts", post), posts))
        elapsed = time.monotonic() - start
        sampling.set()
        sampler.join(10)
        failed = sum(code != 200 for code in codes)
        transfers = sum(post and code == 200 for post, code in zip(posts, codes, strict=True))
        if failed:
            problems.append(f"{failed} of {requests} requests failed: {sorted(set(codes))}")
        if peak > WORKERS * MAXCONN:
            problems.append(f"the server saw {peak} sessions, more than workers x maxconn = {WORKERS * MAXCONN}")
        stuck = _sessions(dsn, "idle in transaction")
        if stuck:
            problems.append(f"{stuck} sessions left idle in transaction")
        total, rows = _query(
            dsn, "SELECT (SELECT sum(balance) FROM ledger_account), (SELECT count(*) FROM ledger_transfer)"
        )[0]
        if total != 10 * 1000:
            problems.append(f"money changed: the accounts hold {total}, not 10000")
        if rows != transfers:
            problems.append(f"{rows} transfer rows for {transfers} transfers made")
        stats = json.loads(urllib.request.urlopen(base + "/stats", timeout=10).read())
        print(
            f"{kind}: {requests} requests in {elapsed:.1f} s ({requests / elapsed:.0f}/s), {transfers} transfers,"
            f" peak {peak} sessions (limit {WORKERS * MAXCONN}), {stuck} idle in transaction;"
            f" one worker's pool: {stats['pools']['default']}"
        )
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        sampling.set()
        if sampler.is_alive():
            sampler.join(10)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            problems.append("gunicorn did not stop within 30 s of SIGTERM")
    deadline = time.monotonic() + 5
    left = _sessions(dsn)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _sessions(dsn)
    if left:
        problems.append(f"{left} sessions left after gunicorn stopped")
    return [f"{kind}: {problem}" for problem in problems]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description="Load the Django example under gunicorn and check what the server saw."
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--kinds", default="gthread,sync,gevent")
    args = parser.parse_args(argv)
    dsn = os.environ.get("PGPOOL_DSN")
    if not dsn:
        print("set PGPOOL_DSN (or run through tests/embedded_pg.py run --)")
        return 2
    problems: list[str] = []
    kinds = args.kinds.split(",")
    for kind in kinds:
        problems += run_kind(kind, dsn, args.requests)
    for problem in problems:
        print("PROBLEM:", problem)
    print(f"django-example: {len(kinds) - len({p.split(':')[0] for p in problems})} passed, {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
