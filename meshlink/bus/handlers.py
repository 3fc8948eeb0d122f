"""What a bus connection serves to its peer: methods and stream handlers, by name.

:class:`Handlers` is a plain registry; the connection looks a name up when a
request, notification or stream-open frame arrives (:mod:`.rpc` runs methods,
:mod:`.streams` runs stream handlers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["Handlers", "MethodHandler", "StreamHandler"]

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
