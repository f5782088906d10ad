"""Fork safety: after os.fork(), every pool in the child starts from zero connections.

The child must neither use nor close the parent's connections in a way that reaches the parent's
sessions, and must never wait on a lock that a parent thread held at fork time: see `disown`.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

import psycopg2.extensions


class ForkAware(Protocol):
    """What fork safety needs of a pool: to start afresh in the child."""

    def _after_fork_in_child(self) -> None: ...


_pools: weakref.WeakSet[ForkAware] = weakref.WeakSet()

# Connections inherited through fork, kept alive for the life of the child: closing one, or letting
# it be garbage collected (which closes it), takes psycopg2's connection mutex, which a parent thread
# running a query held at fork time and which nobody in the child will ever release.
_orphans: list[psycopg2.extensions.connection] = []
orphan_ids: set[int] = set()  # their ids: unique, since the objects stay alive

# How many forks this process descends from: a borrow made before a fork is never joined after it.
generation = 0


def track(pool: ForkAware) -> None:
    """Reset `pool` in every child process forked from now on."""
    _pools.add(pool)


def disown(conn: psycopg2.extensions.connection) -> None:
    """Make a connection inherited through fork unusable in this process, leaving the parent's alone.

    The descriptor is pointed at /dev/null (``dup2`` takes no psycopg2 lock), so nothing the child
    does with the connection reaches the parent's session; the connection object itself is kept
    alive and never closed (see `_orphans`).
    """
    _orphans.append(conn)
    orphan_ids.add(id(conn))
    try:
        fd = conn.fileno()
    except Exception:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _reset_pools_after_fork() -> None:
    global generation
    generation += 1
    for pool in list(_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_pools_after_fork)
