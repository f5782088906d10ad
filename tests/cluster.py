"""A primary and a streaming standby on 127.0.0.1, for the failover tests.

Built from the embedded server's own binaries (``tests/embedded_pg.py``: initdb for the primary,
``pg_basebackup -R`` for the standby, each in its own temporary directory, run as ``nobody`` when we
are root). Nothing outside those directories changes; `close` (and a build that fails) stops both
servers and removes them. Every wait is bounded.

    with Cluster() as cluster:
        pool = ThreadSafeConnectionPool(dsn=cluster.dsn("read-write"))
        cluster.stop_primary()
        cluster.promote_standby()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions

from .embedded_pg import _NEEDED_BINARIES, EmbeddedPostgres, _install_dir, _site_dir

_SETTINGS: dict[str, str | int] = {
    "wal_level": "replica",
    "hot_standby": "on",
    "max_wal_senders": 5,
    "wal_sender_timeout": "5s",  # a standby whose primary vanished notices within seconds
    "wal_receiver_timeout": "5s",
}


def available() -> str | None:
    """Why a cluster cannot be built here (the binaries are missing), or None when it can."""
    try:
        bin_dir = _install_dir(_site_dir()) / "bin"
    except RuntimeError as exc:
        return str(exc)
    missing = [name for name in _NEEDED_BINARIES if not (bin_dir / name).exists()]
    return f"the embedded server's wheel has no {', '.join(missing)} in {bin_dir}" if missing else None


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.05)


class Cluster:
    """A primary and its streaming standby; `dsn` names both, in a fixed order, for libpq to choose."""

    def __init__(self, max_connections: int = 50) -> None:
        first = EmbeddedPostgres(max_connections=max_connections, **_SETTINGS)
        second = EmbeddedPostgres(max_connections=max_connections, **_SETTINGS)
        self.servers = (first, second)  # the dsn's order, which never changes
        self.primary = first  # the server that takes writes now (after promote_standby: the promoted one)
        self.standby = second  # the other one: a standby, or after promote_standby the former primary

    # Building and tearing down.

    def start(self) -> None:
        """Build and start both servers; wait until the standby streams. On failure, remove everything."""
        try:
            self.primary.init()
            self.primary.start()
            self.standby.init_as_standby_of(self.primary)
            self.standby.start()
            self.wait_streaming()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop both servers and remove their directories, whatever state they are in."""
        try:
            self.servers[0].destroy()
        finally:
            self.servers[1].destroy()

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Connecting.

    def dsn(self, target_session_attrs: str = "read-write", **options: str | int) -> str:
        """Both servers, as an application lists them: ``host=127.0.0.1,127.0.0.1 port=p1,p2 ...``."""
        ports = ",".join(str(s.port) for s in self.servers)
        return psycopg2.extensions.make_dsn(
            f"host=127.0.0.1,127.0.0.1 port={ports} dbname=postgres user=postgres",
            target_session_attrs=target_session_attrs,
            connect_timeout=options.pop("connect_timeout", 2),
            **options,
        )

    @contextmanager
    def connect(self, server: EmbeddedPostgres) -> Iterator[psycopg2.extensions.connection]:
        """An autocommit connection to one server, outside any pool, closed at the end."""
        conn = psycopg2.connect(server.dsn, connect_timeout=2, application_name="pgpool-test-cluster")
        try:
            conn.autocommit = True
            yield conn
        finally:
            conn.close()

    def query(self, server: EmbeddedPostgres, sql: str) -> object:
        """The first column of the first row of `sql` on `server`."""
        with self.connect(server) as conn, conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            return row[0] if row else None

    # Waiting.

    def in_recovery(self, server: EmbeddedPostgres) -> bool:
        return bool(self.query(server, "SELECT pg_is_in_recovery()"))

    def wait_streaming(self, timeout: float = 30) -> None:
        """Wait until the standby is in recovery and the primary sees it streaming."""
        _wait(lambda: self.in_recovery(self.standby), timeout, "the standby is in recovery")
        _wait(
            lambda: self.query(self.primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == 1,
            timeout,
            f"the primary on port {self.primary.port} sees its standby streaming",
        )

    def wait_replayed(self, timeout: float = 10) -> None:
        """Wait until the standby has replayed everything the primary wrote so far."""
        # The insert position, not pg_current_wal_lsn(): with synchronous_commit off (embedded_pg's
        # setting) a commit may not be written yet, and would be waited for at a position before it.
        lsn = self.query(self.primary, "SELECT pg_current_wal_insert_lsn()")
        _wait(
            lambda: bool(self.query(self.standby, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")),
            timeout,
            f"the standby has replayed up to {lsn}",
        )

    # Faults and role changes.

    def stop_primary(self, mode: str = "immediate") -> None:
        """Stop the primary (``immediate``: a crash, as a lost machine looks; or ``fast``)."""
        self.primary.stop(mode=mode)

    def promote_standby(self, timeout: float = 30) -> None:
        """Promote the standby and wait until it takes writes; the roles swap (`primary` is now it)."""
        self.standby.promote(timeout=int(timeout))
        _wait(lambda: not self.in_recovery(self.standby), timeout, "the promoted standby leaves recovery")
        self.primary, self.standby = self.standby, self.primary

    def make_primary_read_only(self, timeout: float = 10) -> None:
        """Make the primary refuse writes while it stays up, as a switchover's first step does:
        ``default_transaction_read_only`` on for every session (ALTER SYSTEM, reloaded)."""
        server = self.primary
        with self.connect(server) as conn, conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            cur.execute("SELECT pg_reload_conf()")
        # The reload is asynchronous: wait until a new session sees it (libpq's choice uses that).
        _wait(
            lambda: self.query(server, "SHOW default_transaction_read_only") == "on",
            timeout,
            f"the server on port {server.port} is read-only",
        )

    def restart_as_standby(self, timeout: float = 30) -> None:
        """Make the former primary (stopped or still up after `promote_standby`) a standby of the new
        one: stopped, rebuilt from a base backup of the new primary, started on its old port."""
        old = self.standby
        assert not self.in_recovery(self.primary), "promote_standby() first"
        if old.is_running():
            old.stop(mode="fast")
        old.follow(self.primary)
        old.start()
        self.wait_streaming(timeout)
