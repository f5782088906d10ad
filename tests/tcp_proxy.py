"""A loopback TCP proxy for fault injection and the cold-burst benchmark.

``TcpProxy(upstream_port, connect_delay=0.05)`` listens on 127.0.0.1 and forwards every connection
to the upstream port on 127.0.0.1, after waiting ``connect_delay`` seconds for each new one (a slow
network or a TLS handshake, without a slow server). ``blackhole()`` makes it stop forwarding in
both directions while keeping every socket open (a network that stops answering); ``heal()`` ends
that. Loopback only, by construction: it never connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time


class TcpProxy:
    def __init__(self, upstream_port: int, connect_delay: float = 0.0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.connect_delay = connect_delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.accepted = 0
        self._spawn(self._accept_loop)

    def host_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def blackhole(self) -> None:
        """Stop forwarding: bytes sent either way are swallowed, nothing is closed."""
        self._forwarding.clear()

    def heal(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self._stopped.set()
        self._forwarding.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in [self._listener, *sockets]:
            try:
                sock.close()
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, daemon=True, name="tcp-proxy")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._spawn(self._connect, client)

    def _connect(self, client: socket.socket) -> None:
        if self.connect_delay:
            time.sleep(self.connect_delay)
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.settimeout(0.2)
        with self._lock:
            self._sockets.extend((client, upstream))
        self._spawn(self._pump, client, upstream)
        self._pump(upstream, client)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if not self._forwarding.is_set():
                continue  # blackholed: swallow
            try:
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
