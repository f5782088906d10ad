"""Threads that die holding a connection, and leaked connections: the capacity comes back."""

from __future__ import annotations

import gc
import threading

import pytest

from pgpool import ThreadSafeConnectionPool

from ..helpers import join_all

pytestmark = pytest.mark.faults


def test_a_thread_that_dies_holding_a_connection_gives_its_slot_back(dsn, sessions):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=5, dsn=dsn) as pool:

        def die_holding() -> None:
            conn = pool.getconn()
            try:
                raise RuntimeError(f"the work on {conn} failed before putconn")
            except RuntimeError:
                return  # the thread ends; its frame, and its reference to conn, go away

        worker = threading.Thread(target=die_holding)
        worker.start()
        join_all([worker])
        conn = pool.getconn(timeout=3)
        assert pool.stats()["in_use"] == 1
        pool.putconn(conn)
        assert sessions(expect=1) == 1


def test_a_leaked_connection_caught_in_a_reference_cycle_is_collected_and_frees_its_slot(dsn):
    with ThreadSafeConnectionPool(minconn=0, maxconn=1, timeout=5, dsn=dsn) as pool:

        class Holder:
            pass

        holder = Holder()
        holder.me = holder  # a cycle: only the cyclic garbage collector frees it
        holder.conn = pool.getconn()
        del holder
        gc.collect()
        assert pool.stats()["in_use"] == 0
        pool.putconn(pool.getconn(timeout=0))
