"""The state machine (`pgpool._state.PoolState`) on its own, without a server.

It does no I/O: it reads a few attributes of a connection (closed, status, transaction status, session
characteristics) and polls its socket. `Stand` provides exactly those, over a socket pair whose other
end plays the server: writing to it is the server saying something (a notification, a goodbye).
"""

from __future__ import annotations

import gc
import socket
import sys
import threading
import time
from typing import Any

import psycopg2.extensions
import pytest

from pgpool._records import IDLE, LENT, PROBE_INTERVAL, Claim, ConnInfo
from pgpool._state import DONE, TIDY, WAIT, PoolState
from pgpool._views import ReturnTimes
from pgpool.errors import PoolClosed, PoolError


class Stand:
    """What the state machine reads of a connection, and nothing else."""

    closed = 0
    status = psycopg2.extensions.STATUS_READY
    autocommit = False
    isolation_level = None
    readonly = None
    deferrable = None
    encoding = "UTF8"
    cursor_factory = None
    pgconn_ptr = None

    def __init__(self) -> None:
        self.notices: list[str] = []
        self.notifies: list[Any] = []
        self.mine, self.server = socket.socketpair()
        _sockets.extend((self.mine, self.server))

    def fileno(self) -> int:
        return self.mine.fileno()

    def get_transaction_status(self) -> int:
        return psycopg2.extensions.TRANSACTION_STATUS_IDLE

    def get_parameter_status(self, name: str) -> str:
        return "UTF8"


_sockets: list[socket.socket] = []  # closed after each test (the stands themselves may be collected)


@pytest.fixture(autouse=True)
def _close_sockets() -> Any:
    yield
    while _sockets:
        _sockets.pop().close()


def opened(state: PoolState, lend: bool = False) -> Any:
    """Open a connection through the state machine as the pool does: a reserved slot, adopted."""
    claim = Claim()
    with state.lock:
        state.opening += 1  # what acquire or reserve_refill do when a slot is free
        claim.slot = True
    conn = Stand()
    claim.new_conn = conn  # type: ignore[assignment]
    claim.new_info = ConnInfo(conn, None)  # type: ignore[arg-type]
    assert state.adopt(claim, time.monotonic(), lend=lend)
    return claim.conn if lend else conn


def new_state(maxconn: float = 4, minconn: int = 0, idle_timeout: float = 600) -> PoolState:
    return PoolState("state-test", minconn, maxconn, idle_timeout)


def give_back(state: PoolState, conn: Any) -> str | None:
    info = state.lent.get(id(conn))
    assert info is not None
    return state.return_fast(conn, id(conn), info, time.monotonic())


def test_lend_fast_takes_the_newest_idle_connection_and_return_fast_puts_it_back():
    state = new_state()
    old, new = opened(state), opened(state)
    item = state.lend_fast(time.monotonic())
    assert item is not None and item[0] is old  # a refill goes to the least recently used end
    assert state.lent[id(old)].state is LENT
    assert give_back(state, old) is DONE
    assert [conn for conn, _ in state.idle] == [new, old]
    assert state.counts()["checkouts"] == 1


def test_a_second_return_and_a_foreign_connection_are_refused_and_change_nothing():
    state = new_state()
    conn = opened(state, lend=True)
    assert give_back(state, conn) is DONE
    assert id(conn) not in state.lent  # the atomic pop happened once: a second return_fast cannot start
    with pytest.raises(PoolError, match="putconn called twice"):
        state.begin_return(conn, time.monotonic())
    with pytest.raises(PoolError, match="foreign connection"):
        state.begin_return(Stand(), time.monotonic())  # type: ignore[arg-type]
    assert len(state.idle) == 1 and state.counts()["in_use"] == 0


def test_a_fast_return_hands_the_connection_to_the_oldest_waiter_directly():
    state = new_state(maxconn=1)
    conn = opened(state, lend=True)
    first, second = Claim(), Claim()
    assert state.acquire(first, time.monotonic(), can_wait=True) is WAIT
    assert state.acquire(second, time.monotonic(), can_wait=True) is WAIT
    assert give_back(state, conn) is DONE  # served under the lock: nothing left for tidy
    assert first.waiter is not None and first.waiter.conn is conn
    assert first.waiter.signal.acquire(timeout=0)  # woken
    assert second.waiter is not None and second.waiter.conn is None
    assert not second.waiter.signal.acquire(timeout=0)  # still asleep, first in line now
    assert not state.idle and state.lent[id(conn)].state is LENT
    assert list(state.waiters) == [second.waiter]


