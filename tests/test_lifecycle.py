"""Lifecycle and visibility: close, names, repr, stats, logging, secrets, leaks, housekeeping."""

from __future__ import annotations

import gc
import logging
import threading
import time

import psycopg2
import pytest

from pgpool import ConnectionPool, PoolClosed, PoolError, PoolTimeout, ThreadSafeConnectionPool

from .helpers import closed_port, join_all, wait_until

pytestmark = pytest.mark.pgbouncer


# -- close -----------------------------------------------------------------------------------------


def test_close_closes_idle_connections_and_later_getconn_raises_pool_closed(pool_cls, dsn, sessions):
    pool = pool_cls(minconn=2, dsn=dsn, name="shut")
    idle = list(pool.idle_connections)
    pool.close()
    assert pool.closed
    assert all(c.closed for c in idle)
    assert sessions(expect=0) == 0
    with pytest.raises(PoolClosed, match="'shut' is closed"):
        pool.getconn()
    pool.close()  # idempotent


def test_a_connection_borrowed_before_close_is_closed_when_it_comes_back(pool_cls, dsn):
    pool = pool_cls(minconn=0, dsn=dsn)
    with pool.connection() as conn:
        pool.close()
        with conn.cursor() as cur:  # still usable by its borrower
            cur.execute("SELECT 1")
    assert conn.closed
    assert not pool.idle_connections


def test_close_fails_the_threads_waiting_for_a_connection(dsn):
    pool = ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=30, dsn=dsn)
    held = pool.getconn()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn()
        except BaseException as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for t in waiters:
        t.start()
    assert wait_until(lambda: pool.stats()["waiting"] == 3)
    pool.close()
    join_all(waiters, timeout=10)
    assert len(errors) == 3 and all(isinstance(e, PoolClosed) for e in errors)
    pool.putconn(held)
    assert held.closed


def test_close_fails_the_threads_opening_a_connection_with_pool_closed(dsn, monkeypatch):
    connecting = threading.Event()
    real_connect = psycopg2.connect

    def slow_connect(*args: object, **kwargs: object) -> object:
        connecting.set()
        time.sleep(0.3)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg2, "connect", slow_connect)
    pool = ThreadSafeConnectionPool(minconn=0, maxconn=2, timeout=5, dsn=dsn)
    errors: list[BaseException] = []

    def borrow() -> None:
        try:
            pool.getconn()
        except BaseException as exc:
            errors.append(exc)

    opener = threading.Thread(target=borrow)
    opener.start()
    assert connecting.wait(5)
    pool.close()
    join_all([opener], timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed), errors
    assert "closed while connecting" in str(errors[0])
    assert pool.stats()["in_use"] == 0 and pool.stats()["opening"] == 0


def test_pools_are_context_managers(pool_cls, dsn):
    with pool_cls(minconn=1, dsn=dsn) as pool:
        assert not pool.closed
    assert pool.closed


# -- names, repr, stats ----------------------------------------------------------------------------


def test_default_names_are_numbered_and_appear_in_repr_and_errors(pool_cls, dsn):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as a, pool_cls(minconn=0, dsn=dsn) as b:
        assert a.name.startswith("pgpool-") and b.name.startswith("pgpool-")
        assert int(b.name.split("-")[1]) > int(a.name.split("-")[1])
        assert repr(a).startswith(f"<{pool_cls.__name__} {a.name!r} open")
        held = a.getconn()
        with pytest.raises(PoolError, match=repr(a.name)):
            a.getconn()
        a.putconn(held)


def test_repr_shows_idle_in_use_and_waiting_counts(dsn):
    with ThreadSafeConnectionPool(minconn=2, maxconn=3, dsn=dsn, name="shown") as pool:
        conn = pool.getconn()
        assert repr(pool) == (
            "<ThreadSafeConnectionPool 'shown' open [idle: 1, in use: 1, waiting: 0 | minconn=2, maxconn=3]>"
        )
        pool.putconn(conn)
    assert "'shown' closed" in repr(pool)


def test_stats_reports_sizes_counts_and_counters_that_only_grow(dsn, terminate):
    with ThreadSafeConnectionPool(minconn=1, maxconn=2, dsn=dsn, name="counted") as pool:
        first = pool.stats()
        for key in (
            "name",
            "minconn",
            "maxconn",
            "idle",
            "in_use",
            "waiting",
            "checkouts",
            "connections_opened",
            "connections_closed",
            "connect_errors",
            "timeouts",
            "broken_discarded",
            "wait_ms_total",
        ):
            assert key in first
        assert (first["name"], first["minconn"], first["maxconn"], first["idle"]) == ("counted", 1, 2, 1)
        a, b = pool.getconn(), pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
        terminate(a)
        with pytest.raises(psycopg2.OperationalError):
            a.cursor().execute("SELECT 1")
        pool.putconn(a)
        pool.putconn(b)
        second = pool.stats()
        assert second["checkouts"] == 2
        assert second["connections_opened"] == 2
        assert second["timeouts"] == 1
        assert second["broken_discarded"] == 1
        assert second["connections_closed"] == 1
        assert second["wait_ms_total"] >= 40
        counters = ("checkouts", "connections_opened", "connections_closed", "timeouts", "broken_discarded")
        assert all(second[k] >= first[k] for k in counters)
        assert isinstance(second, dict)


