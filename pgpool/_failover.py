"""Failover rules: which errors say the server is no longer the one the pool wants, and whether a
connection's server is the kind that libpq's ``target_session_attrs`` asked for.

Pure functions, no I/O: a connection is only asked what the server already reported to it
(``ParameterStatus`` messages, which libpq keeps), so every check costs no round trip. The pool
core decides what to do with the answers (evict, log, count).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

# The SQLSTATEs that say the server itself changed (demoted, shutting down, restarting), with what a
# log line calls each. An error that only concerns one statement or session is not among them.
_EVICTING_SQLSTATES = {
    "25006": "read-only transaction",  # read_only_sql_transaction: a demoted or read-only primary
    "57P01": "server shutting down or connection terminated by an administrator",  # admin_shutdown
    "57P02": "server crashed",  # crash_shutdown: another backend crashed, all are being reset
    "57P03": "server cannot accept connections now",  # cannot_connect_now: starting or in recovery
}
# feature_not_supported is far too wide to evict on; only this message of it says "a standby".
_RECOVERY_SQLSTATE = "0A000"
_RECOVERY_MESSAGE = "cannot set transaction read-write mode during recovery"
_RECOVERY_REASON = "server in recovery, cannot write"
# psycopg2's class for each of those SQLSTATEs (psycopg2.errors.ReadOnlySqlTransaction...).
_ERROR_CLASSES = {code: psycopg2.errors.lookup(code) for code in (*_EVICTING_SQLSTATES, _RECOVERY_SQLSTATE)}
# How far down an application's wrapping (raise AppError(...) from exc) to look for the driver's error.
_CHAIN_DEPTH = 2

# psycopg2.connect's own keywords, which are not libpq options (pgpool._connect has the same list).
_CONNECT_KEYWORDS = frozenset({"dsn", "connection_factory", "cursor_factory", "async", "async_"})
_TARGET_ENV = "PGTARGETSESSIONATTRS"
# libpq's values (PostgreSQL 14+ clients), spelled as libpq compares them: exactly, case included.
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg2 error: the server's, else the one its class stands for (an error
    built by hand, as tests and wrappers do, has no pgcode)."""
    code = getattr(exc, "pgcode", None)
    if isinstance(code, str) and code:
        return code
    for sqlstate, cls in _ERROR_CLASSES.items():
        if isinstance(exc, cls):
            return sqlstate
    return None


