"""The meshlink message bus: msgpack frames over any trio stream.

RPC with cancellation, one-way notifications, pub/sub with explicit overflow
policies, credit-controlled message streams and heartbeats, over vchan, TCP,
TLS or an in-memory stream pair.  See README.md, "The message bus", for a tour.
"""

from ..errors import ConnectionLost, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._connection import (
    BusConfig,
    Connection,
    Handlers,
    MessageStream,
    Subscription,
    current_connection,
    serve_bus,
    serve_bus_listeners,
)
from ._errors import PeerClosedError, RemoteError, VersionMismatch
from ._proto import DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION, ExtCodec

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "BusConfig",
    "Connection",
    "ConnectionLost",
    "ExtCodec",
    "Handlers",
    "LocalProtocolError",
    "MessageStream",
    "PeerClosedError",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "Subscription",
    "VersionMismatch",
    "current_connection",
    "serve_bus",
    "serve_bus_listeners",
]
