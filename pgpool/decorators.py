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
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar, Union

import psycopg2.extensions
import wrapt

from . import _cleanup
from .borrow import (
    ConnectionBorrow,
    TransactionBorrow,
    connection_borrow,
    held_by_generators,
    thread_token,
    transaction_borrow,
)

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["BORROWED", "with_connection", "with_transaction"]

# The decorated function keeps its exact type (a decorator that does not change the signature):
# with ``conn: connection = BORROWED`` as the parameter's default, calls without it type-check.
F = TypeVar("F", bound=Union[Callable[..., Any], "classmethod[Any, Any, Any]", "staticmethod[Any, Any]"])
PoolSource = Union["ConnectionPool[Any]", Callable[[], "ConnectionPool[Any]"]]


class _Borrowed:
    """The type of `BORROWED`; any use of it as a connection raises a clear error."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "pgpool.BORROWED"

    def __getattr__(self, name: str) -> Any:
        raise TypeError(
            f"pgpool.BORROWED has no attribute {name!r}: a function whose connection parameter defaults "
            "to pgpool.BORROWED was called without its @with_connection or @with_transaction decorator, "
            "or without a connection"
        )


BORROWED: Any = _Borrowed()
"""The default for a decorated function's connection parameter: ``def f(x: int, conn: connection =
pgpool.BORROWED)``. The decorator replaces it with a borrowed connection, so type checkers accept
calls that leave the parameter out; called undecorated, the function gets an error at first use."""


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

    decorator = "with_transaction" if transactional else "with_connection"
    if not isinstance(pool, ConnectionPool) and not callable(pool):
        raise TypeError(f"{decorator}() expected a pgpool pool or a function returning one, got {pool!r}")
    if not isinstance(argname, str) or not argname.isidentifier():
        raise TypeError(f"argname must be a parameter name, got {argname!r}")
    bare = _bare_decorator_use(pool, argname)
    if bare is not None:
        # @with_connection without (pool): the function itself came as the pool.
        raise TypeError(
            f"@{decorator} on {bare}() needs the pool: write @{decorator}(pool) "
            f"or @{decorator}(lambda: app.pool), not a bare @{decorator}"
        )

    fixed = pool if isinstance(pool, ConnectionPool) else None  # no factory to call on every call

    def get_pool(fname: str) -> ConnectionPool[Any]:
        found = pool if isinstance(pool, ConnectionPool) else pool()
        if not isinstance(found, ConnectionPool):
            raise TypeError(f"the pool factory of {fname}() returned {found!r}, not a pgpool pool")
        return found

    def decorate(func: F) -> F:
        target: Callable[..., Any] = getattr(func, "__func__", func)  # type: ignore[arg-type]  # classmethod etc.
        fname = getattr(target, "__qualname__", repr(target))
        if isinstance(pool, type):
            # The class itself would be "a function returning a pool": a new pool on every call.
            raise TypeError(
                f"@{decorator} on {fname}() got the class {pool.__name__}, not a pool: create the pool once "
                f"(pool = {pool.__name__}(...)) and pass it, or a function returning it"
            )
        if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
            raise TypeError(f"{fname}() is async: pgpool's decorators only support synchronous functions")
        position = _parameter_position(target, argname, fname)
        is_generator = inspect.isgeneratorfunction(target)

        def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            explicit = kwargs.get(argname) if kwargs else None  # no call for the common case
            # On a bound method or classmethod, wrapt leaves self/cls out of args.
            index = None if position is None else position - (0 if instance is None else 1)
            if args and index is not None and len(args) > index:
                explicit = args[index]
                args = args[:index] + args[index + 1 :]  # passed by position: pass it on by keyword
                kwargs = {**kwargs, argname: explicit}
            if explicit is not None and explicit is not BORROWED:
                _check_explicit(explicit, fname, argname)
                return wrapped(*args, **kwargs)
            # None or BORROWED, by position or keyword, means "borrow one", like leaving it out.
            the_pool = fixed if fixed is not None else get_pool(fname)
            if is_generator:
                return BorrowingGenerator(the_pool, transactional, wrapped, args, kwargs, argname)
            return _call_with_borrow(the_pool, transactional, wrapped, args, kwargs, argname)

        return wrapt.FunctionWrapper(func, wrapper)  # type: ignore[arg-type,return-value]

    return decorate


def _bare_decorator_use(candidate: object, argname: str) -> str | None:
    """The name of the function, when `candidate` is the decorated function itself rather than a pool
    factory (a factory takes no argument; a DAO function takes the connection parameter)."""
    from .pool import ConnectionPool

    if isinstance(candidate, (ConnectionPool, type)):
        return None
    if isinstance(candidate, (classmethod, staticmethod)):
        return str(getattr(candidate.__func__, "__qualname__", repr(candidate)))
    target = candidate  # a bound method's signature leaves self out: app.get_pool is a factory
    try:
        params = inspect.signature(target).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    required = [
        p for p in params if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required or any(p.name == argname for p in params) or inspect.isgeneratorfunction(target):
        return str(getattr(target, "__qualname__", repr(target)))
    return None


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
    pool: ConnectionPool[Any],
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
    borrow: ConnectionBorrow[Any] | TransactionBorrow[Any]
    if transactional:
        borrow = transaction_borrow(pool)
    else:
        borrow = ConnectionBorrow()  # connection_borrow(pool), inline: one Python call fewer per call
        borrow._pool = pool
        borrow._timeout = None
        borrow._join = True
        borrow.conn = None
    conn = borrow.__enter__()
    try:
        # A dict of our own: the caller's may be kept and reused (operator.methodcaller, C callers
        # using PyObject_Call), and a connection left in it would be passed again once returned.
        result = wrapped(*args, **({**kwargs, argname: conn} if kwargs else {argname: conn}))
    except BaseException as exc:
        for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
            try:
                for _ in _cleanup.RETRIES:
                    try:
                        borrow.__exit__(type(exc), exc, exc.__traceback__)
                        break
                    except BaseException:
                        pass
                break
            except BaseException:  # on the inner loop's back-edge
                pass
        raise
    try:
        borrow.__exit__(None, None, None)
    except BaseException as exc:
        for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
            try:
                for _ in _cleanup.RETRIES:
                    try:
                        borrow.__exit__(type(exc), exc, exc.__traceback__)
                        break
                    except BaseException:
                        pass
                break
            except BaseException:  # on the inner loop's back-edge
                pass
        raise
    return result


class BorrowingGenerator(Generator[Any, Any, Any]):
    """A decorated generator: the user's generator, run with a borrow of its own.

    It never joins the caller's borrow, since it may outlive it: it takes its own connection at its
    first step and keeps it until it ends, whatever ends it: exhausted (with `with_transaction`,
    committed), raising, closed, garbage collected unfinished (rolled back by the pool's housekeeper
    at once), or its pool closed. Each step runs in a private copy of the context, so the borrow is
    visible inside the generator (nested borrows there join it, from whichever thread runs the step)
    and never leaks into the code iterating it.

    A class rather than a generator function: an interrupt that lands on the resumption of a Python
    generator can end its frame without running its ``finally`` clauses; here every step is a method
    call whose cleanup is run again when an interrupt lands on its entry.
    """

    _borrow: ConnectionBorrow[Any] | TransactionBorrow[Any] | None = None
    _done = True
    _ref: weakref.ref[Any] | None = None

    def __init__(
        self,
        pool: ConnectionPool[Any],
        transactional: bool,
        wrapped: Callable[..., Generator[Any, Any, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        argname: str,
    ) -> None:
        self._pool = pool
        self._transactional = transactional
        self._call = (wrapped, args, kwargs, argname)
        self._ctx: contextvars.Context | None = None
        self._borrow = None  # held from the first step
        self._own: Any = None  # the borrow in the private context, rebound to the running thread
        self._inner: Generator[Any, Any, Any] | None = None
        self._done = False
        # Who is stepping it: a list, not a lock, since an interrupt landing right after a lock's
        # acquire would leave it held for good; an append is undone by the finally that follows it.
        self._steppers: list[object] = []

    def _exclusive(self, action: Callable[..., Any], *args: Any) -> Any:
        """Run `action` with the generator to this thread alone; a second thread is refused with
        ValueError, as Python refuses to run a generator twice at once (nothing is touched)."""
        me = object()
        steppers = self._steppers
        try:
            steppers.append(me)
            if steppers[0] is not me:
                raise ValueError("generator already executing")
            return action(*args)
        finally:
            try:
                steppers.remove(me)
            except ValueError:
                pass

    def _start(self) -> None:
        """Borrow and create the user's generator (at the first step, as a generator would)."""
        pool = self._pool
        ctx = contextvars.copy_context()
        borrow: ConnectionBorrow[Any] | TransactionBorrow[Any]
        borrow = transaction_borrow(pool, join=False) if self._transactional else connection_borrow(pool, join=False)
        # Owned before it is entered (an exit before the enter does nothing): _finish ends it; for a
        # generator dropped unfinished, the weakref's callback wakes the housekeeper, which ends it.
        self._ctx = ctx
        self._borrow = borrow
        self._ref = ref = weakref.ref(self, pool._housekeeper.wakeups.put)
        held_by_generators[ref] = (ctx, borrow, None)
        conn = ctx.run(borrow.__enter__)
        self._own = borrow if borrow.conn is not None else None  # the borrow in the private context
        wrapped, args, kwargs, argname = self._call
        self._inner = ctx.run(wrapped, *args, **{**kwargs, argname: conn})
        held_by_generators[ref] = (ctx, borrow, self._inner)  # closed first if it is dropped

    def _advance(self, method: str, *args: Any) -> Any:
        try:
            if self._done:
                raise StopIteration  # ended meanwhile (its pool closed): as an exhausted generator
            if self._borrow is None:
                self._start()
            assert self._ctx is not None and self._inner is not None
            if self._own is not None:
                self._own.thread = thread_token()  # the borrow follows the thread running it
            return self._ctx.run(getattr(self._inner, method), *args)
        except BaseException as exc:
            for _ in _cleanup.RETRIES:  # until one call gets past its entry: each may be interrupted there
                try:
                    for _ in _cleanup.RETRIES:
                        try:
                            self._finish(exc)
                            break
                        except BaseException:
                            pass
                    break
                except BaseException:  # on the inner loop's back-edge
                    pass
            raise

    def _step(self, method: str, *args: Any) -> Any:
        if self._done:
            raise StopIteration
        return self._exclusive(self._advance, method, *args)

    def _finish(self, exc: BaseException | None) -> None:
        """End the borrow: success when the generator returned (StopIteration), else a rollback.
        Idempotent: called again, it finishes what an interrupt cut short, or does nothing."""
        borrow, ctx = self._borrow, self._ctx
        self._done = True
        if borrow is None or ctx is None:
            return
        if self._ref is not None:
            held_by_generators.pop(self._ref, None)  # ended here: the housekeeper need not
        failed = exc is not None and not isinstance(exc, StopIteration)
        error = (type(exc), exc, exc.__traceback__) if failed and exc is not None else (None, None, None)
        try:
            ctx.run(borrow.__exit__, *error)
        except BaseException as exit_exc:
            ctx.run(borrow.__exit__, type(exit_exc), exit_exc, exit_exc.__traceback__)
            raise

    def _close_inner(self) -> None:
        if self._done:
            return
        try:
            assert self._ctx is not None and self._inner is not None
            self._ctx.run(self._inner.close)
        except BaseException as exc:
            try:
                self._finish(exc)
            except BaseException:
                self._finish(exc)  # an interrupt on its entry: it is idempotent
                raise
            raise
        try:
            self._finish(GeneratorExit())
        except BaseException:
            self._finish(GeneratorExit())  # an interrupt on its entry: it is idempotent
            raise

    def end_for_closed_pool(self) -> None:
        """Its pool is closing: close it now (its finally clauses run, its borrow ends, rolled back).
        One being stepped by another thread ends its borrow when that step ends."""
        try:
            self.close()
        except ValueError:
            return  # stepped right now by another thread
        except Exception:
            pass  # its own error; the borrow ended all the same

    def send(self, value: Any) -> Any:
        if value is not None and self._borrow is None:
            raise TypeError("can't send non-None value to a just-started generator")
        return self._step("send", value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._borrow is None and not self._done:
            self._done = True  # never started: nothing borrowed; raise it here, as a generator does
            raise typ if val is None else val
        if val is None and tb is None:
            return self._step("throw", typ)
        return self._step("throw", typ, val, tb)

    def close(self) -> None:
        if self._done or self._borrow is None:
            self._done = True
            return
        self._exclusive(self._close_inner)
