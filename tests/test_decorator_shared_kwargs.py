"""@with_connection writes the borrowed connection into the kwargs dict it was called with. When the
caller keeps that dict (operator.methodcaller on 3.11/3.12, any C caller using PyObject_Call with a
stored dict), the next call finds the old connection there, takes it for an explicit one and uses a
connection that went back to the pool (here: lent to another borrower at that very moment)."""

import operator

import pgpool


def test_methodcaller_reuse_never_gets_a_returned_connection(dsn):
    pool = pgpool.ThreadSafeConnectionPool(1, 2, dsn=dsn, timeout=1)
    try:

        class Dao:
            @pgpool.with_connection(pool)
            def which(self, tag=None, conn=None):
                return conn

        call = operator.methodcaller("which", tag="x")
        first = call(Dao())
        someone_elses = pool.getconn()  # another borrower (no block: nothing to join); LIFO: the same one
        try:
            assert someone_elses is first
            second = call(Dao())
            assert second is not someone_elses, "the decorator passed a connection lent to another borrower"
        finally:
            pool.putconn(someone_elses)
    finally:
        pool.close()
