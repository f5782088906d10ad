"""The interrupt sweep (see tests/interrupt_sweep.py) over every public operation, for both pools."""

from __future__ import annotations

import time

import psycopg2
import psycopg2.extensions
import pytest

import pgpool
from pgpool import ConnectionPool, PoolError, ThreadSafeConnectionPool

from .interrupt_sweep import Interrupter, KeptConnection, Run, sweep

MAXCONN = 2
IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE

pytestmark = pytest.mark.needs_session


@pytest.fixture(autouse=True)
def sweep_table(admin, app_name):
    with admin.cursor() as cur:
        cur.execute("SET lock_timeout = '10s'")  # a session a failed sweep left in a transaction
        cur.execute("CREATE TABLE IF NOT EXISTS sweep_items (tag int, n int)")
        cur.execute("TRUNCATE sweep_items")
    yield
    for conn in KeptConnection.kept:  # what a failed run lost: never left to hold sweep_items' locks
        if not conn.closed:
            conn.close()
    KeptConnection.kept.clear()
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app_name,))


_tags = iter(range(1, 10**9))


# -- setups (not interrupted) --------------------------------------------------------------------


def nothing(run: Run) -> None:
    pass


def one_lent(run: Run) -> None:
    run.held.append(run.pool.getconn())


def one_lent_dirty(run: Run) -> None:
    conn = run.pool.getconn()
    conn.isolation_level = "SERIALIZABLE"  # session characteristics and encoding to restore
    conn.set_client_encoding("LATIN1")
    with conn.cursor() as cur:
        cur.execute("INSERT INTO sweep_items VALUES (-1, 0)")  # uncommitted: must never be committed
        cur.execute("DO $$ BEGIN RAISE NOTICE 'for nobody else'; END $$")
    run.held.append(conn)


def one_lent_in_transaction(run: Run) -> None:
    conn = run.pool.getconn()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO sweep_items VALUES (-1, 0)")  # uncommitted: must never be committed
    run.held.append(conn)


def one_stale_idle(run: Run) -> None:
    conn = run.pool.getconn()
    run.pool.putconn(conn)
    run.pool.return_times[conn] -= 10_000  # past idle_timeout: getconn must close it


def one_idle(run: Run) -> None:
    run.pool.putconn(run.pool.getconn())


def two_idle_one_lent(run: Run) -> None:
    pool = run.pool
    a, b = pool.getconn(), pool.getconn()
    pool.putconn(a)
    run.held.append(b)


# -- operations (interrupted) --------------------------------------------------------------------


def op_getconn(run: Run) -> None:
    run.held.append(run.pool.getconn())


def op_putconn(run: Run) -> None:
    conn = run.held[0]
    run.given_back.append(conn)
    run.pool.putconn(conn)


def op_connection(run: Run) -> None:
    block = run.pool.connection()
    run.open_blocks.append(block)
    with block as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO sweep_items VALUES (-1, 0)")  # never committed by connection()
    run.open_blocks.remove(block)


def _insert_two(conn: psycopg2.extensions.connection, tag: int) -> None:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO sweep_items VALUES (%s, 1)", (tag,))
        cur.execute("INSERT INTO sweep_items VALUES (%s, 2)", (tag,))


