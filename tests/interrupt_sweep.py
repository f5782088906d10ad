"""The interrupt sweep: a KeyboardInterrupt at the 1st, 2nd, 3rd ... point inside pgpool where CPython
can deliver one.

`sweep(op, ...)` runs `op` again and again on a fresh pool, raising KeyboardInterrupt at the n-th such
point (a counter, not function names), until a run completes without being interrupted. The points
are what CPython checks for signals and asynchronous exceptions: the entry of every Python function
of the pgpool package (a ``call`` event) and, in the ``c_calls`` mode, the return of every C function
that pgpool's code calls (a ``c_return`` event of ``sys.setprofile``: the C call has had its effect,
and the exception lands before the caller sees its result). After every run it checks what the
pool promises: it can still lend `maxconn` connections at once, to distinct backends, each idle (no
open transaction); the server never shows more than `maxconn` of its sessions; what `op` committed is
all or nothing; and `close()` leaves zero sessions.

Connections are opened through a factory that keeps a strong reference to each, so a connection the
pool lost is never rescued by the garbage collector (which would free its slot): the sweep sees the
pool's own cleanup, not the collector's.

The one point allowed to lose something is the entry of a pgpool function called directly by the
application (`getconn`, `putconn`, the ``__exit__`` that the application's own ``with`` calls), and the
C calls its first lines make before calling further into pgpool (they only read): its body has not
changed anything, so there is nothing pgpool could do. The sweep then does what the application would
do (calls it again) and checks the rest as usual. The one point where the pool relies on the garbage
collector is right after the lock-free ``deque.pop`` of an idle connection: the sweep then lets the
collector free that connection, and checks that its slot came back.
"""

from __future__ import annotations

import contextvars
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg2
import psycopg2.extensions

import pgpool

PGPOOL_DIR = os.path.dirname(pgpool.__file__) + os.sep
MAX_CALLS = 2000  # a bound, so that a sweep cannot run forever


class KeptConnection(psycopg2.extensions.connection):
    """A connection that a module-level list keeps alive: the collector never frees a lost one."""

    kept: ClassVar[list[KeptConnection]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        KeptConnection.kept.append(self)


class Interrupter:
    """A trace (or profile) function raising KeyboardInterrupt at the n-th interruptible point inside
    pgpool: the entry of a pgpool function, and with `c_calls` the return of a C call pgpool made."""

    def __init__(self, n: int, c_calls: bool = False) -> None:
        self.n = n
        self.c_calls = c_calls
        self.calls = 0
        self.fired_at: str | None = None  # the function it interrupted
        self.at_app_entry = False  # the interrupted call was made by the application itself
        self.after_pop = False  # it landed right after a lock-free deque.pop (see sweep)
        self._prologue = False  # in an application-called pgpool function, before any call further in

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PGPOOL_DIR):
            self.calls += 1
            caller = frame.f_back
            from_app = caller is None or not caller.f_code.co_filename.startswith(PGPOOL_DIR)
            self._prologue = from_app
            if self.calls == self.n:
                self.fired_at = frame.f_code.co_qualname
                self.at_app_entry = from_app
                raise KeyboardInterrupt(f"sweep: interrupt at call {self.n} ({self.fired_at})")
        elif event == "c_return" and self.c_calls and frame.f_code.co_filename.startswith(PGPOOL_DIR):
            self.calls += 1
            if self.calls == self.n:
                name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", repr(arg))
                self.fired_at = f"{frame.f_code.co_qualname} line {frame.f_lineno}, after {name}()"
                # A C call the application's call made before calling further into pgpool only read
                # (the prologues do): as good as an interrupt at the entry.
                caller = frame.f_back
                self.at_app_entry = self._prologue and (
                    caller is None or not caller.f_code.co_filename.startswith(PGPOOL_DIR)
                )
                self.after_pop = name == "deque.pop" and frame.f_code.co_name == "lend_fast"
                raise KeyboardInterrupt(f"sweep: interrupt at point {self.n} ({self.fired_at})")
        return None


@dataclass
class Run:
    """What one run of an operation left for the checks: connections the application still holds,
    borrows it must still end, and the rows it meant to commit (all or nothing)."""

    pool: Any
    held: list[Any] = field(default_factory=list)  # connections lent to the application
    given_back: list[Any] = field(default_factory=list)  # connections the application returned
    open_blocks: list[Any] = field(default_factory=list)  # context managers entered, not yet exited
    rows_tag: int | None = None  # the run's tag in sweep_items, when the operation commits rows
    rows_all: int = 0  # how many rows a complete commit leaves


def interrupted(op: Callable[[Run], None], run: Run, n: int, c_calls: bool = False) -> Interrupter:
    """Run `op` in a context of its own with the interrupter armed; swallow the interrupt."""
    tracer = Interrupter(n, c_calls)
    ctx = contextvars.copy_context()
    arm = sys.setprofile if c_calls else sys.settrace
    arm(tracer)
    try:
        ctx.run(op, run)
    except KeyboardInterrupt:
        if tracer.fired_at is None:
            raise
    finally:
        arm(None)
    return tracer


def sweep(
    make_pool: Callable[[], Any],
    setup: Callable[[Run], None],
    op: Callable[[Run], None],
    check: Callable[[Run, Interrupter], None],
    c_calls: bool = False,
) -> int:
    """Interrupt `op` at every interruptible point in turn; return how many a complete run has.

    Every point is tried, each on a fresh pool; the failures of all of them are reported together."""
    failures: list[str] = []
    for n in range(1, MAX_CALLS):
        pool = make_pool()
        run = Run(pool)
        try:
            setup(run)
            tracer = interrupted(op, run, n, c_calls)
            if tracer.at_app_entry:
                # Nothing ran: do what the application does after an interrupted call.
                for block in reversed(run.open_blocks):
                    block.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
                run.open_blocks.clear()
                for conn in run.given_back:
                    if pool._state.info_of(conn) is not None and pool._state.info_of(conn).state == "lent":
                        pool.putconn(conn)
            if tracer.after_pop:
                # The one point where the pool relies on the garbage collector: right after the
                # lock-free pop of an idle connection, before the lender has it. Nothing references
                # the connection then, so the collector closes it and its slot comes back.
                held = {id(conn) for conn in run.held}
                KeptConnection.kept[:] = [conn for conn in KeptConnection.kept if id(conn) in held]
                gc.collect()
            try:
                check(run, tracer)
            except AssertionError as exc:
                failures.append(str(exc).splitlines()[0])
        finally:
            try:
                pool.close()
            except Exception as exc:
                failures.append(f"close() failed after point {n} ({tracer.fired_at}): {exc!r}")
            for conn in run.held:
                if not conn.closed:
                    conn.close()
            for conn in KeptConnection.kept:  # what this run lost: never counted against the next run
                if not conn.closed:
                    conn.close()
            KeptConnection.kept.clear()
        if tracer.fired_at is None:
            if failures:
                shown = "\n  ".join(failures[:40])
                raise AssertionError(f"{len(failures)} of {tracer.calls} interrupt points fail:\n  {shown}")
            return tracer.calls
    raise AssertionError(f"the operation makes more than {MAX_CALLS} calls into pgpool")
