"""Django's per-connection setup, as the pool's ``configure`` hook: once per server session.

Django's stock backend sets the time zone and the role, registers its jsonb loader, sets the isolation
level and autocommit on every connect. Run in ``configure``, they run once per new connection; what
the pool restores on each return (autocommit, isolation level) are then Django's values, so every
borrower starts as a fresh stock connection would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

__all__ = ["SessionSetup"]


def _raw_json(value: Any) -> Any:
    # Django decodes JSONField values itself: psycopg2 must hand the text over untouched.
    return value


@dataclass(frozen=True)
class SessionSetup:
    """What a new connection of one alias gets before its first use; equal setups share a pool.

    It holds values, not the `DatabaseWrapper` that asked first: the pool outlives that wrapper, and
    holding it would keep its connection (and slot) alive after its thread is gone.
    """

    timezone_name: str | None  # SET TIME ZONE, when the server's differs
    role: str | None  # OPTIONS["assume_role"]: SET ROLE
    isolation_level: int | None  # OPTIONS["isolation_level"], else the server's default
    autocommit: bool  # settings AUTOCOMMIT
    user_configure: Callable[[Any], Any] | None  # OPTIONS["pool"]["configure"], run last

    def __call__(self, conn: psycopg2.extensions.connection) -> None:
        psycopg2.extras.register_default_jsonb(conn_or_curs=conn, loads=_raw_json)
        with conn.cursor() as cur:
            if self.timezone_name and conn.info.parameter_status("TimeZone") != self.timezone_name:
                cur.execute("SELECT set_config('TimeZone', %s, false)", [self.timezone_name])
            if self.role:
                cur.execute(sql.SQL("SET ROLE {}").format(sql.Literal(self.role)))
        if not conn.autocommit:
            conn.commit()  # so that the SETs stick
        if self.isolation_level is not None:
            conn.isolation_level = self.isolation_level
        conn.autocommit = self.autocommit
        if self.user_configure is not None:
            self.user_configure(conn)
