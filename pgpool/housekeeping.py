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
_LAUNCH_SLICE = 0.05  # a launch that shows no housekeeper this long after is tried again


class Housekeeper:
    """Runs ``pool._housekeep()`` periodically in a daemon thread, and at once when woken."""

    def __init__(self, pool: Housekept) -> None:
        self._pool = weakref.ref(pool)
        self._name = pool.name
        self.wakeups: queue.SimpleQueue[Any] = queue.SimpleQueue()  # anything put here: a round now
        self._stopped: list[bool] = []  # non-empty once stopped (a list: one C call sets it)
        # Every housekeeper thread that ran appends itself (one C call: claimed and visible at once);
        # the first one runs the rounds, later ones (launches that came late) end at once.
        self._claims: list[threading.Thread] = []
        self._ready: queue.SimpleQueue[None] = queue.SimpleQueue()  # told when the first one claimed
        self._start_lock = threading.Lock()
        self.started = False  # read without a lock on the getconn path: start() is idempotent

    @property
    def _thread(self) -> threading.Thread | None:
        """The thread that runs the rounds, once it runs."""
        claims = self._claims
        return claims[0] if claims else None

    def start(self) -> None:
        """Start the thread, unless it runs or the pool is closing; `started` is set once it runs.

        The housekeeper is started from a short-lived launcher thread, and this waits for it at most
        `_START_WAIT` seconds. ``Thread.start()`` waits for the new thread with no timeout, and an
        asynchronous exception aimed at the caller can land in the new thread instead, before it
        reports that it runs (CPython 3.11 gives a thread its parent's ident until it runs): a
        borrower calling ``Thread.start()`` itself would then wait for good. The launcher is the
        thread such an exception kills, and the caller launches again after `_LAUNCH_SLICE`; the
        exception never reaches the caller, but nothing hangs. Other callers never wait for a start
        in progress; one that finds none running after `_START_WAIT` leaves `started` false, and
        the next slow ``getconn`` looks again.
        """
        if not self._start_lock.acquire(blocking=False):
            return
        try:
            if self.started or self._stopped:
                return
            for _ in range(round(_START_WAIT / _LAUNCH_SLICE)):
                if self._claims:
                    break
                _thread.start_new_thread(self._launch, ())
                try:
                    self._ready.get(timeout=_LAUNCH_SLICE)
                except queue.Empty:
                    pass  # not running yet (or its launcher was killed): launch again
            self.started = bool(self._claims)
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
        except BaseException:  # nothing to report to: start() launches again
            pass

    def _claimed(self) -> bool:
        """Called first in a new housekeeper thread: true for the one that is to run the rounds.
        Idempotent: called again when an exception landed in it."""
        me = threading.current_thread()
        claims = self._claims
        if me not in claims:
            claims.append(me)
        if claims[0] is not me:
            claims.remove(me)  # a launch that came late, after another one: this thread ends at once
            return False
        self._ready.put(None)
        return True

    def kick(self) -> None:
        """Ask for a round of housekeeping now (e.g. to refill minconn after clear())."""
        self.wakeups.put(None)

    def stop(self) -> None:
        """Stop the thread and wait for it (at most `_JOIN_TIMEOUT`). One launched but not yet
        running is not waited for: it ends at its first look, without a round."""
        self._stopped.append(True)
        self.wakeups.put(None)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)  # a claimed thread has started: join cannot refuse it


def _run(
    pool_ref: weakref.ref[Housekept],
    stopped: list[bool],
    wakeups: queue.SimpleQueue[Any],
    claimed: Callable[[], bool],
) -> None:
    while True:
        try:
            if not claimed():
                return
            break
        except BaseException:  # an exception raised into this thread as it claimed: claim again
            pass
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
