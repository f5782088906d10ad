"""OpenTelemetry metrics for a pool, under the database client connection-pool semantic conventions.

Install the extra (``pip install pgpool[otel]``), then::

    import pgpool.otel

    instrumentation = pgpool.otel.instrument(pool)  # the global meter provider, or meter_provider=...
    ...
    instrumentation.uninstrument()                   # stop reporting the pool

Every point carries ``db.client.connection.pool.name`` = ``pool.name``:

- ``db.client.connection.count`` (``{connection}``), with ``db.client.connection.state`` = ``idle``
  or ``used``; ``db.client.connection.idle.min`` (``minconn``); ``db.client.connection.max``
  (``maxconn``, not reported when unbounded); ``db.client.connection.pending_requests``
  (``{request}``, threads waiting in `getconn`): observable up-down counters read from `stats()` at
  each collection;
- ``db.client.connection.timeouts`` (``{timeout}``): a counter of the `PoolTimeout` raised since
  the pool was instrumented;
- ``db.client.connection.wait_time`` (every lend: how long `getconn` took), ``create_time``
  (every connection opened: for a lend, for ``minconn``, or a background refill), ``use_time``
  (every return: how long the connection was lent):
  histograms in seconds.

Importing `pgpool` never imports OpenTelemetry; only this module does. An instrumented pool tells
its listener of each connect and timeout (``pool._events``), and appends each borrow's wait and use
time to a buffer (one ``deque.append``, on the fast paths too) that the listener records in its
histograms when the metrics are collected, or when the pool's housekeeper hands them over (at most
100,000 of each wait to be recorded: past that, the oldest are dropped): the
levels (connection counts, pending requests, sizes) are observed at collection, never counted per
borrow. An uninstrumented pool pays one attribute check per getconn and putconn.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

try:
    from opentelemetry.metrics import (
        CallbackOptions,
        Meter,
        MeterProvider,
        Observation,
        get_meter,
        get_meter_provider,
    )
except ImportError as exc:
    raise ImportError(f"pgpool.otel needs OpenTelemetry ({exc}): pip install pgpool[otel]") from exc

from . import __version__
from ._records import BorrowTimes
from .pool import ConnectionPool

__all__ = ["POOL_NAME", "STATE", "Instrumentation", "instrument"]

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

# Bucket boundaries for the three histograms, in seconds: a lend from the idle list takes
# microseconds, a connect milliseconds, a wait or a borrow up to the timeouts (the SDK's default
# boundaries, 0 to 10000, suit milliseconds and would put all of these in their first buckets).
SECONDS_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_lock = threading.Lock()  # guards the registries below and every pool's _events while (un)instrumenting
_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()


class _Instruments:
    """The instruments of one meter provider, shared by every pool instrumented against it.

    Shared because a meter hands back the first instrument registered under a name: a second pool's
    observable callbacks would be dropped. So one callback per instrument reports every pool.
    """

    def __init__(self, meter: Meter) -> None:
        # pool -> the attributes of its points; pools are held weakly, so a forgotten pool stops reporting
        self.pools: weakref.WeakKeyDictionary[ConnectionPool[Any], dict[str, str]] = weakref.WeakKeyDictionary()
        self.count = meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in state described by the state attribute",
        )
        self.idle_min = meter.create_observable_up_down_counter(
            "db.client.connection.idle.min",
            [self._observe_idle_min],
            unit="{connection}",
            description="The minimum number of idle open connections allowed",
        )
        self.max = meter.create_observable_up_down_counter(
            "db.client.connection.max",
            [self._observe_max],
            unit="{connection}",
            description="The maximum number of open connections allowed",
        )
        self.pending_requests = meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            [self._observe_pending_requests],
            unit="{request}",
            description="The number of current pending requests for an open connection",
        )
        # Not in the semantic conventions: pgpool's own, named in its namespace.
        self.evictions = meter.create_observable_counter(
            "pgpool.connection.evictions",
            [self._observe_evictions],
            unit="{eviction}",
            description="Rounds of closing every connection opened before: a failover seen, or drain()",
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to obtain a connection from the "
            "pool",
        )
        self.create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )

    def _stats(self) -> Iterator[tuple[Mapping[str, Any], dict[str, str]]]:
        with _lock:
            pools = list(self.pools.items())  # a WeakKeyDictionary may not change while iterated
        for pool, attributes in pools:
            yield pool.stats(), attributes

    def _flush_all(self) -> None:
        """Record every pool's pending borrow timings: the histograms are read right after."""
        with _lock:
            pools = list(self.pools)
        for pool in pools:
            listener = pool._events
            if isinstance(listener, _Listener):
                listener.flush()

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        # The collection calls the observable instruments before it reads the synchronous ones, so
        # the borrow timings recorded here are in this very collection.
        self._flush_all()
        for stats, attributes in self._stats():
            yield Observation(stats["idle"], {**attributes, STATE: "idle"})
            yield Observation(stats["in_use"], {**attributes, STATE: "used"})

    def _observe_idle_min(self, options: CallbackOptions) -> Iterable[Observation]:
        for stats, attributes in self._stats():
            yield Observation(stats["minconn"], attributes)

    def _observe_max(self, options: CallbackOptions) -> Iterable[Observation]:
        for stats, attributes in self._stats():
            if stats["maxconn"] != float("inf"):  # unbounded: there is no maximum to report
                yield Observation(int(stats["maxconn"]), attributes)

    def _observe_pending_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        for stats, attributes in self._stats():
            yield Observation(stats["waiting"], attributes)

    def _observe_evictions(self, options: CallbackOptions) -> Iterable[Observation]:
        for stats, attributes in self._stats():
            yield Observation(stats["evictions"], attributes)


