"""The failover rules (pgpool._failover): which errors evict, which servers are unwanted, how a server
is named. Real errors and real parameter statuses from the test server where it can produce them; the
rest (a standby, a server shutting down) from hand-built errors and stand-in connections, and for real
in tests/faults/test_failover.py."""

from __future__ import annotations

from types import SimpleNamespace

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from pgpool._failover import TARGET_SESSION_ATTRS, ServerTarget, eviction_reason, server_of

from .helpers import closed_port


def _error_of(conn: psycopg2.extensions.connection, sql: str) -> psycopg2.Error:
    with conn.cursor() as cur:
        try:
            cur.execute(sql)
        except psycopg2.Error as exc:
            conn.rollback()
            return exc
    raise AssertionError(f"{sql!r} did not fail")


class _Info:
    """What a connection knows of its server, for a server the test cannot have (a standby, PG 13)."""

    def __init__(self, host: str | None = "127.0.0.1", port: int | None = 5432, **params: str) -> None:
        self.host, self.port, self._params = host, port, params

    def parameter_status(self, name: str) -> str | None:
        return self._params.get(name)


def _conn(host: str | None = "127.0.0.1", port: int | None = 5432, **params: str) -> SimpleNamespace:
    return SimpleNamespace(info=_Info(host, port, **params))


@pytest.fixture
def conn(dsn: str):
    c = psycopg2.connect(dsn)
    yield c
    c.close()


@pytest.fixture
def reports_standby_status(conn) -> None:
    if conn.info.parameter_status("in_hot_standby") is None:
        pytest.skip("the server does not report in_hot_standby (PostgreSQL before 14, or a proxy)")


# eviction_reason


def test_a_write_in_a_read_only_transaction_is_an_eviction_sign(conn, table):
    exc = _error_of(conn, f"SET TRANSACTION READ ONLY; INSERT INTO {table} VALUES (1)")
    assert exc.pgcode == "25006"
    assert eviction_reason(exc) == "read-only transaction (SQLSTATE 25006)"


def test_a_session_made_read_only_gives_the_same_sign(conn, table):
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET default_transaction_read_only = on")
    conn.autocommit = False
    reason = eviction_reason(_error_of(conn, f"INSERT INTO {table} VALUES (1)"))
    assert reason is not None and "25006" in reason


def test_the_reason_does_not_quote_the_server_message(conn, table):
    """The message may quote the application's data; the reason names only the SQLSTATE."""
    exc = _error_of(conn, f"SET TRANSACTION READ ONLY; INSERT INTO {table} VALUES (1)")
    reason = eviction_reason(exc)
    assert reason is not None and table not in reason and "INSERT" not in reason


@pytest.mark.parametrize(
    ("error_class", "sqlstate"),
    [
        (psycopg2.errors.AdminShutdown, "57P01"),
        (psycopg2.errors.CrashShutdown, "57P02"),
        (psycopg2.errors.CannotConnectNow, "57P03"),
        (psycopg2.errors.ReadOnlySqlTransaction, "25006"),
    ],
)
def test_shutdown_and_startup_errors_are_eviction_signs(error_class, sqlstate):
    """Built by hand (no pgcode): the class stands for its SQLSTATE. A real server rarely gets these
    through psycopg2, which mostly reports a shutdown as a plain closed connection."""
    reason = eviction_reason(error_class("terminating connection due to administrator command"))
    assert reason is not None and reason.endswith(f"(SQLSTATE {sqlstate})")


def test_feature_not_supported_evicts_only_for_recovery():
    recovery = psycopg2.errors.FeatureNotSupported("cannot set transaction read-write mode during recovery")
    assert eviction_reason(recovery) == "server in recovery, cannot write (SQLSTATE 0A000)"


def test_another_feature_not_supported_error_is_no_sign(conn):
    exc = _error_of(
        conn, "CREATE TEMP TABLE parted (a int, b int) PARTITION BY RANGE (a); ALTER TABLE parted ADD UNIQUE (b)"
    )
    assert exc.pgcode == "0A000"
    assert eviction_reason(exc) is None


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",  # syntax error
        "SELECT 1 / 0",  # division by zero
        "SELECT * FROM pgpool_no_such_table",  # undefined table
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT 1; SET TRANSACTION READ WRITE; SELECT 'x'::int",
    ],
)
def test_ordinary_errors_are_no_sign(conn, sql):
    assert eviction_reason(_error_of(conn, sql)) is None


