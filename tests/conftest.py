"""Test fixtures: a real PostgreSQL for the whole session.

``PGPOOL_TEST_DSN`` names a server to use; without it an embedded PostgreSQL 18 is started on
127.0.0.1 in a temporary directory (see ``tests/embedded_pg.py``). Tests that stop or restart the
server use the ``embedded`` fixture and skip against any other server.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator

import psycopg2
import pytest

import pgpool

from .embedded_pg import EmbeddedPostgres

_app_names = itertools.count(1)


_SESSION_FIXTURES = {"sessions", "terminate", "embedded"}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Behind PgBouncer, skip what counts, ends or relies on server sessions: PgBouncer shares them."""
    if not os.environ.get("PGPOOL_BEHIND_PGBOUNCER"):
        return
    if _SESSION_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("needs_session"):
        pytest.skip("relies on one server session per connection, which PgBouncer's transaction mode breaks")


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedPostgres | None]:
    """The embedded server, or None when PGPOOL_TEST_DSN names another one."""
    if os.environ.get("PGPOOL_TEST_DSN"):
        yield None
        return
    with EmbeddedPostgres() as embedded:
        yield embedded


@pytest.fixture(scope="session")
def base_dsn(server: EmbeddedPostgres | None) -> str:
    return os.environ.get("PGPOOL_TEST_DSN") or server.dsn  # type: ignore[union-attr]


@pytest.fixture
def app_name() -> str:
    """A unique application_name, so a test can count its own sessions in pg_stat_activity."""
    return f"pgpool-test-{os.getpid()}-{next(_app_names)}"


@pytest.fixture
def dsn(base_dsn: str, app_name: str) -> str:
    return psycopg2.extensions.make_dsn(base_dsn, application_name=app_name)


@pytest.fixture
def admin(base_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit connection outside any pool, to look at and act on the server."""
    conn = psycopg2.connect(base_dsn, application_name="pgpool-test-admin")
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def sessions(base_dsn: str, app_name: str):
    """sessions() -> how many server sessions this test's pools have open right now.

    sessions(expect=n) polls for up to 5 s until the count is n: a backend needs a moment to exit
    after its client closed the connection. Each call connects afresh, so it survives a restart.
    """

    def current() -> int:
        conn = psycopg2.connect(base_dsn, application_name="pgpool-test-counter")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,))
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def count(expect: int | None = None) -> int:
        deadline = time.monotonic() + 5
        while True:
            found = current()
            if expect is None or found == expect or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    return count


@pytest.fixture
def table(admin: psycopg2.extensions.connection) -> Iterator[str]:
    """A fresh table (v int) for the test, dropped afterwards."""
    name = f"pgpool_t_{time.monotonic_ns()}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (v int)")
    yield name
    with admin.cursor() as cur:
        cur.execute(f"DROP TABLE {name}")


@pytest.fixture
def terminate(admin: psycopg2.extensions.connection):
    """terminate(conn): end conn's server session, as a restart or an administrator would.

    Returns once the backend is gone: pg_terminate_backend only signals it, and until it has exited
    its goodbye may not have reached the socket yet (no pool can see a death still in flight).
    """

    def kill(conn: psycopg2.extensions.connection) -> None:
        pid = conn.info.backend_pid
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
                if cur.fetchone()[0] == 0:
                    return
                time.sleep(0.01)

    return kill


@pytest.fixture
def embedded(server: EmbeddedPostgres | None) -> EmbeddedPostgres:
    if server is None:
        pytest.skip("stops or restarts the server: runs only on the embedded server, not PGPOOL_TEST_DSN")
    return server


@pytest.fixture(params=[pgpool.ConnectionPool, pgpool.ThreadSafeConnectionPool], ids=["plain", "threadsafe"])
def pool_cls(request: pytest.FixtureRequest) -> type[pgpool.ConnectionPool]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    """Every test joins the threads it starts (housekeepers stop on close)."""
    before = set(threading.enumerate())
    yield
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive() and "housekeeper" not in t.name]
    assert not leftover, f"threads left running: {leftover}"
