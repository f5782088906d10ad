"""Re-entering one transaction() object: the outer block's exit silently does nothing (work left
uncommitted, connection lent for good, and the thread's later borrows join the stale borrow); a
transaction() object once used as a savepoint, reused at the top level, fails and leaks."""

import psycopg2.extensions as ext

import pgpool


def test_nested_reentry_of_one_transaction_object(dsn):
    pool = pgpool.ThreadSafeConnectionPool(1, 2, dsn=dsn, timeout=1)
    try:
        tx = pool.transaction()
        try:
            with tx as conn:
                with tx:  # either refused, or a savepoint that leaves the outer transaction whole
                    pass
        except RuntimeError:
            pass
        assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE or conn.closed
        assert pool.stats()["in_use"] == 0, "the outer block's exit did nothing: its connection is lent for good"
        with pool.connection() as later:
            assert later is not conn or pool.stats()["in_use"] == 1
    finally:
        pool.close()


def test_transaction_object_reused_after_serving_as_savepoint(dsn):
    pool = pgpool.ThreadSafeConnectionPool(1, 2, dsn=dsn, timeout=1)
    try:
        tx = pool.transaction()
        with pool.transaction():
            with tx:  # a savepoint: tx._savepoint is set and never cleared
                pass
        with tx as conn:  # now the outermost: must be a real transaction
            conn.cursor().execute("SELECT 1")
        assert pool.stats()["in_use"] == 0
    finally:
        pool.close()


def test_nested_reentry_of_one_connection_object(dsn):
    """The inner exit of a re-entered connection() object gives the connection back while the outer
    block still uses it: the next borrower gets it too."""
    pool = pgpool.ThreadSafeConnectionPool(1, 2, dsn=dsn, timeout=1)
    try:
        borrow = pool.connection()
        try:
            with borrow as conn:
                with borrow:
                    pass
                assert conn in pool.connections_in_use, "returned to the pool while its block is still open"
        except RuntimeError:
            pass
    finally:
        pool.close()
