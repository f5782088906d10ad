"""@with_connection / @with_transaction on functions, methods, classmethods, staticmethods, generators."""

from __future__ import annotations

import inspect

import psycopg2
import pytest

from pgpool import ConnectionPool, PoolError, ThreadSafeConnectionPool, with_connection, with_transaction

from .helpers import rows

pytestmark = pytest.mark.pgbouncer


@pytest.fixture
def pool(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=2, dsn=dsn) as p:
        yield p


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


class Boom(Exception):
    pass


def test_function_receives_a_borrowed_connection_that_is_returned(pool):
    @with_connection(pool)
    def pid(conn):
        assert conn in pool.connections_in_use
        return backend_pid(conn)

    assert pid() > 0
    assert pool.stats()["in_use"] == 0 and pool.stats()["checkouts"] == 1


def test_with_connection_rolls_back_uncommitted_work(pool, admin, table):
    @with_connection(pool)
    def add(value, conn):
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))

    add(1)
    assert rows(admin, table) == []


def test_with_transaction_commits_on_return_and_rolls_back_on_raise(pool, admin, table):
    @with_transaction(pool)
    def add(value, conn, fail=False):
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
        if fail:
            raise Boom

    add(1)
    with pytest.raises(Boom):
        add(2, fail=True)
    assert rows(admin, table) == [1]
    assert pool.stats()["in_use"] == 0


def test_decorated_call_inside_a_borrow_joins_it(pool, admin, table):
    @with_transaction(pool)
    def add(value, conn):
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
        return conn

    with pool.transaction() as outer:
        assert add(1) is outer  # joined: a savepoint of the outer transaction
        assert rows(admin, table) == []
    assert rows(admin, table) == [1]
    assert pool.stats()["checkouts"] == 1


def test_nested_decorated_calls_share_one_connection(pool):
    @with_connection(pool)
    def inner(conn):
        return conn

    @with_connection(pool)
    def outer(conn):
        return conn, inner()

    a, b = outer()
    assert a is b


def test_explicit_connection_is_used_as_is_and_never_returned(pool, dsn, admin, table):
    @with_transaction(pool)
    def add(value, conn):
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
        return conn

    mine = psycopg2.connect(dsn)
    try:
        assert add(1, conn=mine) is mine
        assert add(2, mine) is mine  # positionally too
        assert rows(admin, table) == []  # the caller owns its transaction
        assert mine.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        assert pool.stats()["checkouts"] == 0
        mine.commit()
        assert rows(admin, table) == [1, 2]
    finally:
        mine.close()


@pytest.mark.parametrize("bad", ["not a connection", 3])
def test_a_bad_explicit_connection_gets_a_clear_type_error(pool, bad):
    @with_connection(pool)
    def work(conn):
        return conn

    with pytest.raises(TypeError, match=r"work\(\) got .* for 'conn': expected a psycopg2 connection"):
        work(conn=bad)


def test_a_closed_explicit_connection_is_refused(pool, dsn):
    @with_connection(pool)
    def work(conn):
        return conn

    closed = psycopg2.connect(dsn)
    closed.close()
    with pytest.raises(ValueError, match="closed connection"):
        work(conn=closed)


def test_argname_names_another_parameter(pool):
    @with_connection(pool, argname="db")
    def work(x, *, db):
        return x, db

    x, db = work(1)
    assert x == 1 and isinstance(db, psycopg2.extensions.connection)


def test_pool_may_be_a_factory_resolved_at_call_time(dsn):
    holder: dict[str, ConnectionPool] = {}

    @with_connection(lambda: holder["pool"])
    def pid(conn):
        return backend_pid(conn)

    with ThreadSafeConnectionPool(minconn=0, dsn=dsn) as created_later:
        holder["pool"] = created_later
        assert pid() > 0
        assert created_later.stats()["checkouts"] == 1


def test_a_factory_returning_something_else_is_a_type_error():
    @with_connection(lambda: "nope")
    def work(conn):
        return conn

    with pytest.raises(TypeError, match="not a pgpool pool"):
        work()