def test_an_interrupt_on_entering_the_hand_over_leaves_the_return_to_the_retry_uncounted(monkeypatch):
    state = new_state(maxconn=1)
    conn = opened(state, lend=True)
    info = state.lent[id(conn)]
    info.borrowed_at -= 2.0  # lent two seconds ago
    claim = Claim()
    assert state.acquire(claim, time.monotonic(), can_wait=True) is WAIT

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # as an asynchronous exception on the call's entry

    monkeypatch.setattr(state, "_serve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        give_back(state, conn)
    monkeypatch.undo()
    # Off the lent table and still LENT, as the caller's retry (the slow path, by lease) expects;
    # its two seconds not counted yet, so that the retry counts them once.
    assert id(conn) not in state.lent and info.state is LENT and info.used == 0
    claimed = state.begin_return(conn, time.monotonic(), info.lease)
    assert 2.0 <= claimed.used < 3.0
    state.finish_return(conn, claimed, None, time.monotonic(), [])
    assert claim.waiter is not None and claim.waiter.conn is conn
    assert state.counts()["usage_ms_total"] // 1000 == 2


def test_an_interrupt_while_granting_a_slot_reserves_nothing(monkeypatch):
    state = new_state(maxconn=1)
    conn = opened(state, lend=True)
    claim = Claim()
    assert state.acquire(claim, time.monotonic(), can_wait=True) is WAIT
    state.lent.pop(id(conn))
    with state.lock:
        state._drop(conn, state.conns[id(conn)], "broken", [])
    state.closing.pop(conn, None)  # closed: its slot is free for the waiter

    def interrupted() -> float:
        raise KeyboardInterrupt  # lands on a C call inside _grant

    monkeypatch.setattr("pgpool._slots.time.monotonic", interrupted)
    with pytest.raises(KeyboardInterrupt), state.lock:
        state._grant()
    monkeypatch.undo()
    assert state.opening == 0  # no slot held for a waiter that was never told
    assert claim.waiter is not None and not claim.waiter.may_connect
    assert state.recheck_waiter(claim.waiter, False, time.monotonic())  # granted on its next look
    assert claim.waiter.may_connect and state.opening == 1


def test_a_waiter_that_queued_during_the_returns_rollback_waited_a_positive_time():
    state = new_state(maxconn=1)
    conn = opened(state, lend=True)
    returned_at = time.monotonic()  # the returner's clock, read before its rollback round trip
    time.sleep(0.02)
    claim = Claim()
    assert state.acquire(claim, time.monotonic(), can_wait=True) is WAIT  # queued meanwhile
    info = state.lent[id(conn)]
    assert state.return_fast(conn, id(conn), info, returned_at) is DONE
    assert claim.waiter is not None and claim.waiter.conn is conn
    assert state.counters["wait_ms_total"] >= 0
    assert info.borrowed_at >= claim.waiter.since  # the next borrow starts after it queued


def test_a_fast_return_to_a_closed_pool_with_waiters_leaves_the_connection_to_tidy():
    state = new_state(maxconn=1)
    conn = opened(state, lend=True)
    claim = Claim()
    assert state.acquire(claim, time.monotonic(), can_wait=True) is WAIT
    state.closed = True  # as close() would, had the waiter not been in line yet
    state.keeps_returns = True
    assert give_back(state, conn) is TIDY
    to_close: list[tuple[object, str]] = []
    state.tidy(time.monotonic(), to_close)  # type: ignore[arg-type]
    assert [c for c, _ in to_close] == [conn]
    assert claim.waiter is not None and claim.waiter.conn is None


def test_a_waiter_queueing_after_a_return_takes_the_idle_connection_itself():
    state = new_state(maxconn=1)
    conn = opened(state)
    claim = Claim()
    assert state.acquire(claim, time.monotonic(), can_wait=True) is None
    assert claim.conn is conn


def test_lend_fast_leaves_the_connection_to_the_slow_path_while_threads_wait():
    state = new_state(maxconn=2)
    conn = opened(state)
    state.waiters.append(object())  # type: ignore[arg-type]
    assert state.lend_fast(time.monotonic()) is None
    assert [c for c, _ in state.idle] == [conn]


def test_a_slow_step_dropping_an_idle_connection_a_fast_lender_took_leaves_it_alone():
    state = new_state()
    conn = opened(state)
    item = state.idle[0]
    assert state.lend_fast(time.monotonic()) is item  # taken between the slow step's look and its act
    to_close: list[Any] = []
    state._drop(conn, item[1], "idle_timeout reached", to_close, item)
    assert to_close == [] and state.lent[id(conn)].state is LENT and not state.closing


def test_the_socket_is_probed_at_most_once_per_interval_and_a_signalled_one_is_not_lent():
    state = new_state()
    conn = opened(state)
    conn.server.send(b"x")  # the server says something
    time.sleep(PROBE_INTERVAL * 2)
    assert state.lend_fast(time.monotonic()) is None  # probe due: signalled, left for the slow path
    assert [c for c, _ in state.idle] == [conn]
    state.idle[0][1].probed_at = time.monotonic()
    assert state.lend_fast(time.monotonic()) is not None  # probed an instant ago: lent without looking


def test_a_fast_return_asks_for_a_tidy_when_an_idle_connection_outlived_idle_timeout():
    state = new_state(idle_timeout=10)
    stale, conn = opened(state), opened(state, lend=True)
    ReturnTimes(state)[stale] -= 60  # as psycopg2_pool's own tests age a connection
    assert give_back(state, conn) is TIDY
    to_close: list[Any] = []
    state.tidy(time.monotonic(), to_close)
    assert [c for c, _ in to_close] == [stale] and [c for c, _ in state.idle] == [conn]
    for dropped, _ in to_close:
        state.closed_one(dropped)
    assert state.counts()["connections_closed"] == 1


def test_idle_timeout_never_evicts_below_minconn():
    state = new_state(minconn=1, idle_timeout=10)
    conn = opened(state, lend=True)
    assert give_back(state, conn) is DONE
    state.idle[0][1].returned_at -= 60
    to_close: list[Any] = []
    state.housekeeping_drops(time.monotonic(), False, to_close)
    assert to_close == [] and len(state.idle) == 1


def test_slots_are_counted_until_maxconn_and_exhaustion_names_the_pool_and_numbers():
    state = new_state(maxconn=2)
    held = [opened(state, lend=True), opened(state, lend=True)]
    message = state.acquire(Claim(), time.monotonic(), can_wait=False)
    assert message is not None and "'state-test'" in message and "maxconn=2" in message and "2 lent" in message
    assert len(held) == 2


def test_a_lent_connection_garbage_collected_frees_its_slot_and_is_reported_once():
    state = new_state(maxconn=1)
    conn = opened(state, lend=True)
    del conn
    gc.collect()
    assert state.counts()["in_use"] == 0 and state.counts()["leaked"] == 1
    assert len(state.take_leaks()) == 1 and state.take_leaks() == []
    assert state.acquire(Claim(), time.monotonic(), can_wait=False) is None  # the slot is free again


def test_a_fast_return_to_a_closed_pool_is_not_kept_idle():
    state = new_state()
    conn = opened(state, lend=True)
    state.close([])
    assert state.return_fast(conn, id(conn), state.lent[id(conn)], time.monotonic()) is None  # the slow path drops it
    to_close: list[Any] = []
    info = state.begin_return(conn, time.monotonic())
    state.finish_return(conn, info, None, time.monotonic(), to_close)
    assert [c for c, _ in to_close] == [conn] and not state.idle
    with pytest.raises(PoolClosed):
        state.acquire(Claim(), time.monotonic(), can_wait=False)


def test_threads_lending_and_returning_without_the_lock_lose_nothing_and_lend_nothing_twice():
    """Eight threads borrow four connections as the pool does (fast step, else the slow one), with
    thread switches forced as often as CPython allows; every connection ends idle, none was held by
    two threads at once."""
    state = new_state(maxconn=4)
    conns = [opened(state) for _ in range(4)]
    holders: dict[int, int] = {}
    errors: list[str] = []
    rounds = 3000

    def borrow_once(me: int) -> None:
        item = state.lend_fast(time.monotonic())
        if item is None:
            claim = Claim()
            outcome = state.acquire(claim, time.monotonic(), can_wait=True)
            if outcome is WAIT:
                assert claim.waiter is not None
                while not claim.waiter.signal.acquire(timeout=0.05):
                    if state.recheck_waiter(claim.waiter, False, time.monotonic()):
                        break
                state.collect(claim)
            assert claim.conn is not None and claim.info is not None, outcome
            conn = claim.conn
        else:
            conn = item[0]
        if holders.setdefault(id(conn), me) != me:
            errors.append(f"thread {me} got a connection held by thread {holders[id(conn)]}")
        del holders[id(conn)]
        info = state.lent[id(conn)]
        done = state.return_fast(conn, id(conn), info, time.monotonic())
        if done is None:
            state.finish_return(conn, state.begin_return(conn, time.monotonic()), None, time.monotonic(), [])
        elif done is TIDY:
            state.tidy(time.monotonic(), [])

    def worker(me: int) -> None:
        try:
            for _ in range(rounds):
                borrow_once(me)
        except BaseException as exc:  # reported below, with the thread's number
            errors.append(f"thread {me}: {exc!r}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert sorted(id(c) for c, _ in state.idle) == sorted(id(c) for c in conns)
    assert all(info.state is IDLE for _, info in state.idle) and not state.lent and not state.waiters
    assert state.counts()["checkouts"] == 8 * rounds


def test_a_connection_a_fast_lender_puts_back_after_close_is_dropped_by_the_next_slow_step():
    """close() empties the idle list while a fast lender holds a popped entry; the lender's probe
    finds the socket signalled and puts the entry back: the slow step that follows must drop it."""
    state = new_state()
    conn = opened(state)
    info = state.idle[0][1]

    class ClosingProbe:
        def poll(self, timeout: int) -> list[tuple[int, int]]:
            state.close([])  # another thread closes the pool meanwhile
            return [(conn.fileno(), 1)]  # ... and the server said something

    info.probe = ClosingProbe()  # type: ignore[assignment]
    info.probed_at -= 1
    assert state.lend_fast(time.monotonic()) is None and len(state.idle) == 1
    claim = Claim()
    with pytest.raises(PoolClosed):
        state.acquire(claim, time.monotonic(), can_wait=True)
    assert [c for c, _ in claim.to_close] == [conn] and not state.idle
