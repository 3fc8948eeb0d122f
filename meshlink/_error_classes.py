"""The classes of meshlink's exception hierarchy that do not need trio.

Import them from :mod:`meshlink.errors` (or :mod:`meshlink`), which owns the
hierarchy and explains it; they live here, at the bottom of the house, so
that ``meshlink/_trio_errors.py`` can subclass them without importing
:mod:`meshlink.errors`, which loads it lazily (no circle of imports).
"""

from __future__ import annotations

from resolver import errors as naming

__all__ = [
    "MeshlinkError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "TransportError",
    "HandshakeError",
    "AuthError",
    "ServiceNotFound",
    "AddressInUse",
    "InvalidName",
    "StoreError",
    "ProviderUnavailable",
    "ResolveError",
    "DiskError",
    "RulesError",
]


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


class HandshakeError(TransportError):
    """The rendezvous or connection handshake failed."""


class AuthError(HandshakeError):
    """The peer is not allowed to connect (credentials, certificates)."""


class ServiceNotFound(TransportError, naming.ServiceNotFound):
    """No live service of that name is published where we looked (an OSError)."""


class AddressInUse(TransportError, naming.NameInUse):
    """A live server already publishes this service name (an OSError, EADDRINUSE)."""


class InvalidName(LocalProtocolError, naming.InvalidName):
    """A service name (or a vchan port name) is not acceptable (also a ValueError)."""


class StoreError(TransportError, naming.StoreError):
    """The host store directory or XenStore cannot be used."""


class ProviderUnavailable(TransportError):
    """A grant/event provider was requested but cannot run on this machine."""


# --- resolver and disk errors -----------------------------------------------


class ResolveError(MeshlinkError, naming.ResolveError):
    """A name could not be resolved to any usable endpoint."""


class DiskError(MeshlinkError):
    """A disk request failed.

    Attributes:
        errno: the NBD/POSIX errno carried on the wire (for example 5, EIO).
    """

    def __init__(self, message: str, errno: int = 5) -> None:
        super().__init__(message)
        self.errno = errno


class RulesError(ResolveError, naming.RulesError):
    """A static rules file is malformed; the message names the file and line.

    Made as ``RulesError(path, line, reason)`` (see :class:`resolver.RulesError`).

    Attributes:
        path: the rules file.
        line: the 1-based line of the error (0 when unknown).
        reason: the message without the ``path:line:`` prefix.
    """


for _cls in (
    MeshlinkError,
    ProtocolError,
    LocalProtocolError,
    RemoteProtocolError,
    TransportError,
    HandshakeError,
    AuthError,
    ServiceNotFound,
    AddressInUse,
    InvalidName,
    StoreError,
    ProviderUnavailable,
    ResolveError,
    DiskError,
    RulesError,
):
    _cls.__module__ = "meshlink.errors"  # where users import (and pickle) them from
