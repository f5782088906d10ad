"""PgBouncer in transaction pooling mode in front of a test server, on loopback.

Command line, used by .ci/run::

    python tests/pgbouncer.py run -- python -m pytest -m pgbouncer

reads the upstream server from PGPOOL_DSN (or PGPOOL_TEST_DSN), starts ``pgbouncer`` (the Debian
package) on a free 127.0.0.1 port in front of it, runs the command with PGPOOL_TEST_DSN pointing at
PgBouncer, and stops PgBouncer afterwards. PgBouncer refuses to run as root, so as root it runs as an
unprivileged user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import psycopg2.extensions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    def __init__(self, upstream_dsn: str, pool_size: int = 20) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(binary):
            raise RuntimeError("pgbouncer is not installed (Debian package: pgbouncer)")
        self.binary = binary
        self.upstream = psycopg2.extensions.parse_dsn(upstream_dsn)
        self.port = _free_port()
        self.pool_size = pool_size
        self.dir = Path(tempfile.mkdtemp(prefix="pgpool-bouncer-"))
        self.dir.chmod(0o777)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        dbname = self.upstream.get("dbname", "postgres")
        user = self.upstream.get("user") or pwd.getpwuid(os.getuid()).pw_name
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        up = self.upstream
        dbname = up.get("dbname", "postgres")
        user = up.get("user") or pwd.getpwuid(os.getuid()).pw_name
        target = f"host={up.get('host', '127.0.0.1')} port={up.get('port', '5432')} dbname={dbname} user={user}"
        config = self.dir / "pgbouncer.ini"
        config.write_text(
            f"""[databases]
{dbname} = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 500
ignore_startup_parameters = extra_float_digits,options
logfile = {self.dir}/pgbouncer.log
pidfile = {self.dir}/pgbouncer.pid
"""
        )
        command = [self.binary, str(config)]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                psycopg2.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        log = (self.dir / "pgbouncer.log").read_text() if (self.dir / "pgbouncer.log").exists() else ""
        self.stop()
        raise RuntimeError(f"pgbouncer did not start:\n{log[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: pgbouncer.py run -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    upstream = os.environ.get("PGPOOL_DSN") or os.environ.get("PGPOOL_TEST_DSN")
    if not upstream:
        print("set PGPOOL_DSN to the server PgBouncer should front", file=sys.stderr)
        return 2
    bouncer = PgBouncer(upstream)
    bouncer.start()
    try:
        print(f"pgbouncer (transaction mode) on 127.0.0.1:{bouncer.port} in front of the test server")
        return subprocess.call(argv[2:], env=dict(os.environ, PGPOOL_TEST_DSN=bouncer.dsn, PGPOOL_BEHIND_PGBOUNCER="1"))
    finally:
        bouncer.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