class _Listener:
    """The pool's ``_events``: told of each connect and timeout, it records them; the wait and use
    time of each borrow the pool appends to `times` (one ``deque.append``, fast paths included), and
    the listener records them in its histograms when the metrics are collected or the housekeeper
    hands them over (`flush`), so that a borrow never pays for a histogram."""

    __slots__ = ("attributes", "instruments", "times")

    def __init__(self, instruments: _Instruments, attributes: dict[str, str]) -> None:
        self.instruments = instruments
        self.attributes = attributes
        self.times = BorrowTimes()

    def opened(self, pool: ConnectionPool[Any], connect_seconds: float) -> None:
        """Every connect: for a borrower, for minconn at construction, or a background refill."""
        self.instruments.create_time.record(connect_seconds, self.attributes)

    def timed_out(self, pool: ConnectionPool[Any]) -> None:
        self.instruments.timeouts.add(1, self.attributes)

    def flush(self, pool: ConnectionPool[Any] | None = None) -> None:
        """Record the borrow timings taken so far (from any thread: each is taken once, popleft)."""
        waits, uses = self.times.waits, self.times.uses
        wait_time, use_time, attributes = self.instruments.wait_time, self.instruments.use_time, self.attributes
        while waits:
            try:
                wait_time.record(waits.popleft(), attributes)
            except IndexError:
                break  # taken by another flush meanwhile
        while uses:
            try:
                use_time.record(uses.popleft(), attributes)
            except IndexError:
                break


class Instrumentation:
    """What `instrument` returns: `uninstrument` stops reporting the pool."""

    def __init__(self, pool: ConnectionPool[Any], instruments: _Instruments, listener: _Listener) -> None:
        self._pool = weakref.ref(pool)  # the instrumentation must not keep a forgotten pool alive
        self._instruments = instruments
        self._listener = listener
        self.pool_name = pool.name

    @property
    def active(self) -> bool:
        """True until `uninstrument` is called (or the pool is garbage collected)."""
        pool = self._pool()
        return pool is not None and pool._events is self._listener

    def uninstrument(self) -> None:
        """Stop reporting the pool: no more points for it, from the next collection on. Calling it
        again does nothing. The pool may then be instrumented again."""
        with _lock:
            pool = self._pool()
            if pool is None:
                return
            if self._instruments.pools.get(pool) is self._listener.attributes:
                del self._instruments.pools[pool]
            if pool._events is self._listener:
                pool._events = None
        self._listener.flush()  # what was borrowed while it was instrumented is still recorded

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"<Instrumentation of pool {self.pool_name!r} {state}>"


def instrument(pool: ConnectionPool[Any], meter_provider: MeterProvider | None = None) -> Instrumentation:
    """Report `pool` under the OpenTelemetry database connection-pool semantic conventions.

    Uses `meter_provider`, or the global one (`opentelemetry.metrics.set_meter_provider`, which
    should be called first: instruments created on the global provider before it is set are bound
    to it later, but a pool instrumented after that gets instruments of their own). Returns an
    `Instrumentation`, whose `uninstrument` undoes this. A pool can be instrumented once at a time:
    a second call raises `ValueError`.
    """
    if not isinstance(pool, ConnectionPool):
        raise TypeError(f"instrument() takes a pgpool pool, got {type(pool).__name__}")
    provider = meter_provider if meter_provider is not None else get_meter_provider()
    instruments = _instruments_for(provider)
    attributes = {POOL_NAME: pool.name}
    listener = _Listener(instruments, attributes)
    with _lock:
        if pool._events is not None:
            raise ValueError(
                f"pool {pool.name!r} is already instrumented: call uninstrument() on what the first "
                "instrument() returned before instrumenting it again"
            )
        instruments.pools[pool] = attributes
        pool._events = listener
    instruments.timeouts.add(0, attributes)  # so that the counter is exported, at 0, before a first timeout
    return Instrumentation(pool, instruments, listener)


def _instruments_for(provider: MeterProvider) -> _Instruments:
    with _lock:
        instruments = _by_provider.get(provider)
    if instruments is not None:
        return instruments
    # Created outside the lock: the SDK may be collecting, holding its own locks, and our callbacks
    # take ours. Two threads may both get here; the first to register wins, and the other's
    # instruments are the same SDK objects (a meter hands back what was registered under a name).
    created = _Instruments(get_meter("pgpool", __version__, meter_provider=provider))
    with _lock:
        return _by_provider.setdefault(provider, created)
