"""Small helpers shared by the tests."""

from __future__ import annotations

import socket
import threading


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
