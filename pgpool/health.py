"""Connection health: the cheap probe used before lending, and the optional hooks pgpool provides."""

from __future__ import annotations

import select

import psycopg2.extensions

Connection = psycopg2.extensions.connection

__all__ = ["check_connection", "reset_session"]


def check_connection(conn: Connection) -> None:
    """Run ``SELECT 1`` on `conn`; raise if the server does not answer.

    Pass it as ``check=pgpool.check_connection`` to test every connection with a round trip before it
    is lent (safer, and slower by one round trip per borrow). The connection is left idle.
    """
    autocommit = conn.autocommit
    if not autocommit:
        conn.autocommit = True  # so that the probe does not open a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
    finally:
        if not autocommit and not conn.closed:
            conn.autocommit = False


def reset_session(conn: Connection) -> None:
    """Run ``DISCARD ALL`` on `conn`, clearing every session state a borrower may have left.

    Pass it as ``reset=pgpool.reset_session``: roles, ``SET`` parameters, temporary tables, prepared
    statements, advisory locks and ``LISTEN`` registrations then never reach the next borrower.
    Not for PgBouncer in transaction mode, where the server session is not the borrower's.
    """
    autocommit = conn.autocommit
    conn.autocommit = True  # DISCARD ALL cannot run inside a transaction block
    try:
        with conn.cursor() as cur:
            cur.execute("DISCARD ALL")
    finally:
        if not conn.closed:
            conn.autocommit = autocommit


def socket_readable(conn: Connection) -> bool:
    """Tell whether the server sent anything to `conn`, with a poller of its own.

    For the housekeeper: a connection's cached probe belongs to whoever holds the connection, and a
    ``select.poll`` object refuses to be polled from two threads at once.
    """
    try:
        return bool(socket_probe(conn).poll(0))
    except (OSError, ValueError, psycopg2.Error):
        return True  # no usable socket: as good as closed


def socket_probe(conn: Connection) -> select.poll:
    """Make a poller telling, without a round trip, whether the server sent anything to `conn`.

    An idle connection has nothing to read unless the server closed it (restart,
    ``pg_terminate_backend``, ``idle_session_timeout``) or sent a notification: ``probe.poll(0)`` is
    then non-empty. Uses ``poll``, which, unlike ``select.select``, works with file numbers above 1024.
    """
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return poller
