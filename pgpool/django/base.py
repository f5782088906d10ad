"""``ENGINE: "pgpool.django"``: Django's PostgreSQL backend (psycopg2), its connections from pgpool.

Django's lifecycle, pooled: a connect borrows from the alias's pool (`pgpool.django.pools`), and
``connection.close()`` (``close_old_connections`` at the end of each request) gives the connection
back, rolled back and restored, instead of closing its socket. Inside ``atomic()`` a close discards
the connection instead, so that the wrapper is left holding a closed connection, exactly as with the
stock backend. What Django sets up on each connect runs once per server session, as the pool's
``configure`` hook (`pgpool.django.session`).
"""

from __future__ import annotations

import os
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.postgresql import base as postgresql
from django.db.backends.postgresql.creation import DatabaseCreation as PostgresCreation
from django.db.backends.postgresql.psycopg_any import IsolationLevel  # type: ignore[import-untyped]
from django.utils.asyncio import async_unsafe

import pgpool

from . import pools
from .options import POOL_OPTIONS, pool_options
from .session import SessionSetup

__all__ = ["DatabaseWrapper", "PoolTimeout"]

# How many forks this process descends from: a connection borrowed in an earlier generation belongs
# to the parent (pgpool disowned it in this process) and is never given back here.
_generation = 0


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class PoolTimeout(pgpool.PoolTimeout, postgresql.Database.OperationalError):  # type: ignore[misc,name-defined]
    """No connection within the pool's timeout (at once with ``timeout=0``, when ``maxconn`` are lent);
    Django reports it as ``django.db.OperationalError``, as it does psycopg_pool's timeouts."""

    __module__ = "pgpool.django"


class DatabaseCreation(PostgresCreation):
    """Test databases: no pooled session may keep a database that is dropped or used as a template."""

    def _clone_test_db(self, suffix: Any, verbosity: Any, keepdb: bool = False) -> None:
        # CREATE DATABASE ... TEMPLATE fails while anyone is connected to the template, and any alias
        # (a test mirror, another alias on the same database) may hold idle sessions there.
        pools.close_all_pools()
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]  # not in django-stubs

    def _destroy_test_db(self, test_database_name: Any, verbosity: Any) -> None:
        pools.close_all_pools()  # DROP DATABASE waits for, then fails on, sessions still connected
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]  # not in django-stubs


