"""The meshlink errors that are also trio errors; loaded by ``meshlink.errors`` on first use.

Why a module of its own: these classes subclass :class:`trio.BrokenResourceError`
(so ``except trio.BrokenResourceError`` keeps catching a lost peer), and so
defining them imports trio.  ``meshlink.errors`` hands them out lazily (PEP
562), which keeps trio out of processes that never touch a trio stream, such
as ``meshlink disk serve`` on its synchronous path.  Import them from
``meshlink.errors`` (or ``meshlink``), never from here.
"""

from __future__ import annotations

import trio

from ._error_classes import RemoteProtocolError, TransportError

__all__ = ["ConnectionLost", "RingCorruptError", "SessionLost"]


class ConnectionLost(TransportError, trio.BrokenResourceError):
    """The peer went away (crashed, was killed, or stopped answering)."""


class SessionLost(ConnectionLost):
    """A session could not be kept: it was not resumed within ``resume_timeout``,
    or the server restarted and forgot it.

    Calls in flight when it happened are never re-sent; they raise this.
    """


class RingCorruptError(RemoteProtocolError, trio.BrokenResourceError):
    """The peer wrote impossible values into shared memory (hostile or broken).

    The channel is unusable afterwards; nothing outside the ring was touched.
    """


for _cls in (ConnectionLost, SessionLost, RingCorruptError):
    _cls.__module__ = "meshlink.errors"  # where users import (and pickle) them from
