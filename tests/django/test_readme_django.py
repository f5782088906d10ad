"""README's Django section: its snippets run, in order, in a Django process of their own.

README's own script (tests/test_readme.py) cannot configure Django, so the section's blocks are
fenced ``python notest`` there and run here: the settings block configures Django (pointed at the
session's server), the others run after it.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("django")

from .support import ROOT, run_django


def django_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Django\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python notest\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)


def test_the_section_has_its_blocks_and_they_compile():
    blocks = django_blocks()
    assert len(blocks) == 4, blocks  # settings, a worker thread, the gevent config, stats and otel
    for number, block in enumerate(blocks, 1):
        compile(block, f"README Django block {number}", "exec")


def test_the_snippets_run_against_a_configured_django(base_dsn, app_name):
    blocks = django_blocks()
    result = run_django(
        f"""
import json

import django
import psycopg2.extensions
from django.conf import settings

import pgpool

blocks = json.loads({json.dumps(json.dumps(blocks))})
namespace = {{}}
exec(blocks[0], namespace)
databases = namespace["DATABASES"]
server = psycopg2.extensions.parse_dsn({base_dsn!r})
default = databases["default"]
default.update(NAME=server.get("dbname", "postgres"), HOST=server.get("host", ""), PORT=server.get("port", ""),
               USER=server.get("user", ""), PASSWORD=server.get("password", ""))
default["OPTIONS"]["application_name"] = {app_name!r}
apps = [app for app in namespace["INSTALLED_APPS"] if app is not Ellipsis]
settings.configure(DATABASES=databases, INSTALLED_APPS=apps, USE_TZ=True)
django.setup()
for block in blocks[1:]:
    exec(block, namespace)
from django.db import connection

pool = connection.pool
print(json.dumps({{
    "options": [pool.minconn, pool.maxconn, pool.timeout, pool.max_lifetime, pool.leak_timeout],
    "checked": pool.check is pgpool.check_connection,
    "in_use": pool.stats()["in_use"],
    "instrumented": namespace["instrumentation"] is not None,
    "post_fork": callable(namespace["post_fork"]),
}}))
namespace["instrumentation"].uninstrument()
"""
    )
    assert result == {
        "options": [2, 10, 5.0, 1800, 60],
        "checked": True,
        "in_use": 0,
        "instrumented": True,
        "post_fork": True,
    }, result
