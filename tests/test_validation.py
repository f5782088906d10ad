"""Issue 11, errors that must not be retried or hidden: a configure error, bad options and NaN reach the
caller at once; no password shows in any error or log record; a conn passed as None borrows."""

from __future__ import annotations

import logging
import time

import psycopg2
import pytest

import pgpool
from pgpool import ConnectionPool, ThreadSafeConnectionPool, with_connection, with_transaction

from .helpers import closed_port

NAN = float("nan")


# -- a configure error reaches the caller at once ---------------------------------------------------


@pytest.mark.timing
def test_a_configure_error_reaches_the_caller_at_once_and_is_not_retried(dsn, sessions):
    calls = []
    broken = [True]

    def configure(conn):
        calls.append(conn)
        if broken[0]:
            raise ValueError("bad configure")

    with ThreadSafeConnectionPool(minconn=0, maxconn=1, dsn=dsn, timeout=2, configure=configure) as pool:
        start = time.monotonic()
        with pytest.raises(ValueError, match="bad configure"):
            pool.getconn()
        elapsed = time.monotonic() - start
        assert elapsed < 1, f"took {elapsed:.2f} s: retried until the timeout"
        assert len(calls) == 1, f"configure called {len(calls)} times"
        assert pool.stats()["in_use"] == 0
        assert pool.stats()["opening"] == 0
        assert sessions(expect=0) == 0
        broken[0] = False
        with pool.connection(timeout=0.5) as conn:  # the only slot is free
            assert conn is calls[-1]


# -- connection keywords are checked at construction, before any connect ----------------------------


@pytest.mark.parametrize(
    ("option", "hint"),
    [("bogus_option", None), ("max_size", "maxconn"), ("pool_size", "maxconn")],
)
def test_an_unknown_connection_keyword_is_refused_at_construction_before_any_connect(
    pool_cls, dsn, monkeypatch, sessions, option, hint
):
    connects = []
    real_connect = psycopg2.connect

    def counting_connect(*args, **kwargs):
        connects.append(kwargs)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg2, "connect", counting_connect)
    with pytest.raises(ValueError, match=option) as info:
        pool_cls(minconn=1, dsn=dsn, **{option: 5})
    assert connects == []
    assert sessions() == 0
    if hint:
        assert hint in str(info.value)


@pytest.mark.parametrize("option", ["bogus_option", "max_size", "pool_size"])
def test_an_unknown_connection_keyword_is_refused_even_when_nothing_would_connect(pool_cls, option):
    """minconn=0 and a port nobody listens on: only a check at construction can catch it."""
    with pytest.raises(ValueError, match=option):
        pool_cls(minconn=0, host="127.0.0.1", port=closed_port(), **{option: 1})


# -- NaN is refused like a negative value ----------------------------------------------------------


@pytest.mark.parametrize("param", ["idle_timeout", "timeout", "max_lifetime", "leak_timeout", "maxconn"])
@pytest.mark.parametrize("value", [NAN, -1.0], ids=["nan", "negative"])
def test_nan_is_refused_like_a_negative_value_naming_the_parameter(dsn, sessions, param, value):
    with pytest.raises(ValueError, match=param):
        ThreadSafeConnectionPool(minconn=0, dsn=dsn, **{param: value})
    assert sessions() == 0


@pytest.mark.parametrize("value", [NAN, -1.0], ids=["nan", "negative"])
def test_a_nan_timeout_per_call_is_refused_naming_the_parameter(pool_cls, dsn, value):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        with pytest.raises(ValueError, match="timeout"):
            pool.getconn(timeout=value)
        with pytest.raises(ValueError, match="timeout"), pool.connection(timeout=value):
            pass
        assert pool.stats()["in_use"] == 0
        with pool.connection() as conn:  # nothing was taken
            assert not conn.closed


# -- passwords never shown -------------------------------------------------------------------------


def assert_hidden(password: str, texts: list[str]) -> None:
    """Neither the password nor any distinctive piece of it (split on blanks) appears anywhere."""
    pieces = {password, *(p for p in password.split() if len(p) >= 4)}
    shown = [(piece, text) for text in texts for piece in pieces if piece in text]
    assert not shown, f"password shown: {shown}"


def error_texts(exc: BaseException) -> list[str]:
    """What a user may see of an error: its text, its repr, and those of the chain a traceback shows."""
    texts = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return texts


