"""Waiting for dropped connections' backends to exit is bounded per batch, not per connection: on a
dead network, drain() and clear() (what one reaches for in a failover) return within about a second."""

from __future__ import annotations

import time

import psycopg2.extensions
import pytest

from pgpool import ThreadSafeConnectionPool

from ..tcp_proxy import TcpProxy

pytestmark = pytest.mark.faults


@pytest.mark.timing
@pytest.mark.parametrize("how", ["drain", "clear"])
def test_dropping_idle_connections_on_a_dead_network_takes_about_a_second_in_all(dsn, how):
    port = int(psycopg2.extensions.parse_dsn(dsn).get("port", 5432))
    with TcpProxy(port) as proxy:
        host, proxy_port = proxy.host_port()
        with ThreadSafeConnectionPool(4, 4, dsn=dsn, host=host, port=proxy_port, timeout=2) as pool:
            conns = [pool.getconn() for _ in range(4)]
            for conn in conns:
                pool.putconn(conn)
            assert pool.stats()["idle"] == 4
            proxy.blackhole()  # no FIN will ever come back: each wait runs to its bound
            begun = time.monotonic()
            getattr(pool, how)()
            took = time.monotonic() - begun
            assert took < 1.8, f"{how}() of 4 idle connections on a dead network took {took:.1f} s"
            proxy.heal()
