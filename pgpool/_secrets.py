"""Keep passwords out of what pgpool says: log records, reprs and error messages."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import psycopg2.extensions

_MASK = "********"
_URL_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]*)@")
_KV_PASSWORD = re.compile(r"""\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)""")


def find_secrets(connect_kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    """List every password that the connection settings could reveal, in every spelling."""
    found: set[str] = set()
    password = connect_kwargs.get("password")
    if password:
        found.add(str(password))
    dsn = str(connect_kwargs.get("dsn") or "")
    try:
        parsed = psycopg2.extensions.parse_dsn(dsn) if dsn else {}
    except psycopg2.ProgrammingError:
        parsed = {}  # an invalid dsn still gets scanned below
    if parsed.get("password"):
        found.add(parsed["password"])
    for match in _URL_PASSWORD.finditer(dsn):
        found.update((match.group(1), unquote(match.group(1))))
    for match in _KV_PASSWORD.finditer(dsn):
        found.update((match.group(1), match.group(1).strip("'")))
    if os.environ.get("PGPASSWORD"):
        found.add(os.environ["PGPASSWORD"])
    # Longest first, so that a password containing another one is masked whole.
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Return `text` with every secret replaced by a mask."""
    for secret in secrets:
        text = text.replace(secret, _MASK)
    return text
