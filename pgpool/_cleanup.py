"""Cleanup that must finish, however often an interrupt lands in it.

pgpool's cleanups (giving back what a failed `getconn` held, finishing a cut-short return, closing
dropped connections) are idempotent, and their callers run them again when an exception lands on
their entry. A storm of signals can also land *inside* the second run, or on the entry of what it
calls: `until_done` runs the cleanup again until one run completes. The loops are nested because
CPython delivers an exception on a loop's back-edge too, outside the ``try`` it loops over: the
inner loop's back-edge is inside the outer ``try``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")

_ATTEMPTS = 1000  # a cleanup that fails this often is broken, not interrupted: its error propagates
# The loops of the call sites, which retry a cleanup whose entry (or the loop's back-edge) an
# interrupt hit: two nested loops over this, each retry a fresh chance.
RETRIES = range(8)


def until_done(cleanup: Callable[P, None]) -> Callable[P, None]:
    """Make an idempotent cleanup run again until one run completes; then raise the first exception
    that interrupted it (a KeyboardInterrupt is delayed until the cleanup is done, never lost)."""

    @functools.wraps(cleanup)
    def finish(*args: P.args, **kwargs: P.kwargs) -> None:
        first: BaseException | None = None
        attempts = 0
        while True:
            try:
                while True:
                    try:
                        cleanup(*args, **kwargs)
                        break
                    except BaseException as exc:
                        attempts += 1
                        first = first or exc
                        if attempts >= _ATTEMPTS:
                            raise
                break
            except BaseException as exc:  # on the inner loop's back-edge
                attempts += 1
                first = first or exc
                if attempts >= _ATTEMPTS:
                    raise
        if first is not None:
            raise first

    return finish