def op_transaction(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 2
    block = run.pool.transaction()
    run.open_blocks.append(block)
    with block as conn:
        _insert_two(conn, run.rows_tag)
    run.open_blocks.remove(block)


def op_nested_transactions(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 4
    outer = run.pool.transaction()
    run.open_blocks.append(outer)
    with outer as conn:
        _insert_two(conn, run.rows_tag)
        inner = run.pool.transaction()
        run.open_blocks.append(inner)
        with inner as again:
            assert again is conn
            _insert_two(again, run.rows_tag)
        run.open_blocks.remove(inner)
    run.open_blocks.remove(outer)


def op_decorated_call(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 2

    @pgpool.with_transaction(run.pool)
    def save(tag: int, conn: psycopg2.extensions.connection) -> None:
        _insert_two(conn, tag)

    @pgpool.with_connection(run.pool)
    def read(conn: psycopg2.extensions.connection) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return int(cur.fetchone()[0])

    save(run.rows_tag)
    read()


def op_decorated_generator(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 2

    @pgpool.with_transaction(run.pool)
    def produce(tag: int, conn: psycopg2.extensions.connection):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO sweep_items VALUES (%s, 1)", (tag,))
            yield 1
            cur.execute("INSERT INTO sweep_items VALUES (%s, 2)", (tag,))
            yield 2

    assert list(produce(run.rows_tag)) == [1, 2]


def op_decorated_generator_closed_early(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 0  # closed early: rolled back

    @pgpool.with_transaction(run.pool)
    def produce(tag: int, conn: psycopg2.extensions.connection):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO sweep_items VALUES (%s, 1)", (tag,))
            yield 1
            yield 2

    gen = produce(run.rows_tag)
    next(gen)
    gen.close()


def op_decorated_generator_dropped_unfinished(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 0  # dropped unfinished: rolled back

    @pgpool.with_transaction(run.pool)
    def produce(tag: int, conn: psycopg2.extensions.connection):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO sweep_items VALUES (%s, 1)", (tag,))
            yield 1
            yield 2

    gen = produce(run.rows_tag)
    next(gen)
    del gen  # finalized: its borrow is ended by the next getconn


def _reader(pool):
    @pgpool.with_connection(pool)
    def rows(conn: psycopg2.extensions.connection):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO sweep_items VALUES (-1, 0)")  # never committed by with_connection
            received = yield 1
            yield received
            yield 3

    return rows


def op_connection_generator_exhausted(run: Run) -> None:
    assert list(_reader(run.pool)()) == [1, None, 3]


def op_generator_sent_to(run: Run) -> None:
    gen = _reader(run.pool)()
    assert next(gen) == 1
    assert gen.send("x") == "x"
    gen.close()


def op_transaction_generator_thrown_into(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 0  # the error ends it: rolled back

    @pgpool.with_transaction(run.pool)
    def produce(tag: int, conn: psycopg2.extensions.connection):
        _insert_two(conn, tag)
        yield 1
        yield 2

    gen = produce(run.rows_tag)
    next(gen)
    try:
        gen.throw(ValueError("stop"))
    except ValueError:
        pass


def op_transaction_generator_pool_closed(run: Run) -> None:
    run.rows_tag, run.rows_all = next(_tags), 0  # its pool closed under it: rolled back

    @pgpool.with_transaction(run.pool)
    def produce(tag: int, conn: psycopg2.extensions.connection):
        _insert_two(conn, tag)
        yield 1
        yield 2

    gen = produce(run.rows_tag)
    next(gen)
    run.pool.close()


def op_putconn_close(run: Run) -> None:
    conn = run.held[0]
    run.given_back.append(conn)
    run.pool.putconn(conn, close=True)


def op_getconn_keyed(run: Run) -> None:
    conn = run.pool.getconn("sweep-key")
    run.held.append(conn)
    assert run.pool.getconn("sweep-key") is conn
    run.given_back.append(conn)
    run.pool.putconn(conn, "sweep-key")


def op_drain(run: Run) -> None:
    run.pool.drain()


def op_stats(run: Run) -> None:
    run.pool.stats()
    repr(run.pool)


def op_clear(run: Run) -> None:
    run.pool.clear()


def op_close(run: Run) -> None:
    run.pool.close()


OPERATIONS = {
    "getconn-empty": (nothing, op_getconn),
    "getconn-stale-idle": (one_stale_idle, op_getconn),
    "getconn-idle": (one_idle, op_getconn),
    "putconn-clean": (one_lent, op_putconn),
    "putconn-in-transaction": (one_lent_in_transaction, op_putconn),
    "putconn-dirty-session": (one_lent_dirty, op_putconn),
    "connection": (nothing, op_connection),
    "transaction": (nothing, op_transaction),
    "nested-transactions": (one_idle, op_nested_transactions),
    "decorated-call": (nothing, op_decorated_call),
    "decorated-generator": (nothing, op_decorated_generator),
    "decorated-generator-closed-early": (nothing, op_decorated_generator_closed_early),
    "decorated-generator-dropped-unfinished": (nothing, op_decorated_generator_dropped_unfinished),
    "connection-generator-exhausted": (nothing, op_connection_generator_exhausted),
    "generator-sent-to": (one_idle, op_generator_sent_to),
    "transaction-generator-thrown-into": (nothing, op_transaction_generator_thrown_into),
    "transaction-generator-pool-closed": (one_idle, op_transaction_generator_pool_closed),
    "putconn-close": (one_lent, op_putconn_close),
    "getconn-keyed": (one_idle, op_getconn_keyed),
    "drain-with-lent": (two_idle_one_lent, op_drain),
    "stats": (two_idle_one_lent, op_stats),
    "clear": (two_idle_one_lent, op_clear),
    "close-with-lent": (two_idle_one_lent, op_close),
}


def sessions_of(admin: psycopg2.extensions.connection, app_name: str, state: str | None = None) -> int:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND (%s IS NULL OR state = %s)",
            (app_name, state, state),
        )
        return int(cur.fetchone()[0])


def wait_for_sessions(
    admin, app_name: str, want: int, timeout: float = 5.0, at_most: bool = False, state: str | None = None
) -> int:
    """The server lists a backend until it has exited, a moment after its client closed: poll."""
    deadline = time.monotonic() + timeout
    while True:
        seen = sessions_of(admin, app_name, state)
        if (seen <= want if at_most else seen == want) or time.monotonic() > deadline:
            return seen
        time.sleep(0.01)


@pytest.mark.parametrize("where", ["python-calls", "c-calls"])
@pytest.mark.parametrize("pool_cls", [ConnectionPool, ThreadSafeConnectionPool], ids=["plain", "threadsafe"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_an_interrupt_at_any_call_inside_pgpool_loses_nothing(pool_cls, operation, where, dsn, app_name, admin):
    setup, op = OPERATIONS[operation]

    def make_pool():
        return pool_cls(
            minconn=0,
            maxconn=MAXCONN,
            idle_timeout=600,
            dsn=dsn,
            connection_factory=KeptConnection,
            reset=None,
        )

    def check(run: Run, tracer: Interrupter) -> None:
        where = f"{operation}, interrupt at call {tracer.n} ({tracer.fired_at})"
        pool = run.pool
        if not run.held:
            # Whatever ended the borrows (their blocks, a generator's end, the housekeeper for one
            # dropped unfinished, close()), no session is left holding a transaction, with no
            # further call on the pool.
            left = wait_for_sessions(admin, app_name, 0, 3, state="idle in transaction")
            assert left == 0, f"{left} session(s) left idle in transaction: {where}"
        for conn in run.given_back:
            info = pool._state.info_of(conn)
            assert info is None or info.state != "lent", f"a returned connection is still lent: {where}"
        if pool.closed:
            for conn in run.held:
                if conn not in run.given_back:
                    pool.putconn(conn)
            assert wait_for_sessions(admin, app_name, 0) == 0, f"sessions left after close(): {where}"
            return
        for conn in run.held:
            if conn not in run.given_back:
                try:
                    pool.putconn(conn)
                except PoolError:
                    pass
        assert wait_for_sessions(admin, app_name, MAXCONN, 2, at_most=True) <= MAXCONN, f"over maxconn: {where}"
        timeout = {"timeout": 1} if pool_cls is ThreadSafeConnectionPool else {}
        try:
            lent = [pool.getconn(**timeout) for _ in range(MAXCONN)]
        except PoolError as exc:
            raise AssertionError(f"cannot lend maxconn={MAXCONN} at once ({exc}): {where}") from None
        assert len({conn.info.backend_pid for conn in lent}) == MAXCONN, f"two holders share a backend: {where}"
        for conn in lent:
            assert not conn.closed and conn.get_transaction_status() == IDLE, f"lent in a transaction: {where}"
        with lent[0].cursor() as cur:
            cur.execute("SELECT count(*) FROM sweep_items WHERE tag = -1")
            assert cur.fetchone()[0] == 0, f"uncommitted work was committed: {where}"
            if run.rows_tag is not None:
                cur.execute("SELECT count(*) FROM sweep_items WHERE tag = %s", (run.rows_tag,))
                assert cur.fetchone()[0] in (0, run.rows_all), f"half committed: {where}"
            if tracer.fired_at is None and run.rows_tag is not None:
                cur.execute("SELECT count(*) FROM sweep_items WHERE tag = %s", (run.rows_tag,))
                assert cur.fetchone()[0] == run.rows_all, "the uninterrupted run did not commit"
        lent[0].rollback()
        assert wait_for_sessions(admin, app_name, MAXCONN, 2, at_most=True) <= MAXCONN, f"over maxconn: {where}"
        for conn in lent:
            pool.putconn(conn)
        pool.close()
        assert wait_for_sessions(admin, app_name, 0) == 0, f"sessions left after close(): {where}"

    calls = sweep(make_pool, setup, op, check, c_calls=where == "c-calls")
    assert calls > 1
