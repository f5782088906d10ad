"""An asynchronous exception aimed at a borrower that is starting the housekeeper can land in the new
thread before it signals that it started (CPython gives a starting thread's state its parent's ident
until it runs), so Thread.start() waits forever, holding Housekeeper._start_lock: every later getconn
then blocks on that lock, for good. Other borrowers must not wait for a start in progress."""

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
        alive = sum(t.is_alive() for t in threads)
        if alive > 1:  # one thread may hang in CPython's Thread.start; the others must not
            stuck_pools += 1
        if alive == 0:
            pool.close()
    assert stuck_pools == 0, f"{stuck_pools} pools with several borrowers blocked behind a housekeeper start"
