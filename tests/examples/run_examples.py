"""Run the Flask and FastAPI examples under their real servers, load them over loopback, check the results.

    PGPOOL_DSN=postgresql://127.0.0.1:5432/test python tests/examples/run_examples.py
    python tests/embedded_pg.py run -- python tests/examples/run_examples.py    # an embedded server

For each app: (re)create the tables, start the server (gunicorn ``--preload`` with 3 gthread workers
of 4 threads; uvicorn with 3 workers) on a free port of 127.0.0.1, wait until every worker answers,
send a bounded load of real HTTP requests from a thread pool while sampling ``pg_stat_activity``,
then stop the server with SIGTERM and check:

- no error response, except from ``/transfer-then-fail``, which must answer 500 after rolling back;
- each worker used its own server sessions: every session's ``application_name`` names the pid of
  a worker (or, with ``--preload``, the master's startup session), a backend is never seen under two
  processes, and every response's backend belongs to the worker that answered;
- the master's startup session survives the workers (fork safety: they never closed it);
- at most workers x maxconn worker sessions at any sample, at most maxconn per worker;
- the pools are idle after the load (nothing left borrowed by the failing requests);
- money is conserved and every committed transfer, and only those, is in the ledger;
- after shutdown, no session left with the app's ``application_name`` prefix.

Needs psycopg2 and the ``examples`` extra (flask, gunicorn, fastapi, uvicorn); the driver itself uses
only the standard library to make its requests. Prints a summary; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import bank_dao  # noqa: E402  (lives in examples/, shared with the apps)

HOST = "127.0.0.1"
WORKERS = 3
MAXCONN = 4  # per worker, passed to the apps as PGPOOL_EXAMPLE_MAXCONN
REQUEST_TIMEOUT = 15.0  # seconds, one HTTP request
START_TIMEOUT = 60.0  # seconds until every worker answers (spawned uvicorn workers import slowly on a busy machine)
STOP_TIMEOUT = 20.0  # seconds for the server to exit after SIGTERM (graceful timeouts are 10 s)
SESSIONS_GONE_TIMEOUT = 10.0  # seconds for the server to see the sessions end
SAMPLE_EVERY = 0.02  # seconds between two pg_stat_activity samples

# Share of each request in the load; the weights are relative.
MIX = {"transfer": 70, "balance": 10, "total": 8, "whoami": 7, "fail": 5}


@dataclass
class App:
    name: str
    argv: list[str]  # the server command, run in examples/, with {port} filled in
    master_sessions: int  # sessions the main process keeps (the --preload master's startup check)


APPS = {
    "flask": App(
        "flask",
        [sys.executable, "-m", "gunicorn", "-c", "flask_app/gunicorn.conf.py", "--bind", f"{HOST}:{{port}}"],
        master_sessions=1,
    ),
    "fastapi": App(
        "fastapi",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "fastapi_app.app:app",
            "--host",
            HOST,
            "--port",
            "{port}",
            "--workers",
            str(WORKERS),
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "10",
        ],
        master_sessions=0,
    ),
}


@dataclass
class Result:
    kind: str
    status: int  # 0: no HTTP answer
    body: dict = field(default_factory=dict)
    error: str = ""


class Checks:
    def __init__(self, app: str) -> None:
        self.app = app
        self.failures: list[str] = []
        self.passed = 0

    def check(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            print(f"  FAIL [{self.app}] {what}", flush=True)
        return ok


# -- processes and HTTP ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may contain spaces and parentheses


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return parent_pid(pid) is not None or not Path("/proc").is_dir()


def request(port: int, kind: str, rng: random.Random) -> Result:
    method, path = {
        "transfer": ("POST", "/transfer"),
        "fail": ("POST", "/transfer-then-fail"),
        "balance": ("GET", f"/balance/{rng.randint(1, bank_dao.ACCOUNTS)}"),
        "total": ("GET", "/total"),
        "whoami": ("GET", "/whoami"),
        "stats": ("GET", "/stats"),
    }[kind]
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(method, path, headers={"Connection": "close"})
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return Result(kind, 0, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        return Result(kind, response.status, error=f"not JSON: {raw[:120]!r}")
    return Result(kind, response.status, body if isinstance(body, dict) else {"value": body})


class Server:
    """The app's server process, in a session of its own so that nothing it started can outlive us."""

    def __init__(self, app: App, dsn: str, prefix: str, logdir: Path) -> None:
        self.port = free_port()
        self.log_path = logdir / f"{app.name}.log"
        env = dict(os.environ, PGPOOL_DSN=dsn, PGPOOL_EXAMPLE_APPNAME=prefix, PGPOOL_EXAMPLE_MAXCONN=str(MAXCONN))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [arg.format(port=self.port) for arg in app.argv],
                cwd=EXAMPLES,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, then wait; the exit status, or None when it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """Kill whatever is left of the server's process group (its workers included)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# -- pg_stat_activity ------------------------------------------------------------------------------


def sessions(cur, prefix: str) -> list[tuple[int, float, str]]:
    """(backend pid, backend start, application_name) of the sessions named after `prefix`."""
    cur.execute(
        "SELECT pid, extract(epoch FROM backend_start)::float8, application_name FROM pg_stat_activity"
        " WHERE left(application_name, %s) = %s",
        (len(prefix) + 1, prefix + "-"),
    )
    return [(int(pid), float(start), name) for pid, start, name in cur.fetchall()]


class Sampler(threading.Thread):
    """Samples the app's sessions in pg_stat_activity until stopped."""

    def __init__(self, dsn: str, prefix: str) -> None:
        super().__init__(name="pg_stat_activity sampler", daemon=True)
        self.dsn = dsn
        self.prefix = prefix
        self.samples: list[list[tuple[int, float, str]]] = []
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=5, application_name="pgpool-examples-observer")
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    while not self._stopping.is_set():
                        self.samples.append(sessions(cur, self.prefix))
                        self._stopping.wait(SAMPLE_EVERY)
            finally:
                conn.close()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)


