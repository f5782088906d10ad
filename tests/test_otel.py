"""pgpool.otel: the values reported under the OpenTelemetry connection-pool conventions, read back
with the SDK's in-memory reader after a scripted workload on a real server."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics", reason="needs opentelemetry-sdk (the test extra)")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import pgpool.otel
from pgpool import ConnectionPool, PoolError, PoolTimeout, ThreadSafeConnectionPool
from pgpool.otel import POOL_NAME, STATE

from .helpers import closed_port, join_all, wait_until

ROOT = Path(__file__).resolve().parents[1]

ALL_METRICS = {
    "db.client.connection.count",
    "db.client.connection.idle.min",
    "db.client.connection.max",
    "db.client.connection.pending_requests",
    "db.client.connection.timeouts",
    "db.client.connection.create_time",
    "db.client.connection.wait_time",
    "db.client.connection.use_time",
    "pgpool.connection.evictions",
}


class Metrics:
    """A meter provider with an in-memory reader; `collect()` reads every point, by metric name."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.units: dict[str, str] = {}

    def collect(self) -> dict[str, list[Any]]:
        points: dict[str, list[Any]] = defaultdict(list)
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    self.units[metric.name] = metric.unit
                    points[metric.name].extend(metric.data.data_points)
        return points

    def point(self, name: str, pool: str, **attributes: str) -> Any:
        """The one point of metric `name` for `pool` (and `attributes`); fails if there is not one."""
        want = {POOL_NAME: pool, **{key.replace("__", "."): value for key, value in attributes.items()}}
        found = [p for p in self.collect().get(name, []) if _matches(p.attributes, want)]
        assert len(found) == 1, f"{name} {want}: {found}"
        return found[0]

    def value(self, name: str, pool: str, **attributes: str) -> Any:
        return self.point(name, pool, **attributes).value


def _matches(attributes: Any, want: dict[str, str]) -> bool:
    return all(attributes.get(key) == value for key, value in want.items())


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.provider.shutdown()


def counts(metrics: Metrics, pool: str) -> dict[str, int]:
    return {
        state: metrics.value("db.client.connection.count", pool, **{STATE.replace(".", "__"): state})
        for state in ("idle", "used")
    }