def test_errors_that_are_not_the_drivers_are_no_sign():
    assert eviction_reason(None) is None
    assert eviction_reason(ValueError("cannot execute INSERT in a read-only transaction")) is None
    assert eviction_reason(psycopg2.OperationalError("server closed the connection unexpectedly")) is None
    assert eviction_reason(KeyboardInterrupt()) is None


def _wrapped(inner: BaseException, levels: int, by_cause: bool) -> BaseException:
    exc = inner
    for n in range(levels):
        outer = RuntimeError(f"application error {n}")
        if by_cause:
            outer.__cause__ = exc
        else:
            outer.__context__ = exc
        exc = outer
    return exc


@pytest.mark.parametrize("by_cause", [True, False], ids=["raise-from", "raise-in-except"])
def test_an_error_wrapped_by_the_application_still_counts_two_levels_down(conn, table, by_cause):
    exc = _error_of(conn, f"SET TRANSACTION READ ONLY; INSERT INTO {table} VALUES (1)")
    assert eviction_reason(_wrapped(exc, 1, by_cause)) == eviction_reason(exc)
    assert eviction_reason(_wrapped(exc, 2, by_cause)) == eviction_reason(exc)
    assert eviction_reason(_wrapped(exc, 3, by_cause)) is None


def test_a_real_raise_from_is_followed(conn, table):
    try:
        try:
            with conn.cursor() as cur:
                cur.execute(f"SET TRANSACTION READ ONLY; INSERT INTO {table} VALUES (1)")
        except psycopg2.Error as exc:
            raise LookupError("could not save the order") from exc
    except LookupError as wrapped:
        assert eviction_reason(wrapped) == "read-only transaction (SQLSTATE 25006)"
    conn.rollback()


def test_a_cycle_in_the_chain_ends():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert eviction_reason(a) is None


# ServerTarget: reading the settings


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        ({"dsn": ""}, "any"),
        ({"dsn": "host=a,b port=1,2 target_session_attrs=read-write"}, "read-write"),
        ({"dsn": "postgresql://a:1,b:2/db?target_session_attrs=primary"}, "primary"),
        ({"dsn": "host=a", "target_session_attrs": "standby"}, "standby"),
        ({"dsn": "target_session_attrs=read-write", "target_session_attrs": "prefer-standby"}, "prefer-standby"),
        ({"dsn": "", "target_session_attrs": None}, "any"),
        ({"dsn": "dbname=x", "host": "a", "connection_factory": None, "cursor_factory": None}, "any"),
    ],
)
def test_target_comes_from_the_dsn_and_keywords_as_libpq_reads_them(kwargs, want, monkeypatch):
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    assert ServerTarget(kwargs).attrs == want


def test_the_environment_variable_counts_only_when_the_settings_say_nothing(monkeypatch):
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "read-only")
    assert ServerTarget({"dsn": "host=a"}).attrs == "read-only"
    assert ServerTarget({"dsn": "host=a target_session_attrs=primary"}).attrs == "primary"
    assert ServerTarget({"dsn": ""}, environ={}).attrs == "any"


@pytest.mark.parametrize(
    ("attrs", "wants_primary", "checks"),
    [
        ("any", False, False),
        ("read-write", True, True),
        ("primary", True, True),
        ("read-only", False, True),
        ("standby", False, True),
        ("prefer-standby", False, False),
    ],
)
def test_which_targets_check_servers(attrs, wants_primary, checks):
    target = ServerTarget({"dsn": f"target_session_attrs={attrs}"})
    assert (target.wants_primary, target.checks) == (wants_primary, checks)
    assert repr(target) == f"<ServerTarget target_session_attrs={attrs!r}>"
    assert attrs in TARGET_SESSION_ATTRS


@pytest.mark.parametrize("bad", ["readwrite", "Read-Write", "master"])
def test_a_value_libpq_refuses_is_a_value_error_naming_the_setting(bad, monkeypatch):
    with pytest.raises(ValueError, match=rf"target_session_attrs must be one of any, .*\(got '{bad}'\)"):
        ServerTarget({"dsn": f"host=a target_session_attrs={bad}"})
    monkeypatch.setenv("PGTARGETSESSIONATTRS", bad)
    with pytest.raises(ValueError, match="PGTARGETSESSIONATTRS must be one of"):
        ServerTarget({"dsn": "host=a"})


def test_settings_libpq_cannot_parse_are_a_value_error_without_the_password():
    with pytest.raises(ValueError) as caught:
        ServerTarget({"dsn": "host=a password=sekrit99 'unterminated"})
    assert "sekrit99" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


# ServerTarget.unwanted: on the test server (a primary)