# -- one app ---------------------------------------------------------------------------------------


def wait_for_workers(server: Server, checks: Checks) -> set[int]:
    """Poll /whoami until `WORKERS` distinct processes have answered; return their pids."""
    seen: set[int] = set()
    rng = random.Random(0)
    deadline = time.monotonic() + START_TIMEOUT
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline and len(seen) < WORKERS:
            if server.proc.poll() is not None:
                break
            results = list(pool.map(lambda _: request(server.port, "whoami", rng), range(8)))
            seen |= {r.body["worker_pid"] for r in results if r.status == 200}
            if len(seen) < WORKERS:
                time.sleep(0.1)
    checks.check(
        len(seen) == WORKERS,
        f"{WORKERS} workers answering within {START_TIMEOUT:.0f} s (saw {sorted(seen)}; "
        f"server {'running' if server.proc.poll() is None else f'exited {server.proc.returncode}'})",
    )
    return seen


def run_load(port: int, total: int, concurrency: int, seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=total)
    deadline = time.monotonic() + 60  # a hard bound on the load, whatever the server does

    def one(index: int) -> Result:
        if time.monotonic() > deadline:
            return Result(kinds[index], 0, error="load deadline passed")
        return request(port, kinds[index], random.Random(seed * 1_000_003 + index))

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(total)))
    return results, time.monotonic() - started


