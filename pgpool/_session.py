"""What a connection goes through between borrowers: the checks before a lend, the cleanup after a return.

The rule is that nothing of one borrower reaches the next: an open transaction, changed session
characteristics (autocommit, isolation level, read-only, deferrable), the client encoding, pending
notices and notifications; with a `reset` hook, whatever it clears; and what `configure` set holds for
every borrower, whatever the reset did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg2.extensions

from ._records import PROBE_INTERVAL, ConnInfo
from .health import check_connection

Connection = psycopg2.extensions.connection
Hook = Callable[[Connection], Any]

_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_READY = psycopg2.extensions.STATUS_READY
_STATUS_ACTIVE = psycopg2.extensions.TRANSACTION_STATUS_ACTIVE
_STATUS_UNKNOWN = psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN


def lend_problem(conn: Connection, info: ConnInfo, check: Hook | None, redact: Callable[[str], str]) -> str | None:
    """Run the checks before a lend; return why `conn` must not be lent, or None.

    The socket probe costs one ``poll()``; a round trip happens only when the server sent something
    (it closed the connection, or a notification arrived). The `check` hook runs on every connection,
    new ones included. A BaseException from the hook propagates: the caller drops the connection.
    """
    now = time.monotonic()
    if now - info.probed_at < PROBE_INTERVAL:
        signalled = False  # a round trip or a probe found it alive an instant ago (see PROBE_INTERVAL)
    else:
        try:
            signalled = bool(info.probe.poll(0))
        except RuntimeError:
            signalled = True  # polled at the same instant by another thread: check for real
        if not signalled:
            info.probed_at = now
    if signalled:
        try:
            check_connection(conn)
        except Exception as exc:
            return f"closed by the server ({redact(str(exc).strip())})"
    if check is not None:
        try:
            check(conn)
            if conn.get_transaction_status() != _STATUS_IDLE:
                conn.rollback()
        except Exception as exc:
            return f"check failed ({redact(str(exc).strip())})"
    return None


def return_problem(conn: Connection, close: bool) -> str | None:
    """Tell why a returned connection cannot be kept, before any cleanup (None: it may be)."""
    if close:
        return "closed on request"
    if conn.closed:
        # psycopg2 sets closed=2 when the connection broke, 1 when the borrower closed it.
        return "broken (connection lost)" if conn.closed == 2 else "returned closed"
    status = conn.get_transaction_status()
    if status == _STATUS_UNKNOWN:
        return "broken"
    if status == _STATUS_ACTIVE:
        return "returned with a command in progress (ACTIVE)"
    return None


def clean_returned(
    conn: Connection, info: ConnInfo, reset: Hook | None, configure: Hook | None, redact: Callable[[str], str]
) -> str | None:
    """Make a returned connection as the next borrower expects it; say why it failed, if it did.

    Rolls back, runs the reset hook (a reset that leaves a transaction open has failed), runs
    `configure` again after a reset (so what it set holds), restores the session characteristics and
    the client encoding as they were after `configure`, and clears notices and notifications.
    """
    try:
        if conn.get_transaction_status() != _STATUS_IDLE or conn.status != _STATUS_READY:
            conn.rollback()
        if conn.get_transaction_status() != _STATUS_IDLE:
            # BEGIN run in SQL under autocommit: psycopg2's rollback() knows of no transaction.
            return "left in a transaction psycopg2 did not open (BEGIN in SQL under autocommit)"
        if reset is not None:
            reset(conn)
            if conn.get_transaction_status() != _STATUS_IDLE:
                return "reset failed: it left a transaction open"
            if configure is not None:
                configure(conn)
                if conn.get_transaction_status() != _STATUS_IDLE:
                    conn.commit()
        restore_session(conn, info, forced=reset is not None or info.sticky)
        conn.notices.clear()  # a list, or a deque a configure hook put there
        conn.notifies.clear()
    except Exception as exc:
        return f"cleanup failed ({redact(str(exc).strip())})"
    return None


def restore_session(conn: Connection, info: ConnInfo, forced: bool) -> None:
    """Restore autocommit, isolation level, read-only, deferrable and the client encoding.

    `forced` re-applies them even where psycopg2 believes they are unchanged: after a reset such as
    ``DISCARD ALL``, the server's values and psycopg2's idea of them may disagree.
    """
    if forced or conn.autocommit != info.autocommit:
        conn.autocommit = info.autocommit
    if forced or conn.isolation_level != info.isolation_level:
        conn.isolation_level = info.isolation_level
    if forced or conn.readonly != info.readonly:
        conn.readonly = info.readonly
    if forced or conn.deferrable != info.deferrable:
        conn.deferrable = info.deferrable
    if conn.encoding != info.encoding:
        conn.set_client_encoding(info.encoding)
    if conn.info.parameter_status("client_encoding") != info.encoding:
        # Changed in SQL (SET client_encoding, or a reset): psycopg2 believes it unchanged and would
        # skip set_client_encoding, so say it to the server, and keep it.
        with conn.cursor() as cur:
            cur.execute("SET client_encoding TO %s", (info.encoding,))
        if conn.get_transaction_status() != _STATUS_IDLE:
            conn.commit()
    conn.cursor_factory = info.cursor_factory
    if conn.get_transaction_status() != _STATUS_IDLE:
        conn.rollback()  # setting the characteristics outside autocommit may not leave it idle