def test_a_primary_is_wanted_by_read_write_and_primary_targets(conn, reports_standby_status):
    for attrs in ("read-write", "primary", "any", "prefer-standby"):
        assert ServerTarget({"dsn": f"target_session_attrs={attrs}"}).unwanted(conn) is None
    assert ServerTarget({"dsn": "target_session_attrs=standby"}).unwanted(conn) == (
        "server is a primary (in_hot_standby=off)"
    )
    assert "read-write" in str(ServerTarget({"dsn": "target_session_attrs=read-only"}).unwanted(conn))


def test_a_session_made_read_only_is_unwanted_for_writes_at_once(conn, reports_standby_status):
    """The server reports default_transaction_read_only when it changes: no query needed to see it."""
    read_write = ServerTarget({"dsn": "target_session_attrs=read-write"})
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET default_transaction_read_only = on")
    assert conn.info.parameter_status("default_transaction_read_only") == "on"
    assert read_write.unwanted(conn) == "server is read-only (default_transaction_read_only=on)"
    assert ServerTarget({"dsn": "target_session_attrs=read-only"}).unwanted(conn) is None
    assert ServerTarget({"dsn": "target_session_attrs=primary"}).unwanted(conn) is None  # still a primary
    with conn.cursor() as cur:
        cur.execute("RESET default_transaction_read_only")  # what a pool's reset does
    assert read_write.unwanted(conn) is None


def test_a_closed_connection_is_never_unwanted(conn):
    conn.close()
    for attrs in TARGET_SESSION_ATTRS:
        assert ServerTarget({"dsn": f"target_session_attrs={attrs}"}).unwanted(conn) is None


# ServerTarget.unwanted: servers the test server cannot be


@pytest.mark.parametrize(
    ("attrs", "params", "unwanted"),
    [
        ("read-write", {"in_hot_standby": "on", "default_transaction_read_only": "off"}, "standby"),
        ("read-write", {"in_hot_standby": "off", "default_transaction_read_only": "on"}, "read-only"),
        ("read-write", {"in_hot_standby": "off", "default_transaction_read_only": "off"}, None),
        ("primary", {"in_hot_standby": "on", "default_transaction_read_only": "off"}, "standby"),
        ("primary", {"in_hot_standby": "off", "default_transaction_read_only": "on"}, None),
        ("standby", {"in_hot_standby": "on", "default_transaction_read_only": "off"}, None),
        ("standby", {"in_hot_standby": "off", "default_transaction_read_only": "on"}, "primary"),
        ("read-only", {"in_hot_standby": "on", "default_transaction_read_only": "off"}, None),
        ("read-only", {"in_hot_standby": "off", "default_transaction_read_only": "on"}, None),
        ("prefer-standby", {"in_hot_standby": "off", "default_transaction_read_only": "off"}, None),
        ("any", {"in_hot_standby": "on", "default_transaction_read_only": "on"}, None),
        # Not reported (a server before 14, PgBouncer): never unwanted on a guess.
        ("read-write", {}, None),
        ("primary", {}, None),
        ("standby", {}, None),
        ("read-only", {"in_hot_standby": "off"}, None),
        ("read-write", {"default_transaction_read_only": "on"}, "read-only"),
    ],
)
def test_unwanted_follows_libpqs_own_rules(attrs, params, unwanted):
    reason = ServerTarget({"dsn": f"target_session_attrs={attrs}"}).unwanted(_conn(**params))
    if unwanted is None:
        assert reason is None
    else:
        assert reason is not None and unwanted in reason


# server_of


def test_server_of_names_the_host_libpq_picked(base_dsn):
    params = psycopg2.extensions.parse_dsn(base_dsn)
    host, port = params.get("host", ""), params.get("port", "5432")
    if not host or host.startswith("/") or "," in host:
        pytest.skip("needs a single TCP host in PGPOOL_TEST_DSN")
    multi = psycopg2.extensions.make_dsn(base_dsn, host=f"127.0.0.1,{host}", port=f"{closed_port()},{port}")
    conn = psycopg2.connect(multi)
    try:
        assert server_of(conn) == f"{host}:{port}" == f"{conn.info.host}:{conn.info.port}"
    finally:
        conn.close()


def test_server_of_brackets_ipv6_and_copes_with_what_is_unknown():
    assert server_of(_conn(host="::1", port=5433)) == "[::1]:5433"
    assert server_of(_conn(host="/var/run/postgresql", port=5432)) == "/var/run/postgresql:5432"
    assert server_of(_conn(host=None, port=None)) == "?:?"
