"""A library's manners: a NullHandler, and one log record per event."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pgpool import PoolTimeout, ThreadSafeConnectionPool

from .helpers import closed_port


def test_the_pgpool_logger_has_a_null_handler_so_unconfigured_apps_print_nothing():
    code = (
        "import logging, pgpool;"
        "assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger('pgpool').handlers);"
        "logging.getLogger('pgpool').warning('must not reach stderr')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "must not reach stderr" not in done.stderr


@pytest.mark.timing
def test_a_wait_that_retries_a_failing_connect_logs_the_first_failure_then_a_summary(dsn, caplog):
    caplog.set_level(logging.DEBUG, logger="pgpool")
    with ThreadSafeConnectionPool(minconn=0, dsn=dsn, port=closed_port(), name="down") as pool:
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.8)
        attempts = pool.stats()["connect_errors"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert attempts >= 3
    assert len(warnings) == 1 and "connect failed" in warnings[0], warnings  # not one per retry
    assert not any("couldn't get a connection" in m for m in warnings)  # raised, not also logged
    assert any(f"giving up after {attempts} failed connect attempts" in m for m in infos), infos
