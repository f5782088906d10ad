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

import _thread
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol


class Housekept(Protocol):
    """What the housekeeper needs of its pool: a name, and a round to run."""

    name: str

    def _housekeep(self) -> float | None: ...


logger = logging.getLogger("pgpool")

_JOIN_TIMEOUT = 5.0
_START_WAIT = 1.0  # how long start() waits for the new thread to run (it takes microseconds)


class Housekeeper:
    """Runs ``pool._housekeep()`` periodically in a daemon thread, and at once when woken."""

    def __init__(self, pool: Housekept) -> None:
        self._pool = weakref.ref(pool)
        self._name = pool.name
        self.wakeups: queue.SimpleQueue[Any] = queue.SimpleQueue()  # anything put here: a round now
        self._stopped: list[bool] = []  # non-empty once stopped (a list: one C call sets it)
        self._thread: threading.Thread | None = None  # the running housekeeper, set by itself
        self._start_lock = threading.Lock()
        self._claim = threading.Lock()  # taken, never released, by the thread that runs the rounds
        self._ready: queue.SimpleQueue[None] = queue.SimpleQueue()  # told once that one has claimed
        self.started = False  # read without a lock on the getconn path: start() is idempotent

    def start(self) -> None:
        """Start the thread, unless it runs or the pool is closing; `started` is set once it runs.

        The thread is started from a short-lived launcher thread, and this waits for it at most
        `_START_WAIT` seconds: ``Thread.start()`` waits for the new thread with no timeout, and an
        asynchronous exception aimed at the starting thread can land in the new one before it reports
        that it runs (CPython gives a thread its parent's ident until it runs), which would leave the
        borrower waiting in ``Thread.start()`` for good. A launcher nobody aims at bears that instead,
        and a start that did not come is launched again by the next call (the claim in `_claimed`
        keeps it to one housekeeper). Other callers never wait for a start in progress.
        """
        if not self._start_lock.acquire(blocking=False):
            return
        try:
            if self.started or self._stopped:
                return
            if self._thread is None:
                _thread.start_new_thread(self._launch, ())
                try:
                    self._ready.get(timeout=_START_WAIT)
                except queue.Empty:
                    pass  # not running yet: the next call looks again, and launches again
            self.started = self._thread is not None
        finally:
            self._start_lock.release()

    def _launch(self) -> None:
        """Runs in the launcher thread: start the housekeeper, and wait there for it to run."""
        try:
            threading.Thread(
                target=_run,
                args=(self._pool, self._stopped, self.wakeups, self._claimed),
                name=f"{self._name}-housekeeper",
                daemon=True,
            ).start()
        except BaseException:  # nothing to report to: a later start() launches again
            pass

    def _claimed(self) -> bool:
        """Called first in a new housekeeper thread: true for the one that is to run the rounds."""
        if not self._claim.acquire(blocking=False):
            return False  # a launch that came late, after another one: this thread ends at once
        self._thread = threading.current_thread()
        self._ready.put(None)
        return True

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
            except RuntimeError:  # pragma: no cover - _thread is set by the thread itself, once it runs
                pass


def _run(
    pool_ref: weakref.ref[Housekept],
    stopped: list[bool],
    wakeups: queue.SimpleQueue[Any],
    claimed: Callable[[], bool],
) -> None:
    if not claimed():
        return
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
