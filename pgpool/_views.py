"""psycopg2_pool's inspection attributes, as views over the pool's state.

``return_times`` was a dict in psycopg2_pool, and code (its own tests among it) reads it and even
backdates an entry to age a connection. Here the return time lives with each connection's info, so
that the idle list holds the only strong references to idle connections; this mapping reads and
writes it there.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

import psycopg2.extensions

from ._records import IDLE, ConnInfo

if TYPE_CHECKING:
    from ._state import PoolState

Connection = psycopg2.extensions.connection


class ReturnTimes(MutableMapping[Connection, float]):
    """Idle connection -> ``time.monotonic()`` of its return (live: each access reads the pool)."""

    def __init__(self, state: PoolState) -> None:
        self._state = state

    def _idle_info(self, conn: Connection) -> ConnInfo:
        info = self._state.info_of(conn)
        if info is None or info.state is not IDLE:
            raise KeyError(conn)
        return info

    def __getitem__(self, conn: Connection) -> float:
        return self._idle_info(conn).returned_at

    def __setitem__(self, conn: Connection, when: float) -> None:
        self._idle_info(conn).returned_at = float(when)
        self._state.evict_at = 0.0  # the next return looks for connections to evict

    def __delitem__(self, conn: Connection) -> None:
        raise TypeError(f"pool {self._state.name!r}: return_times entries go with their idle connections")

    def __iter__(self) -> Iterator[Connection]:
        return iter(self._state.idle_snapshot())

    def __len__(self) -> int:
        return len(self._state.idle)

    def __repr__(self) -> str:
        return repr(dict(self))
