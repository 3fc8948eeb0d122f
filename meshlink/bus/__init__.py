"""The meshlink message bus: msgpack frames over any trio stream.

RPC with cancellation, one-way notifications, pub/sub with explicit overflow
policies, credit-controlled message streams and heartbeats, over vchan, TCP,
TLS or an in-memory stream pair.  See README.md, "The message bus", for a tour.

Layout, lowest first (each module imports only the ones before it):
``events`` (the frames as data), ``codec`` (their msgpack shape and limits),
``proto`` (the sans-io state machine), ``errors``; then the trio side:
``flow`` (credit windows), ``writer`` (the outgoing buffer), ``handlers``,
``link`` (what a subscription or stream may ask of its connection),
``limits`` (what one peer may cost a server),
``pubsub``, ``streams``, ``connection``, and ``serve`` on top.
"""

from ..errors import ConnectionLost, LocalProtocolError, ProtocolError, RemoteProtocolError
from .codec import DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION, ExtCodec
from .config import BusConfig
from .connection import Connection
from .errors import PeerClosedError, RemoteError, VersionMismatch
from .handlers import Handlers
from .limits import ServerLimits
from .pubsub import Subscription
from .serve import current_connection, serve_bus, serve_bus_listeners
from .streams import MessageStream

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
    "ServerLimits",
    "Subscription",
    "VersionMismatch",
    "current_connection",
    "serve_bus",
    "serve_bus_listeners",
]
