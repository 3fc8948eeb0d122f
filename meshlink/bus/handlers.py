"""What a bus connection serves to its peer: methods and stream handlers, by name.

:class:`Handlers` is a plain registry; the connection looks a name up when a
request, notification or stream-open frame arrives (:mod:`.rpc` runs methods,
:mod:`.streams` runs stream handlers).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["Handlers", "MethodHandler", "StreamHandler", "is_async"]

#: ``async def f(*args)``, or a plain ``def f(*args)`` run inline (see Handlers).
MethodHandler = Callable[..., Any]
StreamHandler = Callable[..., Awaitable[None]]
_F = TypeVar("_F", bound=Callable[..., Any])
_S = TypeVar("_S", bound=Callable[..., Awaitable[Any]])


def is_async(fn: Callable[..., Any]) -> bool:
    """True if calling ``fn`` gives a coroutine to await: an ``async def``
    function, a partial of one, or an object whose ``__call__`` is one."""
    call = vars(type(fn)).get("__call__")
    return inspect.iscoroutinefunction(fn) or (
        call is not None and inspect.iscoroutinefunction(call)
    )


class Handlers:
    """The functions a connection serves to its peer, by name.

    Methods are ``async def f(*args)`` functions: :meth:`Connection.call`
    runs one and returns its result; :meth:`Connection.notify` runs one and
    discards the result.

    A method may also be a plain ``def f(*args)``.  Such a handler is *run
    inline*: the connection's reader calls it as soon as the request is
    decoded and writes the reply from there, with no task switch at all (a
    call to it over vchan or a socket costs one scheduler pass less on the
    serving side).  Use it for short, non-blocking work (a lookup, a
    counter, an echo): while it runs the connection reads nothing, and it
    cannot be cancelled.  A plain function that returns an awaitable
    (``lambda x: some_async(x)``) is awaited in a worker like an async one.

    Stream handlers are ``async def f(stream, *args)`` where ``stream`` is a
    :class:`MessageStream`; the stream is closed when the handler returns,
    and reset with the error when it raises.

    Example::

        handlers = Handlers()

        @handlers.method
        async def add(a, b):
            return a + b
    """

    def __init__(self) -> None:
        self.methods: dict[str, MethodHandler] = {}
        #: The methods that are plain functions (run inline), by name.
        self.inline: dict[str, Callable[..., Any]] = {}
        self.streams: dict[str, StreamHandler] = {}

    def method(self, fn: _F) -> _F:
        """Decorator: register ``fn`` as a method under its ``__name__``."""
        self.add_method(fn.__name__, fn)
        return fn

    def stream(self, fn: _S) -> _S:
        """Decorator: register ``fn`` as a stream handler under its ``__name__``."""
        self.add_stream(fn.__name__, fn)
        return fn

    def add_method(self, name: str, fn: MethodHandler) -> None:
        """Register ``fn`` as the method called ``name`` (replacing any previous one).

        ``fn`` is an ``async def`` function, or a plain function run inline
        (see the class documentation).
        """
        self.methods[name] = fn
        if is_async(fn):
            self.inline.pop(name, None)
        else:
            self.inline[name] = fn

    def update(self, other: Handlers) -> None:
        """Register every method and stream handler of ``other`` here too."""
        for name, fn in other.methods.items():
            self.add_method(name, fn)
        self.streams.update(other.streams)

    def add_stream(self, name: str, fn: StreamHandler) -> None:
        """Register ``fn`` as the stream handler called ``name``."""
        self.streams[name] = fn
