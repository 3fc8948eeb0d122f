"""meshlink: name-addressed trio transports for cooperating VMs and processes.

``meshlink.serve(name, handlers)`` offers a service over vchan (shared memory,
for co-located peers), TLS and TCP at once; ``async with
meshlink.connect(name) as conn`` reaches it over the best channel the policy
allows and gives a message-bus :class:`~meshlink.bus.Connection`.  The
transports (:mod:`meshlink.transport.vchan`), the bus (:mod:`meshlink.bus`) and the disk
service (:mod:`meshlink.disk`) are usable on their own.  See README.md.
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
    RulesError,
    ServiceNotFound,
    TransportError,
)
from .service import MeshConnection, Server, connect, serve
from .transport.tls import TLSConfig

__all__ = [
    "AddressInUse",
    "AuthError",
    "ConnectionLost",
    "DiskError",
    "HandshakeError",
    "LocalProtocolError",
    "MeshConnection",
    "MeshlinkError",
    "ProtocolError",
    "ProviderUnavailable",
    "RemoteProtocolError",
    "ResolveError",
    "RingCorruptError",
    "RulesError",
    "Server",
    "ServiceNotFound",
    "TLSConfig",
    "TransportError",
    "connect",
    "serve",
]
