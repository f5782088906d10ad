"""The embedded PostgreSQL itself: who runs it, what it touches, and that a failed start leaves nothing.

Each test starts a small server of its own (about 1.5 s), so they do not disturb the session's server.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import psycopg2
import pytest

from .embedded_pg import EmbeddedPostgres, _install_dir, _site_dir

as_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="what the embedded server does as root")


def _ownership_and_modes_above(path: Path) -> list[tuple[str, int, int, int]]:
    return [(str(p), p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode)) for p in [path, *path.parents]]


def test_a_start_that_fails_leaves_no_temporary_directory():
    server = EmbeddedPostgres(pgpool_no_such_setting=1)
    with pytest.raises(RuntimeError, match="pg_ctl failed"):
        with server:
            pass
    assert not server.base.exists(), f"{server.base} left behind"


def test_an_initdb_that_fails_leaves_no_temporary_directory(monkeypatch):
    monkeypatch.setenv("LC_ALL", "pgpool_no_such_locale")  # initdb refuses an unknown locale
    server = EmbeddedPostgres()
    with pytest.raises(RuntimeError, match="initdb failed"):
        with server:
            pass
    assert not server.base.exists(), f"{server.base} left behind"


def test_the_server_runs_as_us_or_as_nobody_as_root_and_changes_nothing_outside_its_directory():
    binaries = _install_dir(_site_dir()) / "bin" / "postgres"
    before = _ownership_and_modes_above(binaries)
    with EmbeddedPostgres() as server:
        conn = psycopg2.connect(server.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        finally:
            conn.close()
        owner = (server.pgdata / "postmaster.pid").stat().st_uid
        expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert owner == expected, f"server runs as uid {owner}, expected {expected}"
        if os.geteuid() == 0:
            assert stat.S_IMODE(server.base.stat().st_mode) == 0o700
    assert not server.base.exists()
    assert _ownership_and_modes_above(binaries) == before


@as_root_only
def test_as_root_without_the_server_user_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("PGPOOL_EMBEDDED_PG_USER", "pgpool_no_such_user")
    with pytest.raises(RuntimeError, match="no user 'pgpool_no_such_user' to run it as: run as an ordinary user"):
        EmbeddedPostgres()
