"""meshlink: name-addressed trio transports for cooperating VMs and processes.

The public surface is re-exported here; see README.md for a tour.
"""

from ._errors import (
    AddressInUse,
    AuthError,
    ConnectionLost,
    DiskError,
    HandshakeError,
    LocalProtocolError,
    MeshlinkError,
    ProtocolError,
    ProviderUnavailable,
    RemoteProtocolError,
    ResolveError,
    RingCorruptError,
    ServiceNotFound,
    TransportError,
)

__all__ = [
    "AddressInUse",
    "AuthError",
    "ConnectionLost",
    "DiskError",
    "HandshakeError",
    "LocalProtocolError",
    "MeshlinkError",
    "ProtocolError",
    "ProviderUnavailable",
    "RemoteProtocolError",
    "ResolveError",
    "RingCorruptError",
    "ServiceNotFound",
    "TransportError",
]
