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

from typing import TYPE_CHECKING

from resolver.lazy import lazy_names

if TYPE_CHECKING:
    from .client import NBDDisk, list_exports, open_nbd, parse_nbd_url
    from .exports import Export
    from .server import NBDServer
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
    "Export": ".exports", "NBDServer": ".server",
    "TLSMode": ".server_handshake",
    "activation_listeners": ".server_listen", "open_listeners": ".server_listen",
    "parse_listen_address": ".server_listen", "server_ssl_context": ".server_listen",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(), __all__)