def worker_stats(port: int, workers: set[int]) -> dict[int, dict]:
    """Ask /stats until every worker has answered (bounded): pid -> its pool's stats."""
    found: dict[int, dict] = {}
    rng = random.Random(1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not workers <= found.keys():
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            for r in pool.map(lambda _: request(port, "stats", rng), range(6)):
                if r.status == 200:
                    found[r.body["worker_pid"]] = r.body
    return found


def check_responses(checks: Checks, results: list[Result], workers: set[int], prefix: str) -> dict[int, int]:
    """Check every HTTP answer; return backend pid -> the worker pid that used it."""
    bad = [r for r in results if r.kind != "fail" and r.status != 200]
    checks.check(
        not bad,
        f"no error response ({len(bad)} errors, first: {[(r.kind, r.status, r.error or r.body) for r in bad[:3]]})",
    )
    fails = [r for r in results if r.kind == "fail"]
    wrong = [r for r in fails if r.status != 500 or r.body.get("rolled_back") is not True]
    checks.check(
        not wrong,
        f"/transfer-then-fail answers 500 after its rollback ({len(wrong)} of {len(fails)} did not, "
        f"first: {[(r.status, r.error or r.body) for r in wrong[:3]]})",
    )
    answered = collections.Counter(r.body.get("worker_pid") for r in results if r.status in (200, 500))
    checks.check(
        set(answered) <= workers and len(answered) == len(workers),
        f"every worker served requests and only them: {dict(answered)} (workers {sorted(workers)})",
    )
    backend_worker: dict[int, int] = {}
    mismatched, shared = [], []
    for r in results:
        if r.status != 200 or "backend_pid" not in r.body:
            continue
        worker, backend = r.body["worker_pid"], r.body["backend_pid"]
        if r.body["application_name"] != f"{prefix}-{worker}":
            mismatched.append((worker, r.body["application_name"]))
        if backend_worker.setdefault(backend, worker) != worker:
            shared.append((backend, backend_worker[backend], worker))
    checks.check(not mismatched, f"each response's session is named after its worker (mismatches: {mismatched[:3]})")
    checks.check(not shared, f"no backend answered for two workers (backend, worker, worker: {shared[:3]})")
    return backend_worker


def check_sessions(
    checks: Checks,
    app: App,
    samples: list[list[tuple[int, float, str]]],
    prefix: str,
    master: int,
    workers: set[int],
    backend_worker: dict[int, int],
) -> tuple[int, dict[int, set[int]]]:
    """Check the sampled sessions; return the most worker sessions seen at once, and worker -> backends."""
    checks.check(len(samples) >= 10, f"pg_stat_activity sampled during the load ({len(samples)} samples)")
    owner: dict[tuple[int, float], set[str]] = collections.defaultdict(set)  # a backend -> its names
    per_worker: dict[int, set[int]] = collections.defaultdict(set)
    master_backends: list[set[tuple[int, float]]] = []
    strangers: set[str] = set()
    most = 0
    over_worker: list[tuple[int, int]] = []
    for sample in samples:
        counts: collections.Counter[int] = collections.Counter()
        in_master: set[tuple[int, float]] = set()
        for backend, start, name in sample:
            owner[(backend, start)].add(name)
            pid_text = name[len(prefix) + 1 :]
            pid = int(pid_text) if pid_text.isdigit() else -1
            if pid == master:
                in_master.add((backend, start))
            elif pid in workers:
                counts[pid] += 1
                per_worker[pid].add(backend)
            else:
                strangers.add(name)
        most = max(most, sum(counts.values()))
        over_worker += [(pid, n) for pid, n in counts.items() if n > MAXCONN]
        master_backends.append(in_master)
    checks.check(not strangers, f"every session belongs to the server's processes (strangers: {sorted(strangers)})")
    checks.check(
        all(len(names) == 1 for names in owner.values()),
        f"no backend seen under two processes' names: {[(b, sorted(n)) for b, n in owner.items() if len(n) > 1][:3]}",
    )
    checks.check(
        most <= WORKERS * MAXCONN,
        f"at most workers x maxconn = {WORKERS * MAXCONN} worker sessions at any sample (max {most})",
    )
    checks.check(not over_worker, f"at most maxconn = {MAXCONN} sessions per worker (over: {over_worker[:3]})")
    checks.check(
        all(per_worker.get(w) for w in workers),
        f"every worker had sessions of its own: { {w: len(per_worker.get(w, ())) for w in sorted(workers)} }",
    )
    elsewhere = [
        (b, w, other) for b, w in backend_worker.items() for other, bs in per_worker.items() if other != w and b in bs
    ]
    checks.check(not elsewhere, f"each backend in a response is sampled under that worker only: {elsewhere[:3]}")
    master_all = set().union(*master_backends) if master_backends else set()
    if app.master_sessions:
        first = master_backends[0] if master_backends else set()
        checks.check(
            len(first) == app.master_sessions and all(s == first for s in master_backends),
            f"the master's {app.master_sessions} startup session(s) lived through the load, untouched by the "
            f"forked workers (per-sample counts: {sorted({len(s) for s in master_backends})})",
        )
        used = {b for b, _ in master_all} & set(backend_worker)
        checks.check(not used, f"no worker used the master's session (backends {sorted(used)})")
    else:
        checks.check(not master_all, f"the main process holds no session ({len(master_all)} seen)")
    return most, per_worker


def check_database(checks: Checks, cur, transfers_ok: int) -> int:
    cur.execute("SELECT sum(balance), count(*) FROM example_accounts")
    money, accounts = cur.fetchone()
    expected = bank_dao.ACCOUNTS * bank_dao.INITIAL_BALANCE
    checks.check(money == expected and accounts == bank_dao.ACCOUNTS, f"money conserved: {money} (expected {expected})")
    cur.execute(
        "SELECT count(*) FILTER (WHERE note = 'transfer'), count(*) FILTER (WHERE note = %s) FROM example_ledger",
        (bank_dao.FAILURE_NOTE,),
    )
    ledger, failed_rows = cur.fetchone()
    checks.check(ledger == transfers_ok, f"one ledger row per acknowledged transfer: {ledger} rows, {transfers_ok} OKs")
    checks.check(failed_rows == 0, f"nothing of the failed transfers committed ({failed_rows} ledger rows)")
    cur.execute(
        """SELECT a.id, a.balance, %s + coalesce(sum(l.amount) FILTER (WHERE l.target = a.id), 0)
                                     - coalesce(sum(l.amount) FILTER (WHERE l.source = a.id), 0)
           FROM example_accounts a LEFT JOIN example_ledger l ON a.id IN (l.source, l.target)
           GROUP BY a.id, a.balance HAVING a.balance <> %s
                + coalesce(sum(l.amount) FILTER (WHERE l.target = a.id), 0)
                - coalesce(sum(l.amount) FILTER (WHERE l.source = a.id), 0)""",
        (bank_dao.INITIAL_BALANCE, bank_dao.INITIAL_BALANCE),
    )
    off = cur.fetchall()
    checks.check(not off, f"every balance matches its ledger (accounts off: {off[:3]})")
    return int(money)


def run_app(app: App, dsn: str, total: int, concurrency: int, logdir: Path) -> Checks:
    checks = Checks(app.name)
    prefix = f"pgpool-ex-{app.name}-{secrets.token_hex(3)}"
    started = time.monotonic()
    bank_dao.create_schema(dsn)
    observer = psycopg2.connect(dsn, connect_timeout=5, application_name="pgpool-examples-observer")
    observer.autocommit = True
    server = Server(app, dsn, prefix, logdir)
    print(f"[{app.name}] server pid {server.pid} on {HOST}:{server.port}, sessions named {prefix}-<pid>", flush=True)
    try:
        with observer.cursor() as cur:
            workers = wait_for_workers(server, checks)
            strays = {w: parent_pid(w) for w in workers if parent_pid(w) != server.pid}
            checks.check(not strays, f"the answering processes are the server's children (not: {strays})")
            ready = time.monotonic() - started
            if checks.failures:
                print(server.log_tail(), flush=True)
                return checks

            sampler = Sampler(dsn, prefix)
            sampler.start()
            results, load_time = run_load(server.port, total, concurrency, seed=len(app.name))
            time.sleep(0.2)  # a few samples of the quiet pool
            sampler.stop()
            checks.check(sampler.error is None, f"the sampler ran without error ({sampler.error!r})")

            backend_worker = check_responses(checks, results, workers, prefix)
            most, per_worker = check_sessions(checks, app, sampler.samples, prefix, server.pid, workers, backend_worker)
            stats = worker_stats(server.port, workers)
            busy = {pid: (s["in_use"], s["waiting"]) for pid, s in stats.items() if s["in_use"] or s["waiting"]}
            checks.check(
                workers <= stats.keys() and not busy,
                f"every worker's pool idle after the load: nothing lent nor waiting (busy: {busy}, "
                f"answered: {sorted(stats)})",
            )
            timeouts = sum(s["timeouts"] for s in stats.values())
            checks.check(timeouts == 0, f"no pool timeout in the workers ({timeouts})")
            # Nothing closes a healthy connection during the run: a worker with more than maxconn
            # backends over the run lost connections (a leak that the garbage collector freed, or
            # discards). Counted from pg_stat_activity: pgpool's counters in a forked worker start
            # from the master's.
            churn = {w: len(b) for w, b in per_worker.items() if len(b) > MAXCONN}
            checks.check(not churn, f"no worker had more than maxconn = {MAXCONN} backends in the run ({churn})")
            discarded = {pid: s["broken_discarded"] for pid, s in stats.items() if s["broken_discarded"]}
            checks.check(not discarded, f"no connection discarded as broken ({discarded})")
            transfers_ok = sum(1 for r in results if r.kind == "transfer" and r.status == 200)
            money = check_database(checks, cur, transfers_ok)

            stopping = time.monotonic()
            code = server.stop()
            stop_time = time.monotonic() - stopping
            checks.check(code == 0, f"the server exits with status 0 after SIGTERM (got {code})")
            left_workers = sorted(w for w in workers if alive(w))
            checks.check(not left_workers, f"no worker left running ({left_workers})")
            deadline = time.monotonic() + SESSIONS_GONE_TIMEOUT
            left = sessions(cur, prefix)
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = sessions(cur, prefix)
            checks.check(not left, f"no session left after shutdown ({len(left)}: {left[:3]})")
            log = server.log_path.read_text(errors="replace")
            checks.check("Traceback" not in log, "no traceback in the server's log")
    finally:
        if server.proc.poll() is None:
            server.kill()
        try:  # leave the server as we found it
            with observer.cursor() as cur:
                cur.execute("SET lock_timeout = '5s'")
                cur.execute("DROP TABLE IF EXISTS example_ledger, example_accounts")
        finally:
            observer.close()
    if checks.failures:
        print(f"--- last lines of the {app.name} server log ---\n{server.log_tail()}", flush=True)

    status = collections.Counter((r.kind, r.status) for r in results)
    elapsed = time.monotonic() - started
    print(
        f"[{app.name}] {len(results)} requests from {concurrency} threads in {load_time:.2f} s "
        f"({len(results) / load_time:.0f}/s; ready after {ready:.1f} s, stopped in {stop_time:.1f} s, "
        f"{elapsed:.1f} s in all)\n"
        f"  answers: {', '.join(f'{k} {s}: {n}' for (k, s), n in sorted(status.items()))}\n"
        f"  sessions: at most {most} of {WORKERS} x {MAXCONN} in the workers at once, "
        f"{ {w: len(b) for w, b in sorted(per_worker.items())} } backends per worker pid, "
        f"{app.master_sessions} in the main process; {len(sampler.samples)} samples\n"
        f"  money: {money}, {transfers_ok} transfers committed; {checks.passed} checks passed, "
        f"{len(checks.failures)} failed",
        flush=True,
    )
    return checks


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("apps", nargs="*", metavar="APP", help=f"among {', '.join(APPS)} (default: all)")
    parser.add_argument("--requests", type=int, default=1500, help="HTTP requests per app (default 1500)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (default 16)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.apps if name not in APPS]
    if unknown:
        parser.error(f"unknown app(s) {unknown}: choose among {list(APPS)}")
    dsn = os.environ.get("PGPOOL_DSN")
    if not dsn:
        print("set PGPOOL_DSN, or run under: python tests/embedded_pg.py run -- ...", file=sys.stderr)
        return 2
    started = time.monotonic()
    logdir = Path(tempfile.mkdtemp(prefix="pgpool-examples-"))
    failed: list[str] = []
    try:
        for name in args.apps or list(APPS):
            try:
                checks = run_app(APPS[name], dsn, args.requests, args.concurrency, logdir)
                failed += [f"{name}: {f}" for f in checks.failures]
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  FAIL [{name}] {type(exc).__name__}: {exc}", flush=True)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    took = time.monotonic() - started
    if failed:
        print(f"examples: {len(failed)} checks failed in {took:.1f} s:\n  " + "\n  ".join(failed))
        return 1
    print(f"examples: every check passed in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
