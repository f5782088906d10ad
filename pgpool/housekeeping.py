"""The housekeeper: a background thread per pool for what must happen even when nobody calls it.

Idle eviction, ``max_lifetime``, the ``minconn`` refill, leak reports and the end of borrows held by
decorated generators dropped unfinished happen here, not only when ``putconn`` is called (the
reference pool's documented weakness). The thread is a daemon, starts at the first ``getconn``,
holds the pool only weakly (a forgotten pool can still be garbage collected) and stops on ``close()``.

It sleeps on a ``queue.SimpleQueue``, not a ``threading.Event``: putting into it is one C call that
is safe from a weakref callback or a signal handler, and that no interrupt can split (an Event's
``set`` takes a Python-level condition whose lock a signal landing inside ``__enter__`` leaves held
for good, hanging every later ``set`` and ``wait``).
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from typing import Any, Protocol


class Housekept(Protocol):
    """What the housekeeper needs of its pool: a name, and a round to run."""

    name: str

    def _housekeep(self) -> float | None: ...


logger = logging.getLogger("pgpool")

_JOIN_TIMEOUT = 5.0


class Housekeeper:
    """Runs ``pool._housekeep()`` periodically in a daemon thread, and at once when woken."""

    def __init__(self, pool: Housekept) -> None:
        self._pool = weakref.ref(pool)
        self._name = pool.name
        self.wakeups: queue.SimpleQueue[Any] = queue.SimpleQueue()  # anything put here: a round now
        self._stopped: list[bool] = []  # non-empty once stopped (a list: one C call sets it)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.started = False  # read without a lock on the getconn path: start() is idempotent

    def start(self) -> None:
        """Start the thread, unless it runs or the pool is closing; `started` is set only once it runs.

        An interrupt during ``Thread.start`` leaves `started` false: the next call starts one anew
        (a thread that did start meanwhile stops by itself with the pool).
        """
        # Never wait for a start in progress: Thread.start() waits for the new thread, forever if an
        # asynchronous exception killed it first, and every borrower would then wait here too.
        if not self._start_lock.acquire(blocking=False):
            return
        try:
            if self.started or self._stopped:
                return
            thread = threading.Thread(
                target=_run,
                args=(self._pool, self._stopped, self.wakeups),
                name=f"{self._name}-housekeeper",
                daemon=True,
            )
            self._thread = thread
            thread.start()
            self.started = True
        finally:
            self._start_lock.release()

    def kick(self) -> None:
        """Ask for a round of housekeeping now (e.g. to refill minconn after clear())."""
        self.wakeups.put(None)

    def stop(self) -> None:
        self._stopped.append(True)
        self.wakeups.put(None)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            try:
                thread.join(_JOIN_TIMEOUT)
            except RuntimeError:
                pass  # never started (its start was interrupted): nothing to wait for


def _run(pool_ref: weakref.ref[Housekept], stopped: list[bool], wakeups: queue.SimpleQueue[Any]) -> None:
    delay = 0.0
    while True:
        try:
            try:
                wakeups.get(timeout=delay)
            except queue.Empty:
                pass
            while not wakeups.empty():  # several wake-ups queued: one round serves them all
                wakeups.get_nowait()
            if stopped:
                return
            pool = pool_ref()
            if pool is None:
                return
            try:
                next_delay = pool._housekeep()
            finally:
                del pool  # do not keep the pool alive while sleeping
        except BaseException:
            # An error, or an exception raised into this thread (PyThreadState_SetAsyncExc): the
            # housekeeper must outlive it, or minconn refills and leak reports would stop for good.
            logger.exception("housekeeping failed; next round in 1 s")
            next_delay = 1.0
        if next_delay is None:
            return
        delay = next_delay
