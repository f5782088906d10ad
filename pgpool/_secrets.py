"""Keep passwords out of what pgpool says: log records, reprs and error messages."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import psycopg2.extensions

_MASK = "********"
# URL userinfo: everything between "user:" and the last "@" of the URL is the password (libpq wants
# "@" percent-encoded in it, but an invalid URL may hold anything, spaces included).
_URL_PASSWORD = re.compile(r"\w+://[^:/@\s]*:([^\n]*)@")
_QUERY_PASSWORD = re.compile(r"[?&]password=([^&\n]*)")
# key=value: a quoted value may hold spaces and escaped quotes; an unquoted one ends at white space.
_KV_PASSWORD = re.compile(r"""\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)""")
# What someone may have meant as an unquoted password with spaces: libpq ends the value at the first
# space and then complains about the next word, quoting it. Everything up to the next "key=".
_KV_PASSWORD_SPAN = re.compile(r"\bpassword\s*=\s*([^'\s][^=]*?)(?=\s+\w+\s*=|\s*$)")


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
    for pattern in (_URL_PASSWORD, _QUERY_PASSWORD):
        for match in pattern.finditer(dsn):
            value = match.group(1)
            found.update((value, unquote(value)))
    for match in _KV_PASSWORD.finditer(dsn):
        value = match.group(1)
        inner = value[1:-1] if value.startswith("'") and value.endswith("'") and len(value) > 1 else value
        found.update((value, inner, re.sub(r"\\(.)", r"\1", inner)))
    for match in _KV_PASSWORD_SPAN.finditer(dsn):
        span = match.group(1)
        found.add(span)
        found.update(word for word in span.split() if len(word) >= 3)
    if os.environ.get("PGPASSWORD"):
        found.add(os.environ["PGPASSWORD"])
    # Longest first, so that a password containing another one is masked whole.
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Return `text` with every secret replaced by a mask."""
    for secret in secrets:
        text = text.replace(secret, _MASK)
    return text
