"""Small helpers shared by the tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


def closed_port() -> int:
    """A loopback port nobody listens on: connecting there fails like a server that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_all(threads: list[threading.Thread], timeout: float = 60) -> None:
    for t in threads:
        t.join(timeout=timeout)
    alive = [t for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout} s: {alive}"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def rows(admin, table: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The values in `table`, as a connection outside any pool sees them (committed only)."""
    with admin.cursor() as cur:
        cur.execute(f"SELECT v FROM {table} ORDER BY v")
        return [r[0] for r in cur.fetchall()]
