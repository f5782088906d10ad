"""The interrupt sweep: a KeyboardInterrupt at the 1st, 2nd, 3rd ... Python call inside pgpool.

`sweep(op, ...)` runs `op` again and again on a fresh pool, raising KeyboardInterrupt from a
``sys.settrace`` hook at the n-th ``call`` event whose code lives in the pgpool package (a counter, not
function names), until a run completes without being interrupted. After every run it checks what the
pool promises: it can still lend `maxconn` connections at once, to distinct backends, each idle (no
open transaction); the server never shows more than `maxconn` of its sessions; what `op` committed is
all or nothing; and `close()` leaves zero sessions.

Connections are opened through a factory that keeps a strong reference to each, so a connection the
pool lost is never rescued by the garbage collector (which would free its slot): the sweep sees the
pool's own cleanup, not the collector's.

The one point allowed to lose something is the entry of a pgpool function called directly by the
application (`getconn`, `putconn`, the ``__exit__`` that the application's own ``with`` calls): its body
has not run, so there is nothing pgpool could do. The sweep then does what the application would do
(calls it again) and checks the rest as usual.
"""

from __future__ import annotations

import contextvars
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
    """A trace function raising KeyboardInterrupt at the n-th call event inside pgpool."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0
        self.fired_at: str | None = None  # the function it interrupted
        self.at_app_entry = False  # the interrupted call was made by the application itself

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PGPOOL_DIR):
            self.calls += 1
            if self.calls == self.n:
                caller = frame.f_back
                self.fired_at = frame.f_code.co_qualname
                self.at_app_entry = caller is None or not caller.f_code.co_filename.startswith(PGPOOL_DIR)
                raise KeyboardInterrupt(f"sweep: interrupt at call {self.n} ({self.fired_at})")
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


def interrupted(op: Callable[[Run], None], run: Run, n: int) -> Interrupter:
    """Run `op` in a context of its own with the interrupter armed; swallow the interrupt."""
    tracer = Interrupter(n)
    ctx = contextvars.copy_context()
    sys.settrace(tracer)
    try:
        ctx.run(op, run)
    except KeyboardInterrupt:
        if tracer.fired_at is None:
            raise
    finally:
        sys.settrace(None)
    return tracer


def sweep(
    make_pool: Callable[[], Any],
    setup: Callable[[Run], None],
    op: Callable[[Run], None],
    check: Callable[[Run, Interrupter], None],
) -> int:
    """Interrupt `op` at every pgpool call in turn; return how many calls a complete run makes."""
    for n in range(1, MAX_CALLS):
        pool = make_pool()
        run = Run(pool)
        try:
            setup(run)
            tracer = interrupted(op, run, n)
            if tracer.at_app_entry:
                # Nothing ran: do what the application does after an interrupted call.
                for block in reversed(run.open_blocks):
                    block.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
                run.open_blocks.clear()
                for conn in run.given_back:
                    if pool._state.info_of(conn) is not None and pool._state.info_of(conn).state == "lent":
                        pool.putconn(conn)
            check(run, tracer)
        finally:
            pool.close()
            for conn in run.held:
                if not conn.closed:
                    conn.close()
        if tracer.fired_at is None:
            return tracer.calls
    raise AssertionError(f"the operation makes more than {MAX_CALLS} calls into pgpool")
