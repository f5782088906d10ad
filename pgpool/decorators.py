"""``@with_connection`` and ``@with_transaction``: DAO functions that get a connection and cannot leak it.

The decorated function declares a parameter for the connection (``conn`` unless ``argname=`` says
otherwise) and the decorator fills it in, as a keyword. A call resolves the connection as:

1. a connection the caller passed for that parameter: used as is, never committed nor returned;
2. else (the parameter left out, or passed as None, by keyword or by position) the connection that
   this thread already borrowed from the same pool and still holds (see `pgpool.borrow`);
3. else a new borrow, returned when the call ends.

A decorated generator is different: it never joins the caller's borrow, since it may outlive it. It
takes a connection of its own at its first step and keeps it until it is exhausted or closed (with
`with_transaction`, its own transaction: committed when exhausted, rolled back when it raises or is
closed early). Pass ``conn=`` explicitly to make it work on the caller's connection instead.

Built with ``wrapt``, so names, docstrings, signatures and ``inspect`` keep working, on functions,
instance methods, classmethods and staticmethods.
"""

from __future__ import annotations

import contextvars
import inspect
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar, Union

import psycopg2.extensions
import wrapt

from .borrow import ConnectionBorrow, TransactionBorrow

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
            index = None if position is None else position - (0 if instance is None else 1)
            if index is not None and len(args) > index:
                explicit = args[index]
                args = args[:index] + args[index + 1 :]  # passed by position: pass it on by keyword
                kwargs = {**kwargs, argname: explicit}
            if explicit is not None:
                _check_explicit(explicit, fname, argname)
                return wrapped(*args, **kwargs)
            # None, by position or keyword, means "borrow one", like leaving the parameter out.
            the_pool = get_pool()
            if is_generator:
                return _generator_with_borrow(the_pool, transactional, wrapped, args, kwargs, argname)
            return _call_with_borrow(the_pool, transactional, wrapped, args, kwargs, argname)

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


def _call_with_borrow(
    pool: ConnectionPool,
    transactional: bool,
    wrapped: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    argname: str,
) -> Any:
    """Call `wrapped` with a borrowed connection; give it back whatever happens, interrupts included.

    Not a ``with`` statement: an interrupt landing on the entry of ``__exit__`` would skip it. Every
    exit here is called again in that case (exits are idempotent), and an exit that fails after the
    function returned rolls back, since the caller then sees an exception, not a result.
    """
    borrow: ConnectionBorrow | TransactionBorrow
    borrow = TransactionBorrow(pool) if transactional else ConnectionBorrow(pool)
    conn = borrow.__enter__()
    try:
        result = wrapped(*args, **{**kwargs, argname: conn})
    except BaseException as exc:
        try:
            borrow.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:
            borrow.__exit__(type(exc), exc, exc.__traceback__)
            raise
        raise
    try:
        borrow.__exit__(None, None, None)
    except BaseException as exc:
        borrow.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return result


def _generator_with_borrow(
    pool: ConnectionPool,
    transactional: bool,
    wrapped: Callable[..., Generator[Any, Any, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    argname: str,
) -> Generator[Any, Any, Any]:
    """Run a generator holding a borrow of its own until it is exhausted or closed.

    A decorated generator never joins the caller's borrow: it outlives the caller's block as long as
    its consumer wants, so it takes its own connection at its first step (its own transaction, with
    `with_transaction`: committed when exhausted, rolled back when it raises or is closed early).
    Each step runs in a private copy of the context, so the borrow is visible inside the generator
    (nested borrows there join it, from whichever thread runs the step) and never leaks into the
    code iterating it.
    """
    ctx = contextvars.copy_context()
    borrow: ConnectionBorrow | TransactionBorrow
    borrow = TransactionBorrow(pool, join=False) if transactional else ConnectionBorrow(pool, join=False)
    conn = ctx.run(borrow.__enter__)
    try:
        own = ctx.run(pool._borrow.get)
        inner = ctx.run(wrapped, *args, **{**kwargs, argname: conn})
        try:
            if own is not None:
                own.thread = threading.get_ident()
            value = ctx.run(next, inner)
        except StopIteration as stop:
            result = stop.value
        else:
            while True:
                try:
                    sent = yield value
                except GeneratorExit:
                    ctx.run(inner.close)
                    raise
                except BaseException as exc:  # thrown in by the consumer: pass it to the body
                    if own is not None:
                        own.thread = threading.get_ident()
                    try:
                        value = ctx.run(inner.throw, exc)
                    except StopIteration as stop:
                        result = stop.value
                        break
                else:
                    if own is not None:
                        own.thread = threading.get_ident()  # the borrow follows the thread running it
                    try:
                        value = ctx.run(inner.send, sent)
                    except StopIteration as stop:
                        result = stop.value
                        break
    except BaseException as exc:
        try:
            ctx.run(borrow.__exit__, type(exc), exc, exc.__traceback__)
        except BaseException:
            ctx.run(borrow.__exit__, type(exc), exc, exc.__traceback__)
            raise
        raise
    try:
        ctx.run(borrow.__exit__, None, None, None)
    except BaseException as exc:
        ctx.run(borrow.__exit__, type(exc), exc, exc.__traceback__)
        raise
    return result