def _reason_of(exc: BaseException) -> str | None:
    if not isinstance(exc, psycopg2.Error):
        return None
    sqlstate = _sqlstate(exc)
    if sqlstate in _EVICTING_SQLSTATES:
        return f"{_EVICTING_SQLSTATES[sqlstate]} (SQLSTATE {sqlstate})"
    if sqlstate == _RECOVERY_SQLSTATE:
        message = f"{exc.pgerror or ''} {exc}"
        if _RECOVERY_MESSAGE in message:
            return f"{_RECOVERY_REASON} (SQLSTATE {sqlstate})"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, then its causes and contexts, breadth first, down to _CHAIN_DEPTH levels, each once."""
    level = [exc]
    seen = {id(exc)}
    for depth in range(_CHAIN_DEPTH + 1):
        yield from level
        if depth == _CHAIN_DEPTH:
            return
        below = []
        for e in level:
            for inner in (e.__cause__, e.__context__):
                if inner is not None and id(inner) not in seen:
                    seen.add(id(inner))
                    below.append(inner)
        level = below


def eviction_reason(exc: BaseException | None) -> str | None:
    """Say why `exc` means that the pool's connections to this server must go, or None if it does not.

    The signs: SQLSTATE 25006 (a write on a read-only server: the primary was demoted or made
    read-only), 57P01/57P02/57P03 (the server is shutting down, crashed, or cannot take connections
    now), and 0A000 "cannot set transaction read-write mode during recovery" (a standby). The
    exception's causes and contexts are looked at too, two levels down, so that an error the
    application wrapped in its own still counts. The reason names the SQLSTATE and holds no part of
    the server's message (which may quote the application's data).
    """
    if exc is None:
        return None
    for e in _chain(exc):
        reason = _reason_of(e)
        if reason is not None:
            return reason
    return None


def _reported(conn: Any, name: str) -> bool | None:
    """What the server last reported for a boolean setting: True (on), False (off), None (not reported:
    a server before PostgreSQL 14, a proxy such as PgBouncer that does not pass it on, a closed connection)."""
    try:
        value = conn.info.parameter_status(name)
    except psycopg2.Error:
        return None
    if value == "on":
        return True
    if value == "off":
        return False
    return None


class ServerTarget:
    """The kind of server the pool's connection settings ask libpq for (``target_session_attrs``), and
    whether a connection's server still is that kind.

    libpq picks the server when a connection opens; a server can change afterwards (promoted,
    demoted, made read-only), which only `unwanted` notices.
    """

    def __init__(self, connect_kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
        """Read ``target_session_attrs`` as libpq will: from the dsn and keyword options (a keyword wins
        over the dsn), else from ``PGTARGETSESSIONATTRS``, else ``any``.

        Raises `ValueError` for a value that libpq would refuse, and for settings libpq cannot parse
        (without quoting them: they may hold a password).
        """
        environ = os.environ if environ is None else environ
        dsn = connect_kwargs.get("dsn") or ""
        options = {k: v for k, v in connect_kwargs.items() if k not in _CONNECT_KEYWORDS and v is not None}
        problem = None
        try:
            parsed = psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(dsn, **options))
        except psycopg2.ProgrammingError:
            parsed, problem = {}, "invalid connection settings: libpq cannot parse them"
        if problem is not None:  # raised outside the except clause: psycopg2's error quotes the dsn
            raise ValueError(problem)
        attrs = parsed.get("target_session_attrs") or environ.get(_TARGET_ENV) or "any"
        if attrs not in TARGET_SESSION_ATTRS:
            where = "target_session_attrs" if parsed.get("target_session_attrs") else _TARGET_ENV
            raise ValueError(f"{where} must be one of {', '.join(TARGET_SESSION_ATTRS)} (got {attrs!r})")
        self.attrs: str = attrs  # libpq's target_session_attrs value
        # read-write and primary: the pool writes, so a demoted or read-only server is unwanted.
        self.wants_primary: bool = attrs in ("read-write", "primary")
        # Whether `unwanted` can ever answer: any and prefer-standby take whatever server answers.
        self.checks: bool = attrs not in ("any", "prefer-standby")

    def unwanted(self, conn: Any) -> str | None:
        """Say why conn's server is not the kind the settings ask for, or None when it is (or when the
        server does not report what it is).

        No round trip: only what the server reported (``in_hot_standby``, ``default_transaction_read_only``,
        PostgreSQL 14+), as libpq's own check does at connect time. A session that set
        ``default_transaction_read_only`` itself counts as read-only, as libpq would see it.
        """
        if not self.checks:
            return None
        standby = _reported(conn, "in_hot_standby")
        if self.attrs == "primary":
            return "server is a standby (in_hot_standby=on)" if standby else None
        if self.attrs == "standby":
            return "server is a primary (in_hot_standby=off)" if standby is False else None
        read_only = _reported(conn, "default_transaction_read_only")
        if self.attrs == "read-write":
            if standby:
                return "server is a standby (in_hot_standby=on)"
            if read_only:
                return "server is read-only (default_transaction_read_only=on)"
            return None
        # read-only: unwanted only when both are known to be off, i.e. a read-write server.
        if standby is False and read_only is False:
            return "server is read-write (in_hot_standby=off, default_transaction_read_only=off)"
        return None

    def __repr__(self) -> str:
        return f"<ServerTarget target_session_attrs={self.attrs!r}>"


def server_of(conn: Any) -> str:
    """Name the server conn is connected to, ``host:port`` (``[::1]:5432`` for IPv6), for log lines.

    libpq reports the host it picked among a multi-host setting's; never a password. A closed
    connection may not know: then ``?``.
    """
    try:
        host, port = conn.info.host, conn.info.port
    except psycopg2.Error:
        host, port = None, None
    host = host or "?"
    if ":" in host and not host.startswith("/"):
        host = f"[{host}]"
    return f"{host}:{port or '?'}"
