"""A network that stops answering: packets to and from a loopback proxy port are dropped by the kernel.

A user-space proxy cannot fake this (its kernel still acknowledges every packet), so the test drops
them with iptables, on the loopback interface and that one port only, and removes the rules after.
Needs root and iptables (CI installs it); skips otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import psycopg2
import psycopg2.extensions
import pytest

from pgpool import PoolTimeout, ThreadSafeConnectionPool

from ..tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.timing]

# The libpq settings the README recommends, shortened so that the test is quick.
FAST_FAILURE = {
    "connect_timeout": 2,
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 1500,  # ms: unacknowledged data fails the connection
}


class Blackhole:
    def __init__(self, port: int) -> None:
        self.port = port
        self.rules = [
            ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
            ["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
        ]
        self.active = False

    def __enter__(self) -> Blackhole:
        for rule in self.rules:
            subprocess.run(["iptables", "-I", *rule], check=True, timeout=10)
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()

    def heal(self) -> None:
        if self.active:
            for rule in self.rules:
                subprocess.run(["iptables", "-D", *rule], check=False, timeout=10)
            self.active = False


def _iptables_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return False
    return subprocess.run(["iptables", "-L", "INPUT", "-n"], capture_output=True, timeout=10).returncode == 0


@pytest.fixture
def proxy(base_dsn):
    if not _iptables_usable():
        pytest.skip("drops packets with iptables: needs root and iptables")
    port = int(psycopg2.extensions.parse_dsn(base_dsn).get("port", 5432))
    with TcpProxy(port) as p:
        yield p


def proxied(dsn: str, proxy: TcpProxy) -> str:
    return psycopg2.extensions.make_dsn(dsn, host="127.0.0.1", port=proxy.port)


def test_a_borrower_is_not_stuck_forever_when_the_network_stops_answering(dsn, proxy):
    with ThreadSafeConnectionPool(minconn=1, maxconn=2, timeout=1, dsn=proxied(dsn, proxy), **FAST_FAILURE) as pool:
        with Blackhole(proxy.port):
            started = time.monotonic()
            with pytest.raises(psycopg2.OperationalError), pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            stuck = time.monotonic() - started
            assert stuck < 15, f"the borrower waited {stuck:.1f} s"
            # New connections cannot be made either: the wait is bounded by timeout and connect_timeout.
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                pool.getconn()
            assert time.monotonic() - started < 10
        assert pool.stats()["in_use"] == 0


def test_the_pool_has_its_full_capacity_once_the_network_heals(dsn, proxy):
    with ThreadSafeConnectionPool(minconn=2, maxconn=2, timeout=2, dsn=proxied(dsn, proxy), **FAST_FAILURE) as pool:
        with Blackhole(proxy.port):
            for _ in range(2):
                # The query fails (tcp_user_timeout), or keepalives already killed the idle connection
                # and no new one can be opened in time.
                failures = (psycopg2.OperationalError, PoolTimeout)
                with pytest.raises(failures), pool.connection() as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
        held = [pool.getconn(), pool.getconn()]  # maxconn connections, all working
        for conn in held:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        for conn in held:
            pool.putconn(conn)
        stats = pool.stats()
        assert stats["in_use"] == 0 and stats["idle"] == 2 and stats["opening"] == 0
