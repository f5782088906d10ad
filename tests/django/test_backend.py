"""ENGINE "pgpool.django": Django's lifecycle on a pool, against the session's real server."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import threading
import time

import psycopg2
import pytest

pytest.importorskip("django")

from django.core.exceptions import ImproperlyConfigured

import pgpool


def _backend_pid(connection) -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


# -- settings ------------------------------------------------------------------------------------


def test_close_gives_the_session_back_to_the_pool_instead_of_closing_it(make_alias, sessions):
    from django.db import connections

    alias = make_alias(OPTIONS={"pool": {"maxconn": 2}})
    connection = connections[alias]
    first = _backend_pid(connection)
    connection.close()
    assert connection.connection is None
    assert connection.pool.stats()["in_use"] == 0
    assert _backend_pid(connection) == first  # the same server session, lent again
    connection.close()
    assert sessions() == 1


def test_pool_true_and_no_pool_key_mean_a_pool_with_the_defaults(make_alias):
    from django.db import connections

    for options in ({"pool": True}, {}):
        connection = connections[make_alias(OPTIONS=options)]
        pool = connection.pool
        assert isinstance(pool, pgpool.ThreadSafeConnectionPool)
        assert (pool.minconn, pool.maxconn, pool.timeout) == (1, float("inf"), 0.0)


def test_pool_false_is_the_stock_backend_closing_its_socket(make_alias, sessions):
    from django.db import connections

    connection = connections[make_alias(OPTIONS={"pool": False}, CONN_MAX_AGE=60)]
    assert connection.pool is None
    _backend_pid(connection)
    assert sessions() == 1
    connection.close()
    assert sessions(expect=0) == 0


def test_pool_options_reach_the_pool(make_alias):
    from django.db import connections

    reset = pgpool.reset_session
    options = {"minconn": 0, "maxconn": 3, "timeout": 1.5, "idle_timeout": 30, "max_lifetime": 99, "name": "orders"}
    connection = connections[make_alias(OPTIONS={"pool": {**options, "reset": reset, "leak_timeout": 7}})]
    pool = connection.pool
    assert (pool.minconn, pool.maxconn, pool.timeout, pool.idle_timeout) == (0, 3, 1.5, 30)
    assert (pool.max_lifetime, pool.name, pool.reset, pool.leak_timeout) == (99, "orders", reset, 7)


def test_one_pool_per_alias_shared_by_threads_and_copies(make_alias):
    from django.db import connections

    alias, other = make_alias(), make_alias()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(connections[alias].pool))
    thread.start()
    thread.join(10)
    assert seen == [connections[alias].pool]
    assert connections[alias].copy().pool is connections[alias].pool
    assert connections[other].pool is not connections[alias].pool


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("min_size", "pgpool calls it 'minconn'"),
        ("max_size", "pgpool calls it 'maxconn'"),
        ("max_idle", "pgpool calls it 'idle_timeout'"),
        ("maxcon", "did you mean 'maxconn'?"),
        ("idle_timout", "did you mean 'idle_timeout'?"),
        ("pool_recycle", "pgpool calls it 'max_lifetime'"),
        ("kwargs", "connection parameters go in OPTIONS itself"),
        ("frobnicate", "pgpool's options are minconn, maxconn"),
    ],
)
def test_a_wrong_option_name_is_refused_naming_it_and_the_right_one(make_alias, option, says):
    from django.db import connections

    connection = connections[make_alias(OPTIONS={"pool": {option: 4}})]
    with pytest.raises(ImproperlyConfigured) as caught:
        connection.ensure_connection()
    message = str(caught.value)
    assert f"unknown option {option!r}" in message and says in message, message
    assert "['OPTIONS']['pool']" in message


def test_max_lifetime_is_the_same_name_as_psycopg_pools(make_alias):
    from django.db import connections

    assert connections[make_alias(OPTIONS={"pool": {"max_lifetime": 60}})].pool.max_lifetime == 60


def test_a_bad_option_value_is_improperly_configured_naming_the_parameter(make_alias):
    from django.db import connections

    connection = connections[make_alias(OPTIONS={"pool": {"maxconn": 0}})]
    with pytest.raises(ImproperlyConfigured, match=r"\['pool'\]: maxconn must be"):
        connection.ensure_connection()


def test_a_pool_option_outside_pool_is_refused(make_alias):
    from django.db import connections

    connection = connections[make_alias(OPTIONS={"maxconn": 4})]
    with pytest.raises(ImproperlyConfigured, match="'maxconn' is a pool option: put it in OPTIONS"):
        connection.ensure_connection()


def test_conn_max_age_with_a_pool_is_refused(make_alias):
    from django.db import connections

    connection = connections[make_alias(CONN_MAX_AGE=60)]
    with pytest.raises(ImproperlyConfigured, match="persistent connections"):
        connection.ensure_connection()


def test_conn_health_checks_becomes_the_pools_check(make_alias):
    from django.db import connections

    assert connections[make_alias(CONN_HEALTH_CHECKS=True)].pool.check is pgpool.check_connection
    assert connections[make_alias()].pool.check is None
    mine = pgpool.check_connection
    assert connections[make_alias(CONN_HEALTH_CHECKS=True, OPTIONS={"pool": {"check": mine}})].pool.check is mine


def test_the_password_is_in_no_error(make_alias, base_dsn):
    from django.db import connections

    connection = connections[make_alias(PASSWORD="s3cr3t-pw", OPTIONS={"pool": {"maxconn": "x"}})]
    with pytest.raises(ImproperlyConfigured) as caught:
        connection.ensure_connection()
    assert "s3cr3t-pw" not in str(caught.value)
    assert "s3cr3t-pw" not in repr(connection.pool if False else None)


# -- the lifecycle -------------------------------------------------------------------------------


def test_close_rolls_back_and_restores_autocommit(make_alias, table):
    from django.db import connections

    connection = connections[make_alias(OPTIONS={"pool": {"maxconn": 1}})]
    connection.set_autocommit(False)
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1)")
    connection.close()
    assert connection.get_autocommit() is True  # a new borrow: Django's AUTOCOMMIT again
    with connection.cursor() as cur:
        assert connection.connection.autocommit is True
        cur.execute(f"SELECT count(*) FROM {table}")
        assert cur.fetchone()[0] == 0
    connection.close()


def test_close_old_connections_returns_the_connection(make_alias):
    from django.db import close_old_connections, connections

    connection = connections[make_alias()]
    _backend_pid(connection)
    assert connection.pool.stats()["in_use"] == 1
    close_old_connections()  # what Django runs at each request's start and end (CONN_MAX_AGE = 0)
    assert connection.connection is None
    assert connection.pool.stats()["in_use"] == 0


def test_session_setup_runs_once_per_server_session(make_alias, admin):
    from django.db import connections

    with admin.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgpool_django_role")
        cur.execute("CREATE ROLE pgpool_django_role")
    runs = []
    alias = make_alias(
        TIME_ZONE="Asia/Tokyo",
        OPTIONS={
            "assume_role": "pgpool_django_role",
            "isolation_level": psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
            "pool": {"maxconn": 1, "configure": runs.append},
        },
    )
    connection = connections[alias]
    try:
        for _ in range(5):
            with connection.cursor() as cur:
                cur.execute("SELECT current_setting('TimeZone'), current_user")
                assert cur.fetchone() == ("Asia/Tokyo", "pgpool_django_role")
            from django.db import transaction

            with transaction.atomic(using=alias):
                with connection.cursor() as cur:
                    cur.execute("SHOW transaction_isolation")
                    assert cur.fetchone()[0] == "serializable"
            assert connection.isolation_level == psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE
            connection.close()
        assert len(runs) == 1
        assert connection.pool.stats()["connections_opened"] == 1
    finally:
        connection.close()
        connection.close_pool()
        with admin.cursor() as cur:
            cur.execute("DROP ROLE pgpool_django_role")


def test_a_new_time_zone_setting_makes_a_new_pool(make_alias):
    """override_settings(TIME_ZONE=...) closes the pool (ensure_timezone): new sessions get the zone."""
    from django.db import connections
    from django.test.utils import override_settings

    alias = make_alias()
    connection = connections[alias]
    before = connection.pool
    with override_settings(USE_TZ=False, TIME_ZONE="America/Chicago"):
        with connection.cursor() as cur:
            cur.execute("SELECT current_setting('TimeZone')")
            assert cur.fetchone()[0] == "America/Chicago"
        connection.close()
    assert before.closed
    with connection.cursor() as cur:
        cur.execute("SELECT current_setting('TimeZone')")
        assert cur.fetchone()[0] == "UTC"
    connection.close()


def test_closing_inside_atomic_behaves_as_the_stock_backend(make_alias, table, sessions):
    from django.db import InterfaceError, connections, transaction

    results = {}
    for kind, options in (("stock", {"pool": False}), ("pooled", {"pool": {"minconn": 0, "maxconn": 1}})):
        alias = make_alias(OPTIONS=options)
        connection = connections[alias]
        seen = []
        with transaction.atomic(using=alias):
            with connection.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (1)")
            connection.close()
            seen.append((connection.connection is not None, bool(connection.connection.closed)))
            seen.append((connection.closed_in_transaction, connection.needs_rollback))
            with pytest.raises(InterfaceError) as caught:
                with connection.cursor() as cur:
                    cur.execute("SELECT 1")
            seen.append(str(caught.value))
        seen.append(connection.connection is None)
        seen.append(sessions(expect=0))
        results[kind] = seen
        with connection.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            seen.append(cur.fetchone()[0])
        connection.close()
    assert results["pooled"] == results["stock"]
    assert results["pooled"] == [(True, True), (True, True), "connection already closed", True, 0, 0]
    assert connections[alias].pool.stats()["in_use"] == 0


def test_a_connection_lost_inside_atomic_behaves_as_the_stock_backend_and_is_discarded(make_alias, terminate, table):
    from django.db import Error, connections, transaction

    results = {}
    for kind, options in (("stock", {"pool": False}), ("pooled", {"pool": {"maxconn": 1}})):
        alias = make_alias(OPTIONS=options)
        connection = connections[alias]
        seen = []
        with pytest.raises(Error) as caught:
            with transaction.atomic(using=alias):
                with connection.cursor() as cur:
                    cur.execute(f"INSERT INTO {table} VALUES (1)")
                terminate(connection.connection)
                with connection.cursor() as cur:
                    cur.execute("SELECT 1")
        seen.append(type(caught.value).__name__)
        seen.append((connection.in_atomic_block, connection.connection is None or bool(connection.connection.closed)))
        connection.close()
        with connection.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            seen.append(cur.fetchone()[0])
        results[kind] = seen
        connection.close()
    assert results["pooled"] == results["stock"], results
    stats = connections[alias].pool.stats()
    assert stats["broken_discarded"] == 1 and stats["in_use"] == 0, stats


def test_a_connection_broken_outside_atomic_is_discarded_not_lent_again(make_alias, terminate):
    from django.db import OperationalError, close_old_connections, connections

    connection = connections[make_alias(OPTIONS={"pool": {"maxconn": 1, "minconn": 0}})]
    dead = _backend_pid(connection)
    terminate(connection.connection)
    with pytest.raises(OperationalError):
        _backend_pid(connection)
    close_old_connections()  # errors_occurred: the wrapper finds it unusable and closes it
    assert connection.connection is None
    assert _backend_pid(connection) != dead
    stats = connection.pool.stats()
    assert stats["broken_discarded"] == 1 and stats["in_use"] == 1, stats
    connection.close()


@pytest.mark.parametrize("timeout", [0.2, 0])
def test_an_exhausted_pool_raises_operational_error_after_its_timeout(make_alias, timeout):
    from django.db import OperationalError, connections

    alias = make_alias(OPTIONS={"pool": {"maxconn": 1, "timeout": timeout}})
    _backend_pid(connections[alias])
    failed = []

    def borrow() -> None:
        try:
            _backend_pid(connections[alias])
        except OperationalError as exc:
            failed.append(exc)
        finally:
            connections[alias].close()

    thread = threading.Thread(target=borrow)
    thread.start()
    thread.join(10)
    assert len(failed) == 1
    assert isinstance(failed[0].__cause__, pgpool.PoolTimeout)
    assert "maxconn=1" in str(failed[0]) and alias in str(failed[0])
    connections[alias].close()


# -- work outside requests -----------------------------------------------------------------------


@pytest.mark.timing
def test_a_thread_that_never_closes_gives_its_slot_back_when_it_ends(make_alias, sessions, caplog):
    """Django's wrappers are reference cycles: the next lend collects the ended thread's."""
    from django.db import connections

    alias = make_alias(OPTIONS={"pool": {"maxconn": 1, "timeout": 2, "leak_timeout": 60}})

    def forgetful_task() -> None:
        _backend_pid(connections[alias])  # never closed

    gc.collect()
    gc.disable()  # only the backend's reclaim may collect the thread's wrapper
    try:
        thread = threading.Thread(target=forgetful_task)
        thread.start()
        thread.join(10)
        pool = connections[alias].pool
        assert pool.stats()["in_use"] == 1  # the thread is gone, its wrapper (a cycle) not yet
        caplog.set_level(logging.WARNING, logger="pgpool")
        start = time.monotonic()
        _backend_pid(connections[alias])  # maxconn=1: possible only with the slot back
        assert time.monotonic() - start < 1.5  # no wait for a timeout
    finally:
        gc.enable()
    assert pool.stats()["leaked"] == 1
    connections[alias].close()

    def reports() -> list[str]:
        return [r.getMessage() for r in caplog.records if "garbage collected" in r.getMessage()]

    deadline = time.monotonic() + 5  # the housekeeper reports collected leaks at its next round
    while not reports() and time.monotonic() < deadline:
        time.sleep(0.05)
    found = reports()
    assert found and "forgetful_task" in found[0], found
    assert sessions() == 1


@pytest.mark.timing
def test_sync_to_async_without_close_gives_its_slot_back_when_its_thread_ends(make_alias):
    from asgiref.sync import sync_to_async
    from django.db import connections

    alias = make_alias(OPTIONS={"pool": {"maxconn": 1, "timeout": 2}})

    async def main() -> int:
        return await sync_to_async(lambda: _backend_pid(connections[alias]), thread_sensitive=False)()

    asyncio.run(main())  # asyncio.run shuts its executor down: the thread ends, its wrapper is garbage
    start = time.monotonic()
    _backend_pid(connections[alias])
    assert time.monotonic() - start < 1.5
    connections[alias].close()


def test_the_child_of_a_fork_gets_its_own_sessions_and_leaves_the_parents_alone(make_alias):
    from django.db import connections

    alias = make_alias(OPTIONS={"pool": {"maxconn": 2}})
    connection = connections[alias]
    parent_pid = _backend_pid(connection)  # borrowed, kept over the fork
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(read)
            from django.db import transaction

            with transaction.atomic(using=alias):  # entering atomic() first: it drops the inherited one
                pids = [_backend_pid(connection)]
            connection.close()
            pids.append(_backend_pid(connections[alias]))
            connection.close()
            os.write(write, json.dumps(pids).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_pids = json.loads(pipe.read() or "null")
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_pids is not None and parent_pid not in child_pids
    assert _backend_pid(connection) == parent_pid  # the parent's session survived the child
    connection.close()


# -- test databases ------------------------------------------------------------------------------


def test_test_databases_are_created_cloned_and_dropped_without_waiting(make_alias, admin, app_name):
    """Idle pooled sessions on the test database and its clone, of two aliases, block no DROP."""
    from django.db import connections

    name = f"pgpool_dj_{os.getpid()}"
    alias = make_alias(NAME=name, TEST={"NAME": f"test_{name}"}, OPTIONS={"pool": {"minconn": 2}})
    mirror = make_alias(NAME=name, OPTIONS={"pool": {"minconn": 2}})
    connection = connections[alias]
    old_name = connection.settings_dict["NAME"]
    start = time.monotonic()
    try:
        test_name = connection.creation.create_test_db(verbosity=0)
        connections[mirror].settings_dict["NAME"] = test_name  # as a TEST MIRROR would be
        _backend_pid(connections[mirror])
        connections[mirror].close()
        connection.close()
        assert connection.pool.stats()["idle"] == 2 and connections[mirror].pool.stats()["idle"] == 2
        connection.creation.clone_test_db(suffix="1", verbosity=0)
        clone = connection.creation.get_test_db_clone_settings("1")["NAME"]
        connection.creation.destroy_test_db(verbosity=0, suffix="1")
        connection.creation.destroy_test_db(old_name, verbosity=0)
    finally:
        with admin.cursor() as cur:
            for leftover in (f"test_{name}", f"test_{name}_1"):
                cur.execute(f"DROP DATABASE IF EXISTS {leftover} WITH (FORCE)")
    elapsed = time.monotonic() - start
    with admin.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname IN (%s, %s)", (test_name, clone))
        assert cur.fetchall() == []
    assert elapsed < 4, f"DROP DATABASE waited: {elapsed:.1f} s"  # PostgreSQL waits 5 s, then fails


def test_a_changed_database_name_gets_a_new_pool(make_alias, admin):
    from django.db import connections

    connection = connections[make_alias()]
    first = connection.pool
    connection.settings_dict["NAME"] = "template1"
    with connection.cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone()[0] == "template1"
    assert first.closed and connection.pool is not first
    connection.close()
    connection.close_pool()


# -- visibility ----------------------------------------------------------------------------------


def test_pool_stats_lists_each_alias_and_the_command_prints_them(make_alias):
    from django.core.management import call_command
    from django.db import connections

    from pgpool.django import pool_stats

    alias = make_alias(OPTIONS={"pool": {"maxconn": 3, "name": "reports"}})
    _backend_pid(connections[alias])
    assert pool_stats()[alias]["name"] == "reports"
    assert pool_stats()[alias]["in_use"] == 1
    out = io.StringIO()
    call_command("pgpool_stats", stdout=out)
    assert f"{alias}: pool 'reports' idle=0 in_use=1 waiting=0 maxconn=3" in out.getvalue()
    out = io.StringIO()
    call_command("pgpool_stats", "--json", stdout=out)
    assert json.loads(out.getvalue())[alias]["checkouts"] == 1
    connections[alias].close()


def test_otel_instruments_an_alias_pool(make_alias):
    pytest.importorskip("opentelemetry.sdk")
    from django.db import connections
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import pgpool.otel

    alias = make_alias(OPTIONS={"pool": {"maxconn": 3}})
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentation = pgpool.otel.instrument(connections[alias].pool, meter_provider=provider)
    try:
        for _ in range(3):
            _backend_pid(connections[alias])
            connections[alias].close()
        data = reader.get_metrics_data()
        points = {
            metric.name: metric.data.data_points
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }
        assert sum(p.count for p in points["db.client.connection.use_time"]) == 3
        names = {p.attributes["db.client.connection.pool.name"] for p in points["db.client.connection.max"]}
        assert names == {f"django-{alias}"}
    finally:
        instrumentation.uninstrument()
        provider.shutdown()


def test_with_reset_session_djangos_setup_survives_discard_all(make_alias):
    """DISCARD ALL on each return undoes every SET; pgpool runs configure again, so the zone stays."""
    from django.db import connections

    connection = connections[
        make_alias(TIME_ZONE="Asia/Tokyo", OPTIONS={"pool": {"maxconn": 1, "reset": pgpool.reset_session}})
    ]
    for _ in range(3):
        with connection.cursor() as cur:
            cur.execute("SELECT current_setting('TimeZone'), current_setting('work_mem')")
            assert cur.fetchone() == ("Asia/Tokyo", "4MB")
            cur.execute("SET work_mem = '64MB'")  # a borrower's SET: gone at the next borrow
        connection.close()
    assert connection.pool.stats()["connections_opened"] == 1
