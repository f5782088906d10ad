"""One libpq read that psycopg2 makes slow: the session's client encoding as the server last said it.

A borrower's SQL ``SET client_encoding`` changes the server's encoding but not psycopg2's idea of it
(``conn.encoding``), so every return must look. ``conn.get_parameter_status`` decodes the value with
a codec written in Python (half a microsecond); libpq's ``PQclientEncoding`` returns the encoding as a
number, kept up to date from the server's ParameterStatus messages. It is called through ctypes'
`PyDLL`, which keeps the GIL: a plain read of a field, no I/O. Where libpq cannot be found this way,
the slow read is used.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import psycopg2._psycopg
import psycopg2.extensions

Connection = psycopg2.extensions.connection


def _find() -> Callable[[int | None], int] | None:
    try:
        # psycopg2's own module links libpq: looking the symbol up through it finds that very libpq.
        function = ctypes.PyDLL(psycopg2._psycopg.__file__).PQclientEncoding
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p]
    return function


# PQclientEncoding(conn.pgconn_ptr): a number, -1 for a closed connection (pgconn_ptr None).
PQclientEncoding = _find()


def client_encoding(conn: Connection) -> object:
    """The session's client encoding as libpq knows it (a number; a name where libpq is not found)."""
    if PQclientEncoding is not None:
        return PQclientEncoding(conn.pgconn_ptr)
    return conn.get_parameter_status("client_encoding")