@pytest.mark.timing
def test_use_time_has_one_point_per_borrow_summing_the_time_held(pool_cls, dsn, metrics):
    sleeps = [0.01, 0.02, 0.03, 0.04, 0.05]
    with pool_cls(minconn=0, maxconn=2, name="uses", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        for sleep in sleeps:
            conn = pool.getconn()
            time.sleep(sleep)
            pool.putconn(conn)
        use = metrics.point("db.client.connection.use_time", "uses")
        print("use_time sum", use.sum, "min", use.min, "max", use.max, "slept", sum(sleeps))
        assert use.count == len(sleeps)
        assert sum(sleeps) <= use.sum < sum(sleeps) + 0.05 * len(sleeps)
        assert use.min >= 0.01 and use.max >= 0.05
        assert use.sum * 1000 == pytest.approx(pool.stats()["usage_ms_total"], abs=len(sleeps))
        assert metrics.point("db.client.connection.wait_time", "uses").count == len(sleeps)
        assert metrics.units["db.client.connection.use_time"] == "s"


@pytest.mark.timing
def test_wait_time_records_a_wait_for_a_connection_held_by_another_thread(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=5, name="waits", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        holding = threading.Barrier(2, timeout=5)

        def hold() -> None:
            conn = pool.getconn()
            holding.wait()
            time.sleep(0.2)
            pool.putconn(conn)

        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait()
        pool.putconn(pool.getconn())  # waits about 0.2 s for the holder's connection
        join_all([holder])
        wait = metrics.point("db.client.connection.wait_time", "waits")
        print("wait_time max", wait.max, "sum", wait.sum, "count", wait.count)
        assert wait.count == 2
        assert 0.15 <= wait.max < 2
        assert metrics.units["db.client.connection.wait_time"] == "s"


def test_a_timeout_counts_once(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, name="timeouts", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        assert metrics.value("db.client.connection.timeouts", "timeouts") == 0  # exported before any
        held = pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
        assert metrics.value("db.client.connection.timeouts", "timeouts") == 1
        with pytest.raises(PoolError):
            pool.getconn(timeout=0)  # refused at once: not a timeout
        assert metrics.value("db.client.connection.timeouts", "timeouts") == 1
        pool.putconn(held)
        assert pool.stats()["timeouts"] == 1
        assert metrics.units["db.client.connection.timeouts"] == "{timeout}"


def test_a_timeout_while_the_server_is_down_counts_too(metrics):
    dsn = f"postgresql://127.0.0.1:{closed_port()}/nothing"
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=0.2, name="down", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        with pytest.raises(PoolTimeout):
            pool.getconn()
        assert metrics.value("db.client.connection.timeouts", "down") == 1
        assert "db.client.connection.create_time" not in metrics.collect()


def test_connection_counts_while_k_connections_are_held(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=0, maxconn=5, name="counts", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        assert counts(metrics, "counts") == {"idle": 0, "used": 0}
        held = [pool.getconn() for _ in range(3)]
        pool.putconn(held.pop())
        assert counts(metrics, "counts") == {"idle": 1, "used": 2}
        assert metrics.value("db.client.connection.idle.min", "counts") == 0
        assert metrics.value("db.client.connection.max", "counts") == 5
        assert metrics.value("db.client.connection.pending_requests", "counts") == 0
        for conn in held:
            pool.putconn(conn)
        assert counts(metrics, "counts") == {"idle": 3, "used": 0}
        assert metrics.units["db.client.connection.count"] == "{connection}"


def test_max_is_not_reported_for_an_unbounded_pool(dsn, metrics):
    with ConnectionPool(minconn=2, name="unbounded", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        assert "db.client.connection.max" not in metrics.collect()
        assert metrics.value("db.client.connection.idle.min", "unbounded") == 2
        assert counts(metrics, "unbounded") == {"idle": 2, "used": 0}


def test_pending_requests_counts_a_waiting_thread(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=10, name="pending", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        held = pool.getconn()
        waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
        waiter.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 1)
        assert metrics.value("db.client.connection.pending_requests", "pending") == 1
        assert counts(metrics, "pending") == {"idle": 0, "used": 1}
        pool.putconn(held)
        join_all([waiter])
        assert metrics.value("db.client.connection.pending_requests", "pending") == 0
        assert metrics.units["db.client.connection.pending_requests"] == "{request}"


def test_create_time_has_one_point_per_connection_opened(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=0, maxconn=4, name="creates", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        for _ in range(2):  # the second round lends the idle connections: nothing is opened
            held = [pool.getconn() for _ in range(4)]
            for conn in held:
                pool.putconn(conn)
        create = metrics.point("db.client.connection.create_time", "creates")
        stats = pool.stats()
        print("create_time sum", create.sum, "stats", stats)
        assert create.count == stats["connections_opened"] == 4
        assert create.sum * 1000 == pytest.approx(stats["connect_ms_total"], abs=4)
        assert 0 < create.min <= create.max < 5
        assert metrics.point("db.client.connection.wait_time", "creates").count == 8


def test_create_time_counts_the_connects_of_minconn_refills_too(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=2, maxconn=4, name="refills", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        pool.clear()  # the housekeeper reopens minconn=2 in the background
        assert wait_until(lambda: pool.stats()["idle"] == 2, timeout=5)
        create = metrics.point("db.client.connection.create_time", "refills")
        assert create.count == 2 and pool.stats()["connections_opened"] == 4


def test_every_point_carries_the_pool_name(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=1, maxconn=1, name="everything", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        held = pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.01)
        pool.putconn(held, close=True)
        with pool.connection():  # reopens: a create_time point
            pass
        points = metrics.collect()
    assert set(points) == ALL_METRICS
    for name, found in points.items():
        assert found, name
        for point in found:
            assert point.attributes[POOL_NAME] == "everything", (name, point.attributes)


def test_two_pools_on_one_provider_are_reported_apart(dsn, metrics):
    with (
        ThreadSafeConnectionPool(minconn=0, maxconn=3, name="first", dsn=dsn) as first,
        ThreadSafeConnectionPool(minconn=0, maxconn=4, name="second", dsn=dsn) as second,
    ):
        pgpool.otel.instrument(first, metrics.provider)
        pgpool.otel.instrument(second, metrics.provider)
        for pool, borrows in ((first, 2), (second, 3)):
            for _ in range(borrows):
                with pool.connection():
                    pass
        held = second.getconn()
        assert metrics.point("db.client.connection.use_time", "first").count == 2
        assert metrics.point("db.client.connection.use_time", "second").count == 3
        assert metrics.value("db.client.connection.max", "first") == 3
        assert metrics.value("db.client.connection.max", "second") == 4
        assert counts(metrics, "first") == {"idle": 1, "used": 0}
        assert counts(metrics, "second") == {"idle": 0, "used": 1}
        second.putconn(held)


def test_uninstrument_stops_reporting_and_allows_instrumenting_again(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, name="undone", dsn=dsn) as pool:
        instrumentation = pgpool.otel.instrument(pool, metrics.provider)
        assert instrumentation.active
        assert "'undone' active" in repr(instrumentation)
        with pool.connection():
            pass
        instrumentation.uninstrument()
        instrumentation.uninstrument()  # again: nothing happens
        assert not instrumentation.active
        assert pool._events is None
        with pool.connection():
            pass
        points = metrics.collect()
        assert "db.client.connection.count" not in points  # the observables report nothing for it
        assert metrics.point("db.client.connection.use_time", "undone").count == 1  # unchanged since
        again = pgpool.otel.instrument(pool, metrics.provider)
        with pool.connection():
            pass
        assert metrics.point("db.client.connection.use_time", "undone").count == 2
        assert counts(metrics, "undone") == {"idle": 1, "used": 0}
        again.uninstrument()


def test_a_second_instrumentation_of_a_pool_is_refused(dsn, metrics):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, name="twice", dsn=dsn) as pool:
        first = pgpool.otel.instrument(pool, metrics.provider)
        other = Metrics()
        with pytest.raises(ValueError, match=r"pool 'twice' is already instrumented: call uninstrument\(\)"):
            pgpool.otel.instrument(pool, other.provider)
        with pool.connection():
            pass
        assert first.active
        assert metrics.point("db.client.connection.use_time", "twice").count == 1
        assert "db.client.connection.use_time" not in other.collect()
        other.provider.shutdown()
    with pytest.raises(TypeError, match="takes a pgpool pool"):
        pgpool.otel.instrument(object(), metrics.provider)  # type: ignore[arg-type]


def test_a_forgotten_pool_stops_reporting(dsn, metrics):
    pool = ThreadSafeConnectionPool(minconn=1, maxconn=2, name="forgotten", dsn=dsn)
    instrumentation = pgpool.otel.instrument(pool, metrics.provider)
    assert counts(metrics, "forgotten") == {"idle": 1, "used": 0}
    pool.close()
    del pool
    gc.collect()
    assert "db.client.connection.count" not in metrics.collect()
    assert not instrumentation.active
    instrumentation.uninstrument()  # nothing left to undo


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_pgpool_imports_nothing_of_opentelemetry():
    done = _run(
        """
        import sys
        import pgpool
        loaded = sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")
        print(loaded)
        assert "pgpool.otel" not in sys.modules
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_import_pgpool_otel_without_opentelemetry_says_what_to_install():
    done = _run(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if it were not installed
        import pgpool
        try:
            import pgpool.otel
        except ImportError as exc:
            print(exc)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "pip install pgpool[otel]" in done.stdout


def test_instrument_without_a_provider_uses_the_global_one(dsn):
    done = _run(
        """
        import os
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import pgpool, pgpool.otel

        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        with pgpool.ThreadSafeConnectionPool(minconn=0, maxconn=2, name="global", dsn=os.environ["DSN"]) as pool:
            pgpool.otel.instrument(pool)
            with pool.connection():
                pass
            for metric in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
                for point in metric.data.data_points:
                    if metric.name == "db.client.connection.use_time":
                        print(metric.name, dict(point.attributes), point.count)
        """,
        DSN=dsn,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "db.client.connection.use_time {'db.client.connection.pool.name': 'global'} 1"


def test_evictions_are_reported_as_they_happen(dsn, metrics):
    """pgpool's own counter: each drain() (or failover seen) is one round."""
    with ThreadSafeConnectionPool(minconn=1, maxconn=2, name="evictions", dsn=dsn) as pool:
        pgpool.otel.instrument(pool, metrics.provider)
        assert metrics.value("pgpool.connection.evictions", "evictions") == 0
        pool.drain()
        pool.drain()
        assert metrics.value("pgpool.connection.evictions", "evictions") == 2 == pool.stats()["evictions"]
        assert metrics.units["pgpool.connection.evictions"] == "{eviction}"