def test_methods_classmethods_and_staticmethods_get_a_connection(pool):
    class Dao:
        @with_connection(pool)
        def method(self, x, conn):
            return self, x, conn

        @with_connection(pool)
        @classmethod
        def cls_first(cls, x, conn):
            return cls, x, conn

        @classmethod
        @with_connection(pool)
        def cls_inner(cls, x, conn):
            return cls, x, conn

        @with_connection(pool)
        @staticmethod
        def static(x, conn):
            return x, conn

    dao = Dao()
    me, x, conn = dao.method(1)
    assert me is dao and x == 1 and isinstance(conn, psycopg2.extensions.connection)
    assert Dao.method(dao, 2)[1] == 2
    assert Dao.cls_first(3)[:2] == (Dao, 3)
    assert Dao.cls_inner(4)[:2] == (Dao, 4)
    assert dao.static(5)[0] == 5 and Dao.static(6)[0] == 6
    assert pool.stats()["in_use"] == 0
    explicit = pool.getconn()
    try:
        assert dao.method(7, explicit)[2] is explicit
        assert Dao.cls_first(8, explicit)[2] is explicit
        assert Dao.static(9, explicit)[1] is explicit
    finally:
        pool.putconn(explicit)


def test_names_docstrings_and_signatures_are_kept(pool):
    @with_transaction(pool)
    def find_user(user_id: int, conn=None) -> str:
        """Find a user."""
        return "x"

    assert find_user.__name__ == "find_user"
    assert find_user.__doc__ == "Find a user."
    signature = inspect.signature(find_user)
    assert list(signature.parameters) == ["user_id", "conn"]
    assert signature == inspect.signature(find_user.__wrapped__)
    assert signature.return_annotation in (str, "str")


def test_generator_keeps_its_connection_until_exhausted(pool):
    @with_connection(pool)
    def numbers(n, conn):
        for i in range(n):
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (i,))
                yield cur.fetchone()[0]

    gen = numbers(3)
    assert pool.stats()["in_use"] == 0  # nothing borrowed before the first step
    assert next(gen) == 0
    assert pool.stats()["in_use"] == 1
    assert list(gen) == [1, 2]
    assert pool.stats()["in_use"] == 0


def test_generator_closed_early_returns_its_connection(pool):
    @with_connection(pool)
    def numbers(conn):
        yield from range(10)

    gen = numbers()
    assert next(gen) == 0
    gen.close()
    assert pool.stats()["in_use"] == 0


def test_transactional_generator_closed_early_rolls_back(pool, admin, table):
    @with_transaction(pool)
    def insert_all(values, conn):
        for value in values:
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
            yield value

    gen = insert_all([1, 2, 3])
    assert next(gen) == 1
    gen.close()  # abandoned half-way: nothing is committed
    assert rows(admin, table) == []
    assert list(insert_all([4, 5])) == [4, 5]  # exhausted: committed
    assert rows(admin, table) == [4, 5]
    assert pool.stats()["in_use"] == 0


def test_generator_borrow_does_not_leak_into_the_code_iterating_it(pool):
    @with_connection(pool)
    def conns(conn):
        yield conn
        yield conn

    gen = conns()
    theirs = next(gen)
    with pool.connection() as mine:  # between two steps: not inside the generator's borrow
        assert mine is not theirs
    gen.close()


def test_generator_exception_thrown_in_reaches_the_body_and_rolls_back(pool, admin, table):
    @with_transaction(pool)
    def writer(conn):
        while True:
            value = yield
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))

    gen = writer()
    next(gen)
    gen.send(1)
    with pytest.raises(Boom):
        gen.throw(Boom())
    assert rows(admin, table) == []
    assert pool.stats()["in_use"] == 0


def test_function_without_the_connection_parameter_is_refused_at_decoration(pool):
    with pytest.raises(TypeError, match=r"no_conn\(\) must declare a parameter 'conn'"):

        @with_connection(pool)
        def no_conn(x):
            return x

    with pytest.raises(TypeError, match="must declare a parameter 'db'"):

        @with_transaction(pool, argname="db")
        def other_name(conn):
            return conn

    with pytest.raises(TypeError, match="must declare"):

        @with_connection(pool)
        def positional_only(conn, /):
            return conn


def test_async_functions_are_refused_at_decoration(pool):
    with pytest.raises(TypeError, match=r"fetch\(\) is async"):

        @with_connection(pool)
        async def fetch(conn):
            return conn


def test_a_pool_that_is_neither_a_pool_nor_callable_is_refused():
    with pytest.raises(TypeError, match="expected a pgpool pool"):
        with_connection(42)  # type: ignore[arg-type]


def test_decorated_call_on_an_exhausted_pool_raises_pool_error(dsn):
    with ConnectionPool(minconn=0, maxconn=1, dsn=dsn) as single:

        @with_connection(single)
        def work(conn):
            return conn

        held = single.getconn()
        with pytest.raises(PoolError):
            work()
        single.putconn(held)
        assert work() is held
