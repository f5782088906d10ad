"""The DAO layer shared by the Flask and FastAPI examples: accounts, transfers and a ledger.

The functions are decorated before any pool exists and find it at call time (`get_pool`), so each
app decides when to create the pool: the Flask app at import (in gunicorn's master with
``--preload``, then forked), the FastAPI app in its lifespan (in each uvicorn worker).

Every connection the pool opens runs `name_session` first, which sets ``application_name`` to
``<prefix>-<pid of the process that opened it>``: the pool is created before the fork, but the hook
runs when a connection is opened, so connections opened in a worker carry that worker's pid and the
sessions of each process can be told apart in ``pg_stat_activity``.

With ``PGPOOL_EXAMPLE_METRICS_PORT`` set, each process that uses the pool serves its OpenTelemetry
metrics for Prometheus on 127.0.0.1 (`serve_metrics`).

Create the tables with ``PGPOOL_DSN=... python examples/bank_dao.py``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from typing import Any

import psycopg2
from psycopg2.extensions import connection, cursor

from pgpool import BORROWED, ThreadSafeConnectionPool, with_connection, with_transaction

ACCOUNTS = 20
INITIAL_BALANCE = 1000
FAILURE_NOTE = "deliberate failure"  # a ledger row with this note must never be committed

_pool: ThreadSafeConnectionPool | None = None


class DeliberateFailure(Exception):
    """Raised by `transfer_then_fail` after its writes, to show that they are rolled back."""


def get_pool() -> ThreadSafeConnectionPool:
    if _pool is None:
        raise RuntimeError("bank_dao.open_pool() has not been called")
    return _pool


def session_name() -> str:
    """``application_name`` for this process's sessions; `PGPOOL_EXAMPLE_APPNAME` sets the prefix."""
    return f"{os.environ.get('PGPOOL_EXAMPLE_APPNAME', 'pgpool-example')}-{os.getpid()}"


def name_session(conn: connection) -> None:
    """The pool's ``configure`` hook: runs once per new connection, in the process that opens it."""
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('application_name', %s, false)", (session_name(),))
    # Left in a transaction: the pool commits it, so the setting sticks for the session's life.


def open_pool(**overrides: Any) -> ThreadSafeConnectionPool:
    """Create the pool the DAO functions use, from ``PGPOOL_DSN`` and ``PGPOOL_EXAMPLE_MAXCONN``.

    ``maxconn`` should not exceed the threads of a worker (they cannot use more); ``timeout`` makes
    a request wait for a connection instead of failing when the server's threads outnumber it.
    """
    global _pool
    settings: dict[str, Any] = {
        "minconn": 1,
        "maxconn": int(os.environ.get("PGPOOL_EXAMPLE_MAXCONN", "4")),
        "timeout": 10,
        "name": "bank",
        "configure": name_session,
        "dsn": os.environ.get("PGPOOL_DSN", ""),
        "connect_timeout": 5,
    }
    settings.update(overrides)
    _pool = ThreadSafeConnectionPool(**settings)
    return _pool


def close_pool() -> None:
    if _pool is not None:
        _pool.close()


def serve_metrics(pool: ThreadSafeConnectionPool) -> Callable[[], None] | None:
    """With ``PGPOOL_EXAMPLE_METRICS_PORT`` set, serve the pool's metrics at ``127.0.0.1:<port>/metrics``.

    The pool is reported through `pgpool.otel` to an OpenTelemetry meter provider whose reader is
    the Prometheus exporter, served by ``prometheus_client``. Call it in the process that uses the
    pool (a worker, not a --preload master): each worker takes the first free port from
    ``PGPOOL_EXAMPLE_METRICS_PORT`` on, and says which. Returns a function that stops it all.
    """
    first = os.environ.get("PGPOOL_EXAMPLE_METRICS_PORT")
    if not first:
        return None
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    import pgpool.otel

    for port in range(int(first), int(first) + 32):
        try:
            server, thread = start_http_server(port, addr="127.0.0.1")
            break
        except OSError:
            continue  # taken, by another worker or another program
    else:
        raise RuntimeError(f"no free port for metrics from {first} to {int(first) + 31}")
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    instrumentation = pgpool.otel.instrument(pool, provider)
    print(f"pid {os.getpid()}: metrics of pool {pool.name!r} at http://127.0.0.1:{port}/metrics", flush=True)

    def stop() -> None:
        instrumentation.uninstrument()
        provider.shutdown()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


