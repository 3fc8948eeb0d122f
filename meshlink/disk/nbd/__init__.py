"""NBD (Network Block Device) server and client for meshlink disks.

Server: :class:`NBDServer` with :class:`Export` entries, listening on TCP,
Unix sockets, stdin/stdout or systemd socket activation, with optional TLS.
Client: :func:`open_nbd` yields an :class:`NBDDisk`.  The sans-io protocol
core lives in ``_proto`` and can be driven by any event loop.
"""

from __future__ import annotations

from ._client import NBDDisk, list_exports, open_nbd, parse_nbd_url
from ._proto import TLSMode
from ._server import (
    Export,
    NBDServer,
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
