"""Every way to borrow, in typed code that `mypy --strict` and `pyright` check cleanly (`make lint`).

The decorated functions declare ``conn: connection = pgpool.BORROWED``: the decorator replaces the
default with a borrowed connection, so calls that leave `conn` out type-check, and a call of the
undecorated function fails at the first use of `conn` with an error that says why.

Run it against a server: ``PGPOOL_DSN=postgresql://127.0.0.1:5432/test python examples/typed_dao.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from psycopg2.extensions import connection
from psycopg2.extras import LoggingConnection

import pgpool
from pgpool import ThreadSafeConnectionPool

DSN = os.environ.get("PGPOOL_DSN", "postgresql://127.0.0.1:5432/test")

pool = ThreadSafeConnectionPool(minconn=1, maxconn=4, timeout=5, dsn=DSN, name="typed")


@pgpool.with_transaction(pool)
def create_schema(conn: connection = pgpool.BORROWED) -> None:
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS typed_notes (id serial PRIMARY KEY, body text NOT NULL)")


@pgpool.with_transaction(pool)
def add_note(body: str, conn: connection = pgpool.BORROWED) -> int:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO typed_notes (body) VALUES (%s) RETURNING id", (body,))
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


@pgpool.with_connection(pool)
def count_notes(conn: connection = pgpool.BORROWED) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM typed_notes")
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


@pgpool.with_connection(pool)
def note_bodies(conn: connection = pgpool.BORROWED) -> Iterator[str]:
    """A generator: it borrows its own connection and keeps it until exhausted or closed."""
    with conn.cursor() as cur:
        cur.execute("SELECT body FROM typed_notes ORDER BY id")
        for (body,) in cur:
            yield str(body)


class Notes:
    """Methods, classmethods and staticmethods take the same decorators."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @pgpool.with_transaction(pool)
    def add(self, body: str, conn: connection = pgpool.BORROWED) -> int:
        return add_note(f"{self.prefix}{body}", conn=conn)  # joins this transaction explicitly

    @classmethod
    @pgpool.with_connection(pool)
    def count(cls, conn: connection = pgpool.BORROWED) -> int:
        return count_notes(conn=conn)

    @staticmethod
    @pgpool.with_connection(pool)
    def server_version(conn: connection = pgpool.BORROWED) -> int:
        return int(conn.server_version)


def main() -> None:
    create_schema()
    first = add_note("written by a decorated function")
    second = Notes("method: ").add("written by a decorated method")
    assert second > first

    with pool.transaction() as conn:  # a block: conn is a psycopg2 connection
        add_note("in the caller's transaction", conn=conn)
        add_note("joins it too")  # same thread, still open: joins the transaction's connection

    with pool.connection() as conn:
        assert count_notes(conn=conn) == Notes.count()

    by_hand = pool.getconn()
    try:
        assert not by_hand.closed
    finally:
        pool.putconn(by_hand)

    stats: pgpool.PoolStats = pool.stats()
    print(f"{count_notes()} notes; {sum(1 for _ in note_bodies())} read back; {stats['checkouts']} checkouts")
    print(f"server version {Notes.server_version()}")

    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=DSN, connection_factory=LoggingConnection) as logged:
        with logged.connection() as lconn:  # typed as LoggingConnection, the factory's class
            assert isinstance(lconn, LoggingConnection) and not lconn.closed

    with pool.transaction() as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE typed_notes")
    pool.close()


if __name__ == "__main__":
    main()