# -- logging and secrets ---------------------------------------------------------------------------


def test_connects_and_discards_are_logged_with_the_pool_name_and_timeouts_are_raised_not_logged(dsn, terminate, caplog):
    caplog.set_level(logging.INFO, logger="pgpool")
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, name="logged") as pool:
        conn = pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
        terminate(conn)
        with pytest.raises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
        pool.putconn(conn)
    messages = [r.getMessage() for r in caplog.records if r.name == "pgpool"]
    assert any("'logged': opened connection" in m for m in messages)
    assert any("'logged': closing connection: broken" in m for m in messages)
    # A PoolTimeout is raised to the caller, not also logged at WARNING (one record per event).
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("couldn't get a connection" in m for m in warnings)
    assert all(isinstance(r.args, tuple) and r.args for r in caplog.records if r.name == "pgpool")


SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "settings",
    [
        {"dsn": f"postgresql://postgres:{SECRET}@127.0.0.1:{{port}}/postgres"},
        {"dsn": f"host=127.0.0.1 port={{port}} user=postgres password={SECRET}"},
        {"dsn": "host=127.0.0.1 port={port} user=postgres", "password": SECRET},
        {"dsn": "host=127.0.0.1 port={port} user=postgres", "env": SECRET},
    ],
    ids=["url", "keyword-dsn", "password-kwarg", "PGPASSWORD"],
)
def test_passwords_never_appear_in_logs_reprs_or_pool_errors(settings, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="pgpool")
    settings = dict(settings)
    if settings.pop("env", None):
        monkeypatch.setenv("PGPASSWORD", SECRET)
    settings["dsn"] = settings["dsn"].format(port=closed_port())  # a server that is down
    seen: list[str] = []
    with ThreadSafeConnectionPool(minconn=0, name="secret", connect_timeout=1, **settings) as pool:
        seen.append(repr(pool))
        seen.append(str(pool.stats()))
        with pytest.raises(PoolTimeout) as info:
            pool.getconn(timeout=0.3)
        seen.append(str(info.value))
    seen.extend(r.getMessage() for r in caplog.records)
    assert any("connect failed" in s for s in seen)
    assert not [s for s in seen if SECRET in s]


def test_an_invalid_dsn_is_refused_without_quoting_its_password():
    with pytest.raises(ValueError, match="invalid dsn for pool 'bad'") as info:
        ConnectionPool(minconn=0, name="bad", dsn=f"host=127.0.0.1 password={SECRET} oops")
    assert SECRET not in str(info.value)


# -- leaks and housekeeping ------------------------------------------------------------------------


def borrow_and_forget(pool):
    return pool.getconn()  # the line a leak report must point at


@pytest.mark.timing
def test_a_connection_held_past_leak_timeout_is_reported_once_with_the_borrowing_stack(dsn, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool")
    with ThreadSafeConnectionPool(minconn=0, dsn=dsn, leak_timeout=0.3, name="leaky") as pool:
        conn = borrow_and_forget(pool)
        started = time.monotonic()
        # Nothing else happens on the pool: the housekeeper must notice by itself.
        assert wait_until(lambda: any("not returned" in r.getMessage() for r in caplog.records), timeout=5)
        noticed = time.monotonic() - started
        time.sleep(0.6)
        reports = [r.getMessage() for r in caplog.records if "not returned" in r.getMessage()]
        pool.putconn(conn)
    assert len(reports) == 1
    assert "'leaky'" in reports[0] and "borrow_and_forget" in reports[0]
    assert noticed < 2.0, f"reported {noticed:.2f} s after borrowing (leak_timeout 0.3 s)"


def test_idle_connections_are_evicted_in_the_background(dsn, sessions):
    with ThreadSafeConnectionPool(minconn=0, idle_timeout=0.3, dsn=dsn) as pool:
        conns = [pool.getconn() for _ in range(3)]
        for conn in conns:
            pool.putconn(conn)
        # No further call on the pool: the housekeeper evicts them.
        assert sessions(expect=0) == 0
        assert all(c.closed for c in conns)


def test_minconn_is_refilled_in_the_background(dsn, sessions):
    with ThreadSafeConnectionPool(minconn=2, dsn=dsn) as pool:
        pool.putconn(pool.getconn())  # starts the housekeeper
        pool.clear()
        assert wait_until(lambda: len(pool.idle_connections) == 2, timeout=5)
        assert sessions(expect=2) == 2


def test_housekeeper_starts_lazily_as_a_daemon_and_stops_on_close(dsn):
    def housekeepers(pool):
        return [t for t in threading.enumerate() if t.name == f"{pool.name}-housekeeper"]

    pool = ThreadSafeConnectionPool(minconn=1, dsn=dsn)
    assert housekeepers(pool) == []
    pool.putconn(pool.getconn())
    (thread,) = housekeepers(pool)
    assert thread.daemon
    pool.close()
    assert not thread.is_alive()


def test_a_forgotten_pool_is_collected_and_its_housekeeper_ends(dsn):
    """The housekeeper holds its pool weakly: a pool nobody closed does not live forever."""
    pool = ThreadSafeConnectionPool(minconn=1, idle_timeout=0.4, dsn=dsn)
    pool.putconn(pool.getconn())
    (thread,) = [t for t in threading.enumerate() if t.name == f"{pool.name}-housekeeper"]
    del pool
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
