"""pgpool.django under gevent with psycogreen: waits and housekeeping cooperate, gevent.Timeout loses nothing.

Monkey-patching cannot be undone, so each scenario runs in its own process (`run_django`).
"""

from __future__ import annotations

import pytest

pytest.importorskip("django")
pytest.importorskip("gevent")
pytest.importorskip("psycogreen")

from .support import run_django

PRELUDE = """
from gevent import monkey

monkey.patch_all()
from psycogreen.gevent import patch_psycopg

patch_psycopg()

import json
import logging
import os
import time

import django
import gevent
import gevent.event
import psycopg2
from django.conf import settings

from tests.django.support import database_settings

DSN = os.environ["TEST_DSN"]
settings.configure(
    USE_TZ=True,
    DATABASES={
        "default": database_settings(DSN, OPTIONS={"application_name": os.environ["TEST_APP"], "pool": POOL, **EXTRA})
    },
)
django.setup()
from django.db import connection, transaction

from pgpool.django import pool_stats


def backend_pid():
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def server_sessions(expect_at_most=None):
    deadline = time.monotonic() + 5
    while True:
        found = _server_sessions()
        if expect_at_most is None or found <= expect_at_most or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _server_sessions():
    admin = psycopg2.connect(DSN, application_name="pgpool-test-counter")
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (os.environ["TEST_APP"],))
            return cur.fetchone()[0]
    finally:
        admin.close()


def full_width():
    '''Borrow maxconn connections at once from as many greenlets: distinct sessions, all given back.'''
    pids = []
    ready = gevent.event.Event()

    def hold():
        try:
            pids.append(backend_pid())
            if len(pids) == POOL["maxconn"]:
                ready.set()
            ready.wait(5)
        finally:
            connection.close()

    gevent.joinall([gevent.spawn(hold) for _ in range(POOL["maxconn"])], timeout=10, raise_error=True)
    return len(set(pids))
"""


@pytest.mark.timing
def test_waits_queries_and_housekeeping_yield_to_other_greenlets(dsn, app_name):
    """10 greenlets, 2 connections, pg_sleep(0.3) each: 1.5 s in all, and a 10 ms ticker never stalls
    for a query's length (a blocking wait or query would stop it for 0.3 s or more)."""
    result = run_django(
        "POOL = {'maxconn': 2, 'timeout': 10, 'leak_timeout': 0.6}\nEXTRA = {}\n"
        + PRELUDE
        + """
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("pgpool").addHandler(handler)
gaps = []
stop = gevent.event.Event()

def ticker():
    last = time.monotonic()
    while not stop.is_set():
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now

def work(seconds):
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(%s)", [seconds])
    finally:
        connection.close()

tick = gevent.spawn(ticker)
start = time.monotonic()
gevent.joinall([gevent.spawn(work, 0.3) for _ in range(10)], timeout=20, raise_error=True)
elapsed = time.monotonic() - start
work_long = gevent.spawn(work, 1.2)  # held past leak_timeout: the housekeeper (a greenlet) reports it
work_long.join(10)
stop.set()
tick.join(5)
stats = pool_stats()["default"]
print(json.dumps({
    "elapsed": elapsed,
    "max_gap": max(gaps),
    "waited": stats["requests_waited"],
    "in_use": stats["in_use"],
    "leak_reports": sum("not returned" in r.getMessage() for r in records),
}))
""",
        env={"TEST_DSN": dsn, "TEST_APP": app_name},
    )
    assert 1.4 < result["elapsed"] < 4.5, result  # 10 x 0.3 s on 2 connections, two at a time
    assert result["max_gap"] < 0.25, result  # nothing blocked the hub for a query's length
    assert result["waited"] >= 8 and result["in_use"] == 0, result
    assert result["leak_reports"] == 1, result


def test_a_gevent_timeout_while_waiting_for_a_connection_loses_no_slot(dsn, app_name):
    result = run_django(
        "POOL = {'maxconn': 2, 'timeout': 10}\nEXTRA = {}\n"
        + PRELUDE
        + """
held = gevent.event.Event()
release = gevent.event.Event()

def holder():
    try:
        backend_pid()
        held.set()
        release.wait(10)
    finally:
        connection.close()

holders = [gevent.spawn(holder) for _ in range(2)]
held.wait(5)
while pool_stats()["default"]["in_use"] < 2:
    gevent.sleep(0.01)
outcome = None
def impatient():
    global outcome
    try:
        with gevent.Timeout(0.2):
            backend_pid()
        outcome = "lent"
    except gevent.Timeout:
        outcome = "timeout"
    finally:
        connection.close()
gevent.spawn(impatient).join(5)
during = pool_stats()["default"]
release.set()
gevent.joinall(holders, timeout=5)
after = pool_stats()["default"]
print(json.dumps({"outcome": outcome, "waiting": during["waiting"], "in_use": after["in_use"],
                  "width": full_width(), "sessions": server_sessions()}))
""",
        env={"TEST_DSN": dsn, "TEST_APP": app_name},
    )
    assert result == {"outcome": "timeout", "waiting": 0, "in_use": 0, "width": 2, "sessions": 2}, result


def test_a_gevent_timeout_during_a_query_commits_nothing_and_loses_no_slot(dsn, app_name, table):
    result = run_django(
        # psycopg2 closes a connection whose wait a Timeout interrupted; the server's backend notices
        # only when it next looks at its socket: at the end of pg_sleep(3), or at the next check.
        "POOL = {'maxconn': 2, 'timeout': 10}\n"
        "EXTRA = {'options': '-c client_connection_check_interval=100'}\n"
        + PRELUDE
        + f"""
TABLE = {table!r}
outcome = None
def victim():
    global outcome
    try:
        with gevent.Timeout(0.2):
            with transaction.atomic():
                with connection.cursor() as cur:
                    cur.execute(f"INSERT INTO {{TABLE}} VALUES (1)")
                    cur.execute("SELECT pg_sleep(3)")
        outcome = "finished"
    except gevent.Timeout:
        outcome = "timeout"
    finally:
        connection.close()
start = time.monotonic()
gevent.spawn(victim).join(10)
elapsed = time.monotonic() - start
with connection.cursor() as cur:
    cur.execute(f"SELECT count(*) FROM {{TABLE}}")
    rows = cur.fetchone()[0]
connection.close()
stats = pool_stats()["default"]
print(json.dumps({{"outcome": outcome, "fast": elapsed < 2, "rows": rows, "in_use": stats["in_use"],
                  "width": full_width(), "sessions_at_most_maxconn": server_sessions(expect_at_most=2) <= 2}}))
""",
        env={"TEST_DSN": dsn, "TEST_APP": app_name},
    )
    assert result == {
        "outcome": "timeout",
        "fast": True,
        "rows": 0,
        "in_use": 0,
        "width": 2,
        "sessions_at_most_maxconn": True,
    }, result
