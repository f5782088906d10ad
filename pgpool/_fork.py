"""Fork safety: after os.fork(), every pool in the child starts from zero connections.

The child must neither use nor close the parent's connections in a way that reaches the parent's
sessions: see `disown`.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

import psycopg2.extensions

if TYPE_CHECKING:
    from .pool import ConnectionPool

_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def track(pool: ConnectionPool) -> None:
    """Reset `pool` in every child process forked from now on."""
    _pools.add(pool)


def disown(conn: psycopg2.extensions.connection) -> None:
    """Make a connection inherited through fork unusable in this process, leaving the parent's alone.

    Closing it normally (or letting it be garbage collected) would send a Terminate message on the
    socket shared with the parent and end the parent's session. Pointing the descriptor at /dev/null
    first makes that message go nowhere; the child's borrowers then get an error, not the parent's data.
    """
    try:
        fd = conn.fileno()
    except Exception:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    try:
        conn.close()
    except Exception:
        pass


def _reset_pools_after_fork() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_pools_after_fork)
