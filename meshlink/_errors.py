"""The exception hierarchy of meshlink, rooted at :class:`MeshlinkError`.

Errors are split by blame and by layer.  Where trio already names the meaning
(a peer that vanished is a :class:`trio.BrokenResourceError`), our class inherits
both, so ``except trio.BrokenResourceError`` keeps working for generic stream
code and ``except meshlink.MeshlinkError`` catches everything of ours.
"""

from __future__ import annotations

import trio


class MeshlinkError(Exception):
    """Base class of every error meshlink raises on purpose."""


# --- protocol errors, split by blame (as h11 does) -------------------------


class ProtocolError(MeshlinkError):
    """A protocol was violated.  Not raised directly: see the two subclasses."""


class LocalProtocolError(ProtocolError):
    """Our caller misused an API or asked for something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (malformed, oversized...)."""


# --- transport errors ------------------------------------------------------


class TransportError(MeshlinkError):
    """Setting up or using a transport failed."""


class ConnectionLost(TransportError, trio.BrokenResourceError):
    """The peer went away (crashed, was killed, or stopped answering)."""


class RingCorruptError(RemoteProtocolError, trio.BrokenResourceError):
    """The peer wrote impossible values into shared memory (hostile or broken).

    The channel is unusable afterwards; nothing outside the ring was touched.
    """


class HandshakeError(TransportError):
    """The rendezvous or connection handshake failed."""


class AuthError(HandshakeError):
    """The peer is not allowed to connect (credentials, certificates)."""


class ServiceNotFound(TransportError, OSError):
    """No live service of that name is published where we looked."""


class AddressInUse(TransportError, OSError):
    """A live server already publishes this service name."""


class ProviderUnavailable(TransportError):
    """A grant/event provider was requested but cannot run on this machine."""


# --- resolver and disk errors -----------------------------------------------


class ResolveError(MeshlinkError):
    """A name could not be resolved to any usable endpoint."""


class DiskError(MeshlinkError):
    """A disk request failed.

    Attributes:
        errno: the NBD/POSIX errno carried on the wire (for example 5, EIO).
    """

    def __init__(self, message: str, errno: int = 5) -> None:
        super().__init__(message)
        self.errno = errno


class RulesError(ResolveError):
    """A static rules file is malformed; the message names the file and line.

    Attributes:
        path: the rules file.
        line: the 1-based line of the error (0 when unknown).
    """

    def __init__(self, path: str, line: int, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
