"""maxconn bounds the sessions the server sees "also while connections are being closed": a closed
connection's backend still counts (pg_stat_activity, max_connections) until it has exited, which
takes a while when it has temporary tables to drop. The pool frees the slot as soon as psycopg2's
close() returns, so a new connect overlaps the old backend's exit."""

from __future__ import annotations

import pgpool


def count(admin, app_name: str) -> int:
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,))
        return int(cur.fetchone()[0])


def test_a_closed_connection_slot_is_freed_only_once_its_backend_is_gone(dsn: str, admin, app_name: str) -> None:
    pool = pgpool.ThreadSafeConnectionPool(0, 1, dsn=dsn, timeout=5)
    try:
        worst = 0
        for _ in range(3):
            conn = pool.getconn()
            with conn.cursor() as cur:  # a session that takes a while to end: temporary tables to drop
                cur.execute(
                    "DO $$ BEGIN FOR i IN 1..300 LOOP "
                    "EXECUTE format('CREATE TEMP TABLE t%s (x int)', i); END LOOP; END $$"
                )
            conn.commit()
            pool.putconn(conn, close=True)
            other = pool.getconn()  # the slot is free: a new session
            worst = max(worst, count(admin, app_name))
            pool.putconn(other, close=True)
        assert worst <= 1, f"the server saw {worst} sessions of a pool with maxconn=1"
    finally:
        pool.close()
