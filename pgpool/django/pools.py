"""One pool per database alias per process: created at first use, replaced when its settings change.

The registry is only mutated under `_lock`; pools are built and closed outside it (building one opens
``minconn`` connections). After ``fork`` the child keeps the same pool objects: pgpool resets every
pool in a child, which then opens its own connections and never touches the parent's.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgpool import PoolStats, ThreadSafeConnectionPool

__all__ = ["close_all_pools", "close_pool", "current_pool", "pool_for", "pool_stats"]

Pool = ThreadSafeConnectionPool[Any]


@dataclass(frozen=True)
class _Entry:
    pool: Pool
    signature: object  # compared with ==: what the pool was built from: connect parameters, session setup


_lock = threading.Lock()
_pools: dict[str, _Entry] = {}  # alias -> its current pool (under _lock)
# Who holds a borrowed connection, and in which thread: a thread that ended without closing its
# connection leaves it held by a wrapper that only the garbage collector can free (Django's wrappers
# are reference cycles). See `reclaim_abandoned`.
_holders: dict[int, tuple[threading.Thread, weakref.ref[Any]]] = {}  # id(wrapper) -> its thread, it


def pool_for(alias: str, signature: object, build: Callable[[], Pool]) -> Pool:
    """The alias's pool for these settings: the current one if it was built from equal settings and
    is open, else a new one from `build` (the old one is closed: idle connections now, lent ones as
    they come back)."""
    with _lock:
        entry = _pools.get(alias)
    if entry is not None and not entry.pool.closed and entry.signature == signature:
        return entry.pool
    fresh = build()
    extra: Pool | None
    with _lock:
        current = _pools.get(alias)
        if current is not None and current is not entry and not current.pool.closed and current.signature == signature:
            keep, extra = current.pool, fresh  # another thread made one that fits meanwhile: use it
        else:
            _pools[alias] = _Entry(fresh, signature)
            keep, extra = fresh, (current.pool if current is not None else None)
    if extra is not None:
        extra.close()
    return keep


def current_pool(alias: str) -> Pool | None:
    """The alias's pool in this process, if one was created and is open."""
    with _lock:
        entry = _pools.get(alias)
    return entry.pool if entry is not None and not entry.pool.closed else None


def close_pool(alias: str) -> None:
    """Close the alias's pool and forget it: the next connection of that alias makes a new one."""
    with _lock:
        entry = _pools.pop(alias, None)
    if entry is not None:
        entry.pool.close()


def close_all_pools() -> None:
    """Close every pool of this process (before a test database is dropped or cloned)."""
    with _lock:
        entries = list(_pools.values())
        _pools.clear()
    for entry in entries:
        entry.pool.close()


def pool_stats() -> dict[str, PoolStats]:
    """Each alias's pool stats in this process (`pgpool.ThreadSafeConnectionPool.stats`), by alias.

    Only aliases that have made their pool (at their first connection) are listed.
    """
    with _lock:
        entries = dict(_pools)
    return {alias: entry.pool.stats() for alias, entry in sorted(entries.items()) if not entry.pool.closed}


def note_holder(wrapper: object) -> None:
    """Remember that `wrapper` holds a borrowed connection for the current thread."""
    key = id(wrapper)
    _holders[key] = (threading.current_thread(), weakref.ref(wrapper, lambda _ref: _holders.pop(key, None)))


def forget_holder(wrapper: object) -> None:
    _holders.pop(id(wrapper), None)


def reclaim_abandoned() -> None:
    """Collect garbage once when a wrapper holds a connection for a thread that has ended.

    The thread's `DatabaseWrapper` is garbage, but a reference cycle: its connection, and so its slot,
    comes back only when the cycle collector runs, which may take long in a quiet process. Called
    before a lend; costs a scan of the holders, and one ``gc.collect()`` per abandoned wrapper at most
    (it is forgotten whether or not the collection freed it: something else may still hold it).
    """
    abandoned = [key for key, (thread, _ref) in list(_holders.items()) if not thread.is_alive()]
    if not abandoned:
        return
    for key in abandoned:
        _holders.pop(key, None)
    gc.collect()