# Invalid dsns, each quoting its password in libpq's error message: (dsn, password).
INVALID = {
    "url-spaces": ("postgresql://bob:s3 cr3t pw@[::1/test", "s3 cr3t pw"),
    "url-tab": ("postgresql://bob:Tab\tSecretXyz@[::1/test", "Tab\tSecretXyz"),
    "url-no-user": ("postgresql://:hunter2 swordfish@[::1/test", "hunter2 swordfish"),
    "url-bad-percent": ("postgresql://bob:open %ZZ sesame@127.0.0.1/test", "open %ZZ sesame"),
    "url-bad-percent-plain": ("postgresql://bob:opensesame%ZZ@127.0.0.1/test", "opensesame%ZZ"),
    "query-spaces": ("postgresql://bob@[::1/test?password=s3 cr3t pw", "s3 cr3t pw"),
    "query-bad-percent": ("postgresql://bob@127.0.0.1/test?password=open %ZZ sesame", "open %ZZ sesame"),
    "query-encoded": ("postgresql://bob@[::1/test?password=s3%20cr3t%20pw", "s3%20cr3t%20pw"),
    "keywords-quoted": ("host=127.0.0.1 password='s3 cr3t \\' pw' oops", "s3 cr3t \\' pw"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_dsn_never_shows_its_password(pool_cls, case, caplog):
    dsn, password = INVALID[case]
    caplog.set_level(logging.DEBUG, logger="pgpool")
    with pytest.raises(ValueError, match="invalid dsn") as info:
        pool_cls(minconn=0, name="masked", dsn=dsn)
    assert "'masked'" in str(info.value)
    assert_hidden(password, error_texts(info.value) + [r.getMessage() for r in caplog.records])


# Valid dsns pointing at a server that is down: (dsn with {port}, password in every spelling shown).
UNREACHABLE = {
    "url-percent-encoded": ("postgresql://bob:s3%20cr3t%27pw@127.0.0.1:{port}/test", ["s3%20cr3t%27pw", "s3 cr3t'pw"]),
    "url-spaces": ("postgresql://bob:s3 cr3t pw@127.0.0.1:{port}/test", ["s3 cr3t pw"]),
    "query-param": ("postgresql://bob@127.0.0.1:{port}/test?password=s3%20cr3t%20pw", ["s3%20cr3t%20pw", "s3 cr3t pw"]),
    "keywords-quoted": (
        "host=127.0.0.1 port={port} user=bob password='s3 cr3t \\' pw'",
        ["s3 cr3t \\' pw", "s3 cr3t ' pw"],
    ),
}


@pytest.mark.parametrize("case", list(UNREACHABLE))
def test_a_failed_connect_never_shows_the_password(case, caplog):
    template, passwords = UNREACHABLE[case]
    caplog.set_level(logging.DEBUG, logger="pgpool")
    seen: list[str] = []
    with ThreadSafeConnectionPool(minconn=0, name="masked", dsn=template.format(port=closed_port())) as pool:
        seen.append(repr(pool))
        with pytest.raises(psycopg2.OperationalError) as at_once:
            pool.getconn(timeout=0)
        seen += error_texts(at_once.value)
        with pytest.raises(pgpool.PoolTimeout) as waited:
            pool.getconn(timeout=0.3)
        seen += error_texts(waited.value)
    with pytest.raises(psycopg2.OperationalError) as at_start:
        ThreadSafeConnectionPool(minconn=1, name="masked", dsn=template.format(port=closed_port()))
    seen += error_texts(at_start.value)
    seen += [r.getMessage() for r in caplog.records]
    assert any("connect failed" in s for s in seen)
    for password in passwords:
        assert_hidden(password, seen)


# -- a connection passed as None, by position or by keyword ----------------------------------------


@pytest.mark.parametrize("decorator", [with_connection, with_transaction])
def test_a_positional_none_conn_borrows_like_the_keyword_on_a_function(pool_cls, dsn, decorator):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        calls = []

        @decorator(pool)
        def f(x, conn):
            calls.append((x, conn in pool.connections_in_use))
            return conn.info.backend_pid

        by_keyword = f(1, conn=None)
        by_position = f(1, None)
        assert by_position == by_keyword
        assert calls == [(1, True), (1, True)]
        assert pool.stats()["in_use"] == 0
        assert pool.stats()["checkouts"] == 2


@pytest.mark.parametrize("decorator", [with_connection, with_transaction])
def test_a_positional_none_conn_borrows_like_the_keyword_on_a_method(pool_cls, dsn, decorator):
    with pool_cls(minconn=0, maxconn=1, dsn=dsn) as pool:
        calls = []

        class Dao:
            @decorator(lambda: pool)
            def get(self, x, conn):
                calls.append((x, conn in pool.connections_in_use))
                return conn.info.backend_pid

        dao = Dao()
        by_keyword = dao.get(1, conn=None)
        by_position = dao.get(1, None)
        assert by_position == by_keyword
        assert calls == [(1, True), (1, True)]
        assert pool.stats()["in_use"] == 0
        assert pool.stats()["checkouts"] == 2


# -- psycopg2.pool habits --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ConnectionPool, ThreadSafeConnectionPool])
def test_a_dsn_as_third_positional_argument_is_refused_with_a_hint(cls):
    with pytest.raises(ValueError, match="pass the dsn as dsn="):
        cls(1, 5, "dbname=test")


def test_a_configure_error_at_construction_is_not_retried_even_with_a_timeout(dsn):
    calls = []

    def configure(conn) -> None:
        calls.append(conn.info.backend_pid)
        raise psycopg2.OperationalError("configure says no")  # the class a failed connect raises

    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="configure says no"):
        ThreadSafeConnectionPool(minconn=1, dsn=dsn, timeout=5, configure=configure)
    assert len(calls) == 1 and time.monotonic() - started < 2
