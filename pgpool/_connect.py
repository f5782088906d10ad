"""Opening connections: the connection settings checked by libpq's own parser, connect + configure,
which failures a retry can fix, and the backoff between retries."""

from __future__ import annotations

import difflib
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions

from ._failover import ServerTarget, server_of
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


# The options of a pool's constructor, for "did you mean" (pgpool.pool.ConnectionPool.__init__).
POOL_OPTIONS = (
    "minconn",
    "maxconn",
    "idle_timeout",
    "name",
    "timeout",
    "check",
    "configure",
    "reset",
    "max_lifetime",
    "leak_timeout",
    "connection_factory",
    "dsn",
)

# libpq's connection keywords (PostgreSQL 18's list; an older libpq refuses the newest with its own
# message, which names the keyword): for "did you mean" when a keyword is neither a pool option nor
# one of these.
_LIBPQ_KEYWORDS = frozenset(
    [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "require_auth",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslkeylogfile",
        "sslpassword",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
        "min_protocol_version",
        "max_protocol_version",
        "oauth_issuer",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_scope",
    ]
)


def unknown_option_message(name: str, where: str) -> str:
    """What to say about a keyword that is neither a pool option nor a libpq setting: the nearest
    pool option (or connection setting), or what pgpool calls another pool's option."""
    hint = _POOL_OPTION_HINTS.get(name)
    if hint is None:
        lowered = {option.lower(): option for option in (*POOL_OPTIONS, *sorted(_LIBPQ_KEYWORDS))}
        squeezed = name.lower().replace("_", "")
        exact = [opt for low, opt in lowered.items() if low.replace("_", "") == squeezed]
        close = exact or [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.75)]
        if close:
            kind = "pool option" if close[0] in POOL_OPTIONS else "connection setting"
            hint = f"did you mean {close[0]}? (a {kind})"
    message = f"unknown option {name!r} for {where}: neither a pool option nor a libpq connection setting"
    if hint is None:
        return message
    return f"{message}; {hint}" if hint.startswith("did you mean") else f"{message}; pgpool calls it {hint}"


# Connect failures that waiting cannot fix: the server answered and refused these settings. libpq
# reports them as OperationalError without an SQLSTATE, so the server's (English) words tell them.
_PERMANENT = re.compile(
    r"authentication failed"  # password, SCRAM, md5, peer, ident, cert...
    r"|database \".*\" does not exist"
    r"|role \".*\" does not exist"
    r"|no pg_hba\.conf entry"
    r"|pg_hba\.conf rejects connection"
    r"|permission denied for database"
    r"|no password supplied"
    r"|is not permitted to log in"
    r"|invalid (integer|port) value"
)
_PERMANENT_SQLSTATES = frozenset({"28000", "28P01", "3D000", "42501"})


def permanent(exc: BaseException) -> bool:
    """Tell whether a connect failed for a reason a retry cannot fix (bad password, database or role)."""
    if getattr(exc, "pgcode", None) in _PERMANENT_SQLSTATES:
        return True
    return _PERMANENT.search(str(exc)) is not None


def retryable(exc: BaseException) -> bool:
    """Tell whether a failed connect may succeed if tried again (server down, starting, full)."""
    return isinstance(exc, psycopg2.OperationalError) and not permanent(exc)


def backoff(attempt: int) -> float:
    """Seconds to sleep before retry number `attempt`: exponential, capped at 2 s, with jitter so that
    many threads do not hammer a server that is coming back up."""
    return float(random.uniform(0.5, 1.0) * min(2.0, 0.05 * 2**attempt))


class Connector:
    """Opens the connections of one pool: ``psycopg2.connect`` with its settings, then `configure`."""

    def __init__(
        self,
        pool_name: str,
        connect_kwargs: dict[str, Any],
        configure: Hook | None,
        max_lifetime: float | None,
        target: ServerTarget | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.target = target
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
            found = re.search(r'invalid connection option "([^"]+)"', problem)
            if found and found.group(1) not in _LIBPQ_KEYWORDS:
                near = difflib.get_close_matches(found.group(1), sorted(_LIBPQ_KEYWORDS), n=1, cutoff=0.75)
                problem += f"; did you mean {near[0]}?" if near else ""
        if problem is None:
            # Keyword by keyword: an unknown one is a pool option misspelt more often than a libpq
            # setting, and libpq's own message ("invalid dsn") names a dsn nobody passed.
            for name, value in options.items():
                try:
                    psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn("", **{name: value}))
                except psycopg2.ProgrammingError as exc:
                    if name not in _LIBPQ_KEYWORDS:
                        problem = unknown_option_message(name, f"pool {self.pool_name!r}")
                    else:
                        message = self.redact(str(exc).strip()).removeprefix("invalid dsn: ")
                        problem = f"invalid connection setting {name}= for pool {self.pool_name!r}: {message}"
                    break
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
        if self.target is not None and self.target.checks:
            # libpq checked when it chose the server; the server may have changed since (promoted,
            # demoted): refused like a server that is not up yet, so that a timeout retries it.
            unwanted = self.target.unwanted(conn)
            if unwanted is not None:
                raise psycopg2.OperationalError(
                    f"connected to {server_of(conn)}, but it is not what target_session_attrs="
                    f"{self.target.attrs} asks for: {unwanted}"
                )
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
