"""Property-based: random sequences of getconn / putconn / clear / close / server kills against a model."""

from __future__ import annotations

import time

import psycopg2
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from pgpool import ConnectionPool, PoolClosed, PoolError
from pgpool._records import PROBE_INTERVAL

pytestmark = pytest.mark.faults

MAXCONN = 3


def must_raise(exc_type, call, *args) -> BaseException:
    """pytest.raises' failure is a BaseException that Hypothesis lets through unshrunk: plain assert."""
    try:
        call(*args)
    except exc_type as exc:
        return exc
    raise AssertionError(f"{getattr(call, '__name__', call)} did not raise {exc_type.__name__}")


def test_pool_matches_its_model_under_random_operations(dsn, terminate, sessions):
    class PoolMachine(RuleBasedStateMachine):
        """The model: which connections are lent, whether the pool is closed."""

        def __init__(self) -> None:
            super().__init__()
            self.pool = ConnectionPool(minconn=1, maxconn=MAXCONN, dsn=dsn)
            self.lent: list[psycopg2.extensions.connection] = []
            self.returned: list[psycopg2.extensions.connection] = []
            self.closed = False

        @rule()
        def getconn(self) -> None:
            if self.closed:
                must_raise(PoolClosed, self.pool.getconn)
            elif len(self.lent) >= MAXCONN:
                assert "exhausted" in str(must_raise(PoolError, self.pool.getconn))
            else:
                conn = self.pool.getconn()
                assert conn not in self.lent, "lent twice"
                assert not conn.closed
                with conn.cursor() as cur:  # a lent connection works, whatever happened before
                    cur.execute("SELECT 1")
                self.lent.append(conn)

        @precondition(lambda self: self.lent)
        @rule(data=st.data(), state=st.sampled_from(["clean", "in transaction", "failed transaction", "closed"]))
        def putconn(self, data: st.DataObject, state: str) -> None:
            conn = data.draw(st.sampled_from(self.lent))
            if state == "in transaction":
                conn.cursor().execute("SELECT 1")
            elif state == "failed transaction":
                must_raise(psycopg2.Error, conn.cursor().execute, "SELECT 1/0")
            elif state == "closed":
                conn.close()
            self.pool.putconn(conn)
            self.lent.remove(conn)
            self.returned.append(conn)
            if not conn.closed:
                assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE

        @precondition(lambda self: self.returned)
        @rule(data=st.data())
        def putconn_again_is_refused(self, data: st.DataObject) -> None:
            conn = data.draw(st.sampled_from(self.returned))
            if conn in self.lent:
                return  # lent again since: a legitimate return
            before = self.pool.stats()
            must_raise(PoolError, self.pool.putconn, conn)
            after = self.pool.stats()
            assert (after["idle"], after["in_use"]) == (before["idle"], before["in_use"])

        @rule()
        def putconn_foreign_is_refused(self) -> None:
            foreign = psycopg2.connect(dsn)
            try:
                must_raise(PoolError, self.pool.putconn, foreign)
                assert not foreign.closed
            finally:
                foreign.close()

        @precondition(lambda self: self.lent)
        @rule(data=st.data())
        def server_kills_a_lent_connection(self, data: st.DataObject) -> None:
            conn = data.draw(st.sampled_from(self.lent))
            terminate(conn)
            must_raise(psycopg2.OperationalError, conn.cursor().execute, "SELECT 1")
            self.pool.putconn(conn)  # never raises for a broken connection
            self.lent.remove(conn)
            assert conn.closed

        @rule()
        def server_kills_the_idle_connections(self) -> None:
            for conn in list(self.pool.idle_connections):
                terminate(conn)
            # The documented probe rule (README, PROBE_INTERVAL): a connection that made a round trip
            # less than PROBE_INTERVAL ago is lent without a probe, so one killed inside that window
            # may be lent dead. The model lends only after the window, as any real kill is seen.
            time.sleep(2 * PROBE_INTERVAL)

        @rule()
        def clear(self) -> None:
            self.pool.clear()
            assert not self.pool.idle_connections

        @rule()
        def close(self) -> None:
            self.pool.close()
            self.closed = True

        @invariant()
        def counts_match_the_model(self) -> None:
            stats = self.pool.stats()
            assert stats["in_use"] == len(self.lent)
            assert stats["idle"] + stats["in_use"] + stats["opening"] <= MAXCONN
            assert stats["waiting"] == 0  # ("opening" may not be 0: the housekeeper refills minconn)
            if self.closed:
                assert stats["idle"] == 0

        def teardown(self) -> None:
            for conn in list(self.lent):
                self.pool.putconn(conn)
            self.pool.close()
            assert sessions(expect=0) == 0, "connections left open on the server"

    run_state_machine_as_test(
        PoolMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
