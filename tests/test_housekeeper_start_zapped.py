"""An asynchronous exception aimed at a borrower that is starting the housekeeper can land in the new
thread before it signals that it started (CPython gives a starting thread's state its parent's ident
until it runs), so a Thread.start() called by the borrower waits forever, holding
Housekeeper._start_lock: that borrower hangs, and every later getconn blocks on that lock, for good.
No borrower may wait for a start in progress, nor for a start that never comes."""

from __future__ import annotations

import ctypes
import random
import threading
import time

import pytest

import pgpool

set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


class Zap(BaseException):
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_borrowers_never_block_behind_a_housekeeper_start_that_an_async_exception_hit(dsn: str) -> None:
    stuck_pools = 0
    for _ in range(25):
        pool = pgpool.ThreadSafeConnectionPool(0, 4, dsn=dsn, timeout=2)
        stop = time.monotonic() + 0.3
        done = []

        def borrow(pool=pool, stop=stop, done=done) -> None:
            while time.monotonic() < stop:
                try:
                    try:
                        with pool.connection() as conn:
                            conn.cursor().execute("SELECT 1")
                    except (Zap, Exception):
                        pass
                except (Zap, Exception):
                    pass
            for _ in range(3):
                try:
                    time.sleep(0.01)
                except Zap:
                    pass
            done.append(1)

        threads = [threading.Thread(target=borrow, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        while time.monotonic() < stop - 0.05:
            t = random.choice(threads)
            if t.is_alive():
                set_async_exc(t.ident, Zap)
            time.sleep(random.random() * 0.0005)
        for t in threads:
            t.join(5)
        if any(t.is_alive() for t in threads):
            stuck_pools += 1
        pool.close()
    assert stuck_pools == 0, f"{stuck_pools} pools with a borrower blocked in or behind a housekeeper start"


def test_a_housekeeper_thread_killed_before_it_reports_started_hangs_no_borrower(dsn: str, monkeypatch) -> None:
    """What the misdirected exception does, made certain: the first housekeeper thread dies before
    it reports that it runs, so whoever called its Thread.start() waits for good. That must not be a
    borrower: getconn returns, and a later getconn gets the pool its housekeeper."""
    real_bootstrap = threading.Thread._bootstrap  # type: ignore[attr-defined]
    killed: list[threading.Thread] = []

    def dies_first(self: threading.Thread) -> None:
        if "housekeeper" in self.name and not killed:
            killed.append(self)
            return  # ends without setting Thread._started, as an exception landing there would
        real_bootstrap(self)

    monkeypatch.setattr(threading.Thread, "_bootstrap", dies_first)
    pool = pgpool.ThreadSafeConnectionPool(0, 2, dsn=dsn, timeout=2)
    try:
        got: list[object] = []
        borrower = threading.Thread(target=lambda: got.append(pool.getconn()), daemon=True)
        borrower.start()
        borrower.join(10)
        assert not borrower.is_alive(), "getconn hung in the housekeeper's Thread.start()"
        assert killed and got
        pool.putconn(got[0])  # type: ignore[arg-type]
        pool.putconn(pool.getconn())  # launches the housekeeper again
        assert pool._housekeeper.started
        assert [t for t in threading.enumerate() if t.name == f"{pool.name}-housekeeper"]
    finally:
        pool.close()
        for thread in killed:  # undo the simulated death: the launcher waiting for it ends
            threading._limbo.pop(thread, None)  # type: ignore[attr-defined]
            thread._started.set()  # type: ignore[attr-defined]


@pytest.mark.timing
def test_a_launcher_killed_before_it_runs_is_replaced_at_once(dsn: str, monkeypatch) -> None:
    """The misdirected exception kills the launcher at its first instruction (before any ``try``):
    the borrower launches again after a short slice instead of waiting out the whole start wait."""
    import _thread

    real = _thread.start_new_thread
    swallowed: list[object] = []

    def first_launch_dies(function, args, *rest):
        if not swallowed:
            swallowed.append(function)
            return 0  # as if the launcher had died before its first line
        return real(function, args, *rest)

    monkeypatch.setattr(_thread, "start_new_thread", first_launch_dies)
    with pgpool.ThreadSafeConnectionPool(0, 2, dsn=dsn) as pool:
        started = time.monotonic()
        pool.putconn(pool.getconn())
        took = time.monotonic() - started
        assert swallowed and pool._housekeeper.started
        assert took < 0.9, f"getconn waited {took:.2f} s for a launcher that had died"
        assert len([t for t in threading.enumerate() if t.name == f"{pool.name}-housekeeper"]) == 1


def test_an_exception_landing_in_the_claim_still_leaves_one_housekeeper_running(dsn: str, monkeypatch) -> None:
    """An exception raised into the new housekeeper while it claims must not leave a claim without
    a thread to run the rounds (every later getconn would wait for a start that never comes)."""
    from pgpool import housekeeping

    real = housekeeping.Housekeeper._claimed
    raised: list[int] = []

    def claim_then_zap(self):
        result = real(self)
        if not raised:
            raised.append(1)
            raise Zap  # after the claim is made: as an asynchronous exception landing there would
        return result

    monkeypatch.setattr(housekeeping.Housekeeper, "_claimed", claim_then_zap)
    with pgpool.ThreadSafeConnectionPool(2, 4, dsn=dsn) as pool:
        pool.putconn(pool.getconn())
        assert raised and pool._housekeeper.started
        thread = pool._housekeeper._thread
        assert thread is not None and thread.is_alive()
        pool.clear()  # the housekeeper refills minconn in the background
        deadline = time.monotonic() + 10
        while len(pool.idle_connections) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(pool.idle_connections) == 2
