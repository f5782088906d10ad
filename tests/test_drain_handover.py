"""A connection handed to a waiter is checked again before the waiter gets it.

`PoolState.acquire` checks idle connections under the lock, but one can reach the idle list
without such a check: a fast lender pops it, a drain() bumps the generation meanwhile (the popped
connection is not in the idle list for it to close) or its max_lifetime ends, and a borrower
queues; the fast lender finds it needs a closer look, puts it back and takes the slow path, which
queues behind the borrower and hands the idle connection to it. That borrower must not get a
connection opened before drain(), nor one past its lifetime.
"""

from __future__ import annotations

import threading

import pytest

from pgpool import ThreadSafeConnectionPool

from .helpers import wait_until

pytestmark = pytest.mark.needs_session


class Probe:
    """A stand-in for a connection's socket probe: the first poll runs `hook` and says the server
    sent something (so the fast lender puts the connection back); later polls say nothing came."""

    def __init__(self, hook) -> None:
        self.hook = hook

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        hook, self.hook = self.hook, None
        if hook is None:
            return []
        hook()
        return [(0, 1)]


def _drain(pool, info) -> None:
    pool.drain()


def _expire(pool, info) -> None:
    info.expires = 0.0  # max_lifetime reached while the fast lender held it


@pytest.mark.parametrize("spoil", [_drain, _expire], ids=["drain", "max_lifetime"])
def test_a_borrower_queued_behind_a_spoiled_connection_never_gets_it(dsn, spoil):
    with ThreadSafeConnectionPool(0, 1, dsn=dsn, timeout=10) as pool:
        pool.putconn(pool.getconn())  # the housekeeper runs: getconn may take the fast path
        (conn,) = pool.idle_connections
        before = conn.info.backend_pid
        got: list = []

        def borrow() -> None:
            other = pool.getconn()
            got.append((other, other.info.backend_pid, pool._state.conns[id(other)].generation))
            pool.putconn(other)

        borrower = threading.Thread(target=borrow)

        info = pool._state.conns[id(conn)]

        def spoil_then_queue() -> None:
            # While the fast lender holds the popped connection: drain() (or its lifetime ends),
            # then a borrower queues.
            spoil(pool, info)
            borrower.start()
            assert wait_until(lambda: pool.stats()["waiting"] == 1, timeout=5)

        info.probe = Probe(spoil_then_queue)
        info.probed_at = 0.0  # the probe is due
        mine = pool.getconn()  # the fast lender's pop, the hook, then the slow path behind the borrower
        borrower.join(10)
        assert not borrower.is_alive() and got
        (other, pid, generation) = got[0]
        assert pid != before and other is not conn, "lent a connection that was due to close"
        assert generation == pool._state.generation
        assert pool.stats()["broken_discarded"] == 0
        pool.putconn(mine)


def test_a_getconn_interrupted_before_the_caller_got_its_connection_counts_no_checkout(dsn):
    """A connection taken for a getconn that then fails or is interrupted (here in the check hook)
    never reached the caller: `checkouts` counts borrowers served, not connections taken."""
    raised: list[int] = []

    def check(conn) -> None:
        if len(raised) == 1:
            raised.append(2)
            raise KeyboardInterrupt
        raised.append(1)

    with ThreadSafeConnectionPool(0, 1, dsn=dsn, check=check) as pool:
        pool.putconn(pool.getconn())
        before = pool.stats()
        with pytest.raises(KeyboardInterrupt):
            pool.getconn()
        after = pool.stats()
        assert after["checkouts"] == before["checkouts"], (before, after)
        assert after["in_use"] == 0 and after["opening"] == 0
        pool.putconn(pool.getconn())
        assert pool.stats()["checkouts"] == before["checkouts"] + 1
