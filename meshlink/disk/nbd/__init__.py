"""NBD (Network Block Device) server and client for meshlink disks.

Server: :class:`NBDServer` with :class:`Export` entries, listening on TCP,
Unix sockets, stdin/stdout or systemd socket activation, with optional TLS.
Client: :func:`open_nbd` yields an :class:`NBDDisk`.

Where things live: ``wire`` (constants, record layouts, encoders); the
sans-io machines ``server_handshake``, ``server_transmission``,
``client_handshake``, ``client_transmission`` (shared parts in ``sansio``),
which any event loop can drive; their trio adapters ``server`` and
``client``; and ``server_listen`` (listeners, the bounded accept loop).
"""

from __future__ import annotations

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
