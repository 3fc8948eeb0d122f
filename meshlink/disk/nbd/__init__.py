"""NBD (Network Block Device) server and client for meshlink disks.

Server: :class:`NBDServer` with :class:`Export` entries, listening on TCP,
Unix sockets, stdin/stdout or systemd socket activation, with optional TLS.
Client: :func:`open_nbd` yields an :class:`NBDDisk`.

Where things live: ``wire`` (constants, record layouts, encoders); the
sans-io machines ``server_handshake``, ``server_transmission``,
``client_handshake``, ``client_transmission`` (shared parts in ``sansio``),
which any event loop can drive; their trio adapters ``server`` and
``client``; and ``server_listen`` (listeners, the bounded accept loop).
The names below are imported on first use, so a server does not load the
client and a client not the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import NBDDisk, list_exports, open_nbd, parse_nbd_url
    from .server import Export, NBDServer
    from .server_handshake import TLSMode
    from .server_listen import (
        activation_listeners,
        open_listeners,
        parse_listen_address,
        server_ssl_context,
    )

__all__ = [
    "Export",
    "NBDDisk",
    "NBDServer",
    "TLSMode",
    "activation_listeners",
    "list_exports",
    "open_listeners",
    "open_nbd",
    "parse_listen_address",
    "parse_nbd_url",
    "server_ssl_context",
]

#: Names imported on first access (PEP 562), and the module each comes from.
_LAZY: dict[str, str] = {
    "NBDDisk": ".client", "list_exports": ".client", "open_nbd": ".client",
    "parse_nbd_url": ".client",
    "Export": ".server", "NBDServer": ".server",
    "TLSMode": ".server_handshake",
    "activation_listeners": ".server_listen", "open_listeners": ".server_listen",
    "parse_listen_address": ".server_listen", "server_ssl_context": ".server_listen",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
