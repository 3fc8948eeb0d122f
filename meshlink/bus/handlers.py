"""What a bus connection serves to its peer: methods and stream handlers, by name.

:class:`Handlers` is a plain registry; the connection looks a name up when a
request, notification or stream-open frame arrives.  :class:`InContext` is
how a request handler runs inside a long-lived worker task while behaving as
if it had a task of its own (see ``Connection`` for the workers).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["Handlers", "InContext", "MethodHandler", "StreamHandler"]

MethodHandler = Callable[..., Awaitable[Any]]
StreamHandler = Callable[..., Awaitable[None]]
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


class Handlers:
    """The functions a connection serves to its peer, by name.

    Methods are plain ``async def f(*args)`` functions: :meth:`Connection.call`
    runs one and returns its result; :meth:`Connection.notify` runs one and
    discards the result.  Stream handlers are ``async def f(stream, *args)``
    where ``stream`` is a :class:`MessageStream`; the stream is closed when the
    handler returns, and reset with the error when it raises.

    Example::

        handlers = Handlers()

        @handlers.method
        async def add(a, b):
            return a + b
    """

    def __init__(self) -> None:
        self.methods: dict[str, MethodHandler] = {}
        self.streams: dict[str, StreamHandler] = {}

    def method(self, fn: _F) -> _F:
        """Decorator: register ``fn`` as a method under its ``__name__``."""
        self.add_method(fn.__name__, fn)
        return fn

    def stream(self, fn: _F) -> _F:
        """Decorator: register ``fn`` as a stream handler under its ``__name__``."""
        self.add_stream(fn.__name__, fn)
        return fn

    def add_method(self, name: str, fn: MethodHandler) -> None:
        """Register ``fn`` as the method called ``name`` (replacing any previous one)."""
        self.methods[name] = fn

    def add_stream(self, name: str, fn: StreamHandler) -> None:
        """Register ``fn`` as the stream handler called ``name``."""
        self.streams[name] = fn


class InContext:
    """Await a coroutine with every step run in ``context`` (as its own task would).

    Handlers run in long-lived worker tasks; this keeps the context variables
    a handler sets from leaking into the next handler that worker runs.
    """

    __slots__ = ("_context", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context) -> None:
        self._coro = coro
        self._context = context

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        run = self._context.run
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    yielded = run(coro.send, value)
                else:
                    yielded = run(coro.throw, error)
            except StopIteration as stop:
                return stop.value
            try:
                value = yield yielded
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # Cancelled included: pass it in
                error = exc
                value = None