class DatabaseWrapper(postgresql.DatabaseWrapper):
    """Django's PostgreSQL backend whose connections come from the alias's pgpool pool."""

    creation_class = DatabaseCreation

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lender: pools.Pool | None = None  # the pool self.connection was borrowed from, if any
        self._lent_in = _generation  # the fork generation of that borrow

    # -- the pool ------------------------------------------------------------------------------

    def _pool_options(self) -> dict[str, Any] | None:
        if self.alias == NO_DB_ALIAS:
            return None  # test database creation and other maintenance connections: never pooled
        options = self.settings_dict["OPTIONS"]
        return pool_options(self.alias, options.get("pool", True))

    @property
    def pool(self) -> pools.Pool | None:
        """The alias's pool in this process (created if needed), or None when pooling is off."""
        options = self._pool_options()
        if options is None:
            return None
        return self._pool_for(self.get_connection_params(), options)

    def close_pool(self) -> None:
        """Close the alias's pool: idle sessions now, lent ones as they come back."""
        pools.close_pool(self.alias)

    def _pool_for(self, conn_params: dict[str, Any], options: dict[str, Any]) -> pools.Pool:
        settings_dict = self.settings_dict
        setup = SessionSetup(
            timezone_name=self.timezone_name,
            role=settings_dict["OPTIONS"].get("assume_role"),
            isolation_level=self._isolation_level() if "isolation_level" in settings_dict["OPTIONS"] else None,
            autocommit=bool(settings_dict["AUTOCOMMIT"]),
            user_configure=options.get("configure"),
        )
        # What a connection is (its parameters, its session) makes the pool; CONN_HEALTH_CHECKS and
        # CONN_MAX_AGE are read when the pool is made, as Django's own pool does.
        signature = (conn_params, setup, options)
        return pools.pool_for(self.alias, signature, lambda: self._build_pool(conn_params, options, setup))

    def _build_pool(self, conn_params: dict[str, Any], options: dict[str, Any], setup: SessionSetup) -> pools.Pool:
        where = f"DATABASES[{self.alias!r}]"
        if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
            raise ImproperlyConfigured(
                f"{where}: pooling doesn't support persistent connections: set CONN_MAX_AGE to 0 (the pool keeps"
                " connections open), or OPTIONS['pool'] to False for Django's own persistent connections"
            )
        misplaced = sorted(set(conn_params) & set(POOL_OPTIONS))
        if misplaced:
            raise ImproperlyConfigured(
                f"{where}['OPTIONS']: {', '.join(map(repr, misplaced))} is a pool option: put it in OPTIONS['pool']"
            )
        kwargs = dict(options)
        kwargs.setdefault("name", f"django-{self.alias}")
        if self.settings_dict["CONN_HEALTH_CHECKS"]:
            kwargs.setdefault("check", pgpool.check_connection)
        kwargs["configure"] = setup
        try:
            return pgpool.ThreadSafeConnectionPool(**kwargs, **conn_params)
        except (ValueError, TypeError) as exc:
            raise ImproperlyConfigured(f"{where}['OPTIONS']['pool']: {exc}") from None

    def get_connection_params(self) -> dict[str, Any]:
        settings_dict = self.settings_dict
        if "pool" not in settings_dict["OPTIONS"]:
            return super().get_connection_params()
        # Django's method refuses OPTIONS["pool"] with psycopg2: let it see the OPTIONS without it.
        # The swap is seen only by this wrapper, which Django uses from one thread at a time.
        options = {key: value for key, value in settings_dict["OPTIONS"].items() if key != "pool"}
        self.settings_dict = {**settings_dict, "OPTIONS": options}
        try:
            return super().get_connection_params()
        finally:
            self.settings_dict = settings_dict

    def _isolation_level(self) -> IsolationLevel:
        value = self.settings_dict["OPTIONS"].get("isolation_level")
        if value is None:
            return IsolationLevel.READ_COMMITTED
        try:
            return IsolationLevel(value)
        except ValueError:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {value} specified. Use one of the psycopg.IsolationLevel values."
            ) from None

    # -- Django's lifecycle, pooled ------------------------------------------------------------

    @async_unsafe
    def get_new_connection(self, conn_params: Any) -> Any:
        options = self._pool_options()
        if options is None:
            return super().get_new_connection(conn_params)
        # The stock backend reads this after each connect; the pool's configure hook applied it.
        self.isolation_level = self._isolation_level()
        pools.reclaim_abandoned()
        pool = self._pool_for(conn_params, options)
        try:
            try:
                conn = pool.getconn()
            except pgpool.PoolClosed:
                # Closed by another thread between the look-up and the lend (its settings changed, a
                # test database is being dropped): the registry makes a new one.
                pool = self._pool_for(conn_params, options)
                conn = pool.getconn()
        except pgpool.PoolClosed:
            raise
        except pgpool.PoolError as exc:  # PoolTimeout, or an exhausted pool with timeout=0
            raise PoolTimeout(*exc.args) from exc
        self._lender = pool
        self._lent_in = _generation
        pools.note_holder(self)
        return conn

    def init_connection_state(self) -> None:
        if self._lender is None:
            super().init_connection_state()
            return
        # The version check only: the time zone and role were set by the pool's configure hook, once
        # per server session.
        BaseDatabaseWrapper.init_connection_state(self)

    def _drop_inherited(self) -> None:
        """Forget a connection borrowed before a fork: pgpool made it unusable in this process, and
        it is never closed here (closing takes psycopg2's lock, which a parent thread may have held at
        fork time). Inside atomic() the block keeps it, and fails; `_close` then leaves it alone."""
        if self.in_atomic_block:
            return
        self._lender = None
        pools.forget_holder(self)
        self.connection = None  # the next query borrows from this process's pool

    def close_if_health_check_failed(self) -> None:
        # Django calls this before each cursor and each set_autocommit (so also on entering atomic()).
        if self.connection is None:
            return
        if self._lender is not None:
            if self._lent_in != _generation:
                self._drop_inherited()
            return  # the pool checks connections before lending them (CONN_HEALTH_CHECKS: its check)
        # A plain connection (OPTIONS["pool"] False): Django's own check. Not the postgresql backend's
        # method, whose look at self.pool would make a pool.
        BaseDatabaseWrapper.close_if_health_check_failed(self)

    def _close(self) -> None:
        conn = self.connection
        if conn is None:
            return
        lender = self._lender
        if lender is None:
            with self.wrap_database_errors:
                conn.close()
            return
        self._lender = None
        pools.forget_holder(self)
        if self._lent_in != _generation:
            return  # borrowed before a fork: nothing to give back in this process
        if self.in_atomic_block:
            # Django keeps the wrapper's connection, closed, until the outermost block exits: discard
            # it, so that it is closed exactly as the stock backend's would be.
            with self.wrap_database_errors:
                lender.putconn(conn, close=True)
            return
        # Given back, it may be lent to another thread at once: this wrapper must not reach it.
        self.connection = None
        with self.wrap_database_errors:
            lender.putconn(conn)
