"""Opening connections: the connection settings checked by libpq's own parser, connect + configure,
which failures a retry can fix, and the backoff between retries."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions

from ._records import Claim, ConnInfo
from ._secrets import find_secrets, redact

Connection = psycopg2.extensions.connection
Hook = Callable[[Connection], Any]

logger = logging.getLogger("pgpool")

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_LIFETIME_JITTER = 0.05  # up to 5% earlier, so a pool's connections do not all expire together

# psycopg2.connect's own keywords: not libpq options.
_CONNECT_KEYWORDS = frozenset({"dsn", "connection_factory", "cursor_factory", "async", "async_"})

# Pool options of other pools that people pass by habit, and what pgpool calls them.
_POOL_OPTION_HINTS = {
    "min_size": "minconn (psycopg_pool's min_size)",
    "max_size": "maxconn (psycopg_pool's max_size)",
    "max_idle": "idle_timeout (psycopg_pool's max_idle)",
    "reconnect_timeout": "timeout (psycopg_pool's reconnect_timeout)",
    "max_waiting": "timeout (pgpool bounds waits in time, not in number)",
    "pool_size": "maxconn (SQLAlchemy's pool_size)",
    "max_overflow": "maxconn (SQLAlchemy's pool_size + max_overflow)",
    "pool_timeout": "timeout (SQLAlchemy's pool_timeout)",
    "pool_recycle": "max_lifetime (SQLAlchemy's pool_recycle)",
    "pool_pre_ping": "check=pgpool.check_connection (SQLAlchemy's pool_pre_ping)",
    "mincached": "minconn (DBUtils' mincached)",
    "maxconnections": "maxconn (DBUtils' maxconnections)",
    "open": "nothing: a pgpool pool opens minconn connections at construction",
    "kwargs": "the connection keywords themselves, e.g. host=..., dbname=...",
}


def retryable(exc: BaseException) -> bool:
    """Tell whether a failed connect may succeed if tried again (server down, starting, full)."""
    return isinstance(exc, psycopg2.OperationalError)


def backoff(attempt: int) -> float:
    """Seconds to sleep before retry number `attempt`: exponential, capped at 2 s, with jitter so that
    many threads do not hammer a server that is coming back up."""
    return float(random.uniform(0.5, 1.0) * min(2.0, 0.05 * 2**attempt))


class Connector:
    """Opens the connections of one pool: ``psycopg2.connect`` with its settings, then `configure`."""

    def __init__(
        self, pool_name: str, connect_kwargs: dict[str, Any], configure: Hook | None, max_lifetime: float | None
    ) -> None:
        self.pool_name = pool_name
        self.connect_kwargs = connect_kwargs
        self.configure = configure
        self.max_lifetime = max_lifetime
        self.secrets = find_secrets(connect_kwargs)
        self._validate()

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def _validate(self) -> None:
        """Parse the settings as libpq will, so that a typo fails now, before any connect."""
        options = {k: v for k, v in self.connect_kwargs.items() if k not in _CONNECT_KEYWORDS and v is not None}
        dsn = self.connect_kwargs.get("dsn") or ""
        if not isinstance(dsn, str):
            raise ValueError(f"dsn must be a string, got {type(dsn).__name__} (pool {self.pool_name!r})")
        problem = None
        try:
            psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.ProgrammingError as exc:
            # psycopg2's message quotes the dsn, password included.
            problem = f"invalid dsn for pool {self.pool_name!r}: {self.redact(str(exc).strip())}"
        if problem is None:
            try:
                psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn("", **options))
            except psycopg2.ProgrammingError as exc:
                message = self.redact(str(exc).strip())
                found = re.search(r'option "([^"]+)"', message)
                hint = _POOL_OPTION_HINTS.get(found.group(1)) if found else None
                more = f": pgpool calls it {hint}" if hint else ""
                problem = f"invalid connection setting for pool {self.pool_name!r}: {message}{more}"
        if problem is not None:
            # Raised outside the except clause: psycopg2's error, password included, is not chained.
            raise ValueError(problem)

    def open(self, claim: Claim) -> None:
        """Open a connection in the claim's reserved slot: `claim.new_conn` is set the instant it
        exists, so whoever owns the claim closes it if configuring fails or is interrupted."""
        started = time.monotonic()
        claim.new_conn = psycopg2.connect(**self.connect_kwargs)
        claim.connect_seconds = time.monotonic() - started
        conn = claim.new_conn
        if self.configure is not None:
            self.configure(conn)
            if conn.get_transaction_status() != _STATUS_IDLE:
                conn.commit()  # keep what configure set, e.g. SET search_path outside autocommit
        expires = None
        if self.max_lifetime is not None:
            expires = time.monotonic() + self.max_lifetime * (1 - _LIFETIME_JITTER * random.random())
        claim.new_info = ConnInfo(conn, expires)
        logger.info(
            "pool %r: opened connection to %s:%s/%s (backend pid %s)",
            self.pool_name,
            conn.info.host,
            conn.info.port,
            conn.info.dbname,
            conn.info.backend_pid,
        )
