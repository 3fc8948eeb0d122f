"""meshlink: name-addressed trio transports for cooperating VMs and processes.

``meshlink.serve(name, handlers)`` offers a service over vchan (shared memory,
for co-located peers), TLS and TCP at once; ``async with
meshlink.connect(name) as conn`` reaches it over the best channel the policy
allows and gives a message-bus :class:`~meshlink.bus.Connection`;
``meshlink.connect_blocking(name)`` does the same for code without trio
(:mod:`meshlink.blocking`).  The transports (:mod:`meshlink.transport.vchan`),
the bus (:mod:`meshlink.bus`) and the disk service (:mod:`meshlink.disk`) are
usable on their own.  Names are resolved by the :mod:`resolver` package (host
store, rules, zeroconf), which meshlink builds on; every error a ``connect``
user may catch and every type it hands out is importable from here.  See
README.md.

The names from :mod:`meshlink.service` (and with them the bus) are imported
on first use, not by ``import meshlink``: code that needs only a transport or
the disk service, such as ``meshlink disk``/``vchan``, starts without them.
Nor does ``import meshlink`` import trio: the errors that subclass trio's
are loaded on first use too (see :mod:`meshlink.errors`).
"""

from typing import TYPE_CHECKING

from resolver.lazy import lazy_names

from .errors import (
    AddressInUse,
    AuthError,
    DiskError,
    HandshakeError,
    InvalidName,
    LocalProtocolError,
    MeshlinkError,
    ProtocolError,
    ProviderUnavailable,
    RemoteProtocolError,
    ResolveError,
    RulesError,
    ServiceNotFound,
    StoreError,
    TransportError,
)

if TYPE_CHECKING:
    from .blocking import BlockingConnection, connect_blocking
    from .bus import BusConfig, Connection, Handlers, RemoteError
    from .client import MeshConnection, connect
    from .errors import ConnectionLost, RingCorruptError, SessionLost
    from .service import Server, serve
    from .session import SessionConfig
    from .transport.tls import TLSConfig

__all__ = [
    "AddressInUse",
    "AuthError",
    "BlockingConnection",
    "BusConfig",
    "Connection",
    "ConnectionLost",
    "DiskError",
    "Handlers",
    "HandshakeError",
    "InvalidName",
    "LocalProtocolError",
    "MeshConnection",
    "MeshlinkError",
    "ProtocolError",
    "ProviderUnavailable",
    "RemoteError",
    "RemoteProtocolError",
    "ResolveError",
    "RingCorruptError",
    "RulesError",
    "Server",
    "ServiceNotFound",
    "SessionConfig",
    "SessionLost",
    "StoreError",
    "TLSConfig",
    "TransportError",
    "connect",
    "connect_blocking",
    "serve",
]

#: Names imported on first access (PEP 562), and the module each comes from.
_LAZY = {"BusConfig": ".bus", "Connection": ".bus", "Handlers": ".bus", "RemoteError": ".bus",
         "MeshConnection": ".client", "Server": ".service", "connect": ".client",
         "BlockingConnection": ".blocking", "connect_blocking": ".blocking",
         "SessionConfig": ".session",
         "serve": ".service", "TLSConfig": ".transport.tls",
         # subclasses of trio's errors: loading them imports trio (see errors.py)
         "ConnectionLost": ".errors", "RingCorruptError": ".errors", "SessionLost": ".errors"}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(), __all__)
