"""``@with_connection`` and ``@with_transaction``: DAO functions that get a connection and cannot leak it.

The decorated function declares a parameter for the connection (``conn`` unless ``argname=`` says
otherwise) and the decorator fills it in, as a keyword. A call resolves the connection as:

1. a connection the caller passed for that parameter: used as is, never committed nor returned;
2. else the connection already borrowed from the same pool in this context (see `pgpool.borrow`);
3. else a new borrow, returned when the call ends (a generator keeps it until exhausted or closed).

Built with ``wrapt``, so names, docstrings, signatures and ``inspect`` keep working, on functions,
instance methods, classmethods and staticmethods.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar, Union

import psycopg2.extensions
import wrapt

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["with_connection", "with_transaction"]

F = TypeVar("F", bound=Callable[..., Any])
PoolSource = Union["ConnectionPool", Callable[[], "ConnectionPool"]]


def with_connection(pool: PoolSource, *, argname: str = "conn") -> Callable[[F], F]:
    """Decorate a function so that it receives a borrowed connection as `argname`.

    Work it does not commit is rolled back when the connection returns to the pool. `pool` is a pool,
    or a function without arguments returning one, called at each call (so a DAO module can be
    decorated before the application creates its pool).
    """
    return _decorator(pool, argname, transactional=False)


def with_transaction(pool: PoolSource, *, argname: str = "conn") -> Callable[[F], F]:
    """Decorate a function so that it runs in a transaction on a borrowed connection.

    Commits when the function returns, rolls back when it raises. Called inside another transaction
    of the same pool, it runs in a savepoint of that transaction. A connection the caller passes
    explicitly is used as is: the caller owns its transaction.
    """
    return _decorator(pool, argname, transactional=True)


def _decorator(pool: PoolSource, argname: str, transactional: bool) -> Callable[[F], F]:
    from .pool import ConnectionPool

    if not isinstance(pool, ConnectionPool) and not callable(pool):
        raise TypeError(f"expected a pgpool pool or a function returning one, got {pool!r}")
    if not isinstance(argname, str) or not argname.isidentifier():
        raise TypeError(f"argname must be a parameter name, got {argname!r}")

    def get_pool() -> ConnectionPool:
        found = pool if isinstance(pool, ConnectionPool) else pool()
        if not isinstance(found, ConnectionPool):
            raise TypeError(f"the pool factory {pool!r} returned {found!r}, not a pgpool pool")
        return found

    def decorate(func: F) -> F:
        target = getattr(func, "__func__", func)  # look through classmethod / staticmethod
        fname = getattr(target, "__qualname__", repr(target))
        if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
            raise TypeError(f"{fname}() is async: pgpool's decorators only support synchronous functions")
        position = _parameter_position(target, argname, fname)
        is_generator = inspect.isgeneratorfunction(target)

        def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            explicit = kwargs.get(argname)
            # On a bound method or classmethod, wrapt leaves self/cls out of args.
            shift = 0 if instance is None else 1
            if explicit is not None or (position is not None and len(args) > position - shift):
                if explicit is None:
                    explicit = args[position - shift]  # type: ignore[operator]
                _check_explicit(explicit, fname, argname)
                return wrapped(*args, **kwargs)
            the_pool = get_pool()
            borrow = the_pool.transaction if transactional else the_pool.connection
            if is_generator:
                return _generator_with_borrow(borrow, wrapped, args, kwargs, argname)
            with borrow() as conn:
                return wrapped(*args, **{**kwargs, argname: conn})

        return wrapt.FunctionWrapper(func, wrapper)  # type: ignore[return-value]

    return decorate


def _parameter_position(func: Callable[..., Any], argname: str, fname: str) -> int | None:
    """Check that `func` takes `argname` by keyword; return its position when it may come positionally."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the signature of {fname}(): {exc}") from None
    for index, param in enumerate(params):
        if param.name != argname:
            continue
        if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            return index
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            return None
        break
    raise TypeError(
        f"{fname}() must declare a parameter {argname!r} (positional-or-keyword or keyword-only) "
        "to receive the connection; name another one with argname="
    )


def _check_explicit(conn: object, fname: str, argname: str) -> None:
    if not isinstance(conn, psycopg2.extensions.connection):
        raise TypeError(f"{fname}() got {type(conn).__name__} for {argname!r}: expected a psycopg2 connection")
    if conn.closed:
        raise ValueError(f"{fname}() got a closed connection for {argname!r}")


def _generator_with_borrow(
    borrow: Callable[[], Any],
    wrapped: Callable[..., Generator[Any, Any, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    argname: str,
) -> Generator[Any, Any, Any]:
    """Run a generator holding a borrow until it is exhausted or closed.

    Each step runs in a private copy of the context taken at the first step, so the borrow is
    visible inside the generator but never leaks into the code iterating it.
    """

    def body() -> Generator[Any, Any, Any]:
        with borrow() as conn:
            return (yield from wrapped(*args, **{**kwargs, argname: conn}))

    ctx = contextvars.copy_context()
    inner = ctx.run(body)
    try:
        value = ctx.run(next, inner)
    except StopIteration as stop:
        return stop.value
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            ctx.run(inner.close)
            raise
        except BaseException as exc:  # thrown in by the consumer: pass it to the body
            try:
                value = ctx.run(inner.throw, exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                value = ctx.run(inner.send, sent)
            except StopIteration as stop:
                return stop.value
