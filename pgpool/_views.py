"""psycopg2_pool's inspection attribute ``return_times``, a real ``dict`` as there.

``return_times`` was a dict in psycopg2_pool, and code (its own tests among it) reads it and even
backdates an entry to age a connection. Here the return time lives with each connection's info, so
that the idle list holds the only strong references to idle connections: the pool makes a dict of
them when asked (a snapshot, as `idle_connections` is), and writing an entry writes it through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import psycopg2.extensions

from ._records import IDLE

if TYPE_CHECKING:
    from ._state import PoolState

Connection = psycopg2.extensions.connection


class ReturnTimes(dict[Connection, float]):
    """Idle connection -> ``time.monotonic()`` of its return: a snapshot whose writes reach the pool."""

    __slots__ = ("_state",)

    def __init__(self, state: PoolState) -> None:
        super().__init__((conn, info.returned_at) for conn, info in state.idle.copy())  # deque.copy: atomic
        self._state = state

    def __setitem__(self, conn: Connection, when: float) -> None:
        info = self._state.info_of(conn)
        if info is None or info.state is not IDLE:
            raise KeyError(conn)  # only idle connections have a return time
        info.returned_at = float(when)
        self._state.evict_at = 0.0  # the next return looks for connections to evict
        super().__setitem__(conn, float(when))

    def _refuse(self) -> NoReturn:
        raise TypeError(f"pool {self._state.name!r}: return_times entries go with their idle connections")

    def __delitem__(self, conn: Connection) -> None:
        self._refuse()

    def pop(self, *args: Any) -> Any:
        self._refuse()

    def popitem(self) -> tuple[Connection, float]:
        self._refuse()

    def clear(self) -> None:
        self._refuse()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._refuse()

    def setdefault(self, *args: Any) -> Any:
        self._refuse()