# -- queries ---------------------------------------------------------------------------------------


def _one(cur: cursor) -> tuple[Any, ...]:
    """The row of a query that returns exactly one (an aggregate, ``pg_backend_pid()``)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


@with_connection(get_pool)
def check_schema(conn: connection = BORROWED) -> int:
    """Fail fast when the tables are missing; return the number of accounts."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM example_accounts")
        return int(_one(cur)[0])


def _move(cur: cursor, source: int, target: int, amount: int, note: str) -> None:
    # Rows locked in id order: two opposite transfers cannot deadlock.
    for account, delta in sorted([(source, -amount), (target, amount)]):
        cur.execute("UPDATE example_accounts SET balance = balance + %s WHERE id = %s", (delta, account))
        if cur.rowcount != 1:
            raise ValueError(f"no account {account}")
    cur.execute(
        "INSERT INTO example_ledger (source, target, amount, note) VALUES (%s, %s, %s, %s)",
        (source, target, amount, note),
    )


@with_transaction(get_pool)
def transfer(source: int, target: int, amount: int, conn: connection = BORROWED) -> dict[str, Any]:
    """Move `amount` between two accounts and record it in the ledger, in one transaction."""
    with conn.cursor() as cur:
        _move(cur, source, target, amount, "transfer")
        cur.execute("SELECT pg_backend_pid(), current_setting('application_name')")
        backend_pid, application_name = _one(cur)
    return {"backend_pid": backend_pid, "application_name": application_name}


@with_transaction(get_pool)
def transfer_then_fail(source: int, target: int, amount: int, conn: connection = BORROWED) -> None:
    """Do a transfer's writes, then raise: the transaction must roll back all of them."""
    with conn.cursor() as cur:
        _move(cur, source, target, amount, FAILURE_NOTE)
    raise DeliberateFailure(f"transfer {source} -> {target} failed after its writes, on purpose")


@with_connection(get_pool)
def balance(account: int, conn: connection = BORROWED) -> int | None:
    with conn.cursor() as cur:
        cur.execute("SELECT balance FROM example_accounts WHERE id = %s", (account,))
        row = cur.fetchone()
    return None if row is None else int(row[0])


@with_connection(get_pool)
def total(conn: connection = BORROWED) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT sum(balance) FROM example_accounts")
        return int(_one(cur)[0])


@with_connection(get_pool)
def whoami(conn: connection = BORROWED) -> dict[str, Any]:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid(), current_setting('application_name')")
        backend_pid, application_name = _one(cur)
    return {"backend_pid": backend_pid, "application_name": application_name}


def random_pair(rng: random.Random | None = None) -> tuple[int, int]:
    source, target = (rng or random).sample(range(1, ACCOUNTS + 1), 2)
    return source, target


# -- schema ----------------------------------------------------------------------------------------

SCHEMA = f"""
DROP TABLE IF EXISTS example_ledger;
DROP TABLE IF EXISTS example_accounts;
CREATE TABLE example_accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO example_accounts SELECT g, {INITIAL_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
CREATE TABLE example_ledger (
    id bigserial PRIMARY KEY,
    source int NOT NULL REFERENCES example_accounts,
    target int NOT NULL REFERENCES example_accounts,
    amount bigint NOT NULL,
    note text NOT NULL
);
"""


def create_schema(dsn: str) -> None:
    """(Re)create the tables with `ACCOUNTS` accounts of `INITIAL_BALANCE` each."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:  # `with conn` commits the transaction
            cur.execute(SCHEMA)
    finally:
        conn.close()


if __name__ == "__main__":
    create_schema(os.environ.get("PGPOOL_DSN", ""))
    print(f"created example_accounts ({ACCOUNTS} accounts of {INITIAL_BALANCE}) and example_ledger")
    sys.exit(0)
