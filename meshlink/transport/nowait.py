"""Writing to a transport without waiting: what the bus and the session both need.

A caller that has a queue of its own (the bus's writer, the session's
keeper) can hand small writes to the transport with an ordinary function
call, with no task step and no schedule point, and queue only what the
transport did not take.  :func:`nowait_sender` says how, for a given stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

__all__ = ["NowaitSender", "nowait_sender"]

#: Writes a prefix of its argument at once; returns its length (0: the transport is full).
NowaitSender = Callable[[bytes | bytearray | memoryview], int]


def nowait_sender(stream: trio.abc.SendStream) -> NowaitSender | None:
    """How to write to ``stream`` without waiting, if it can: a function that
    writes a prefix of its argument at once and returns its length (0 when
    the transport is full), or None.

    A stream's own ``try_send`` method, or for a trio ``SocketStream`` a
    non-blocking ``write`` on its socket (trio's sockets are non-blocking;
    the caller's one-sender rule stands in for trio's conflict detector).

    Raises (from the returned function):
        trio.ClosedResourceError: the socket was closed.
        trio.BrokenResourceError: the write failed (the peer reset, ...).
    """
    own = getattr(stream, "try_send", None)
    if own is not None:
        fn: NowaitSender = own
        return fn
    if type(stream) is trio.SocketStream:
        sock = stream.socket

        def write(data: bytes | bytearray | memoryview) -> int:
            try:
                return os.write(sock.fileno(), data)
            except BlockingIOError:
                return 0
            except OSError as exc:
                if sock.fileno() < 0:
                    raise trio.ClosedResourceError("the socket was closed") from None
                raise trio.BrokenResourceError(f"socket write failed: {exc!r}") from exc

        return write
    return None
