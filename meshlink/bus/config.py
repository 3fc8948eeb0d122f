"""The limits and timers of one bus connection, chosen by each end for itself.

The limits a peer must respect (``max_concurrency``, the windows,
``max_frame_size``) are announced in the hello; the others are local.
``max_connections`` and ``max_partial_bytes`` are a server's, shared by all
its connections (see :mod:`.limits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .codec import DEFAULT_MAX_CONTAINER_LEN, DEFAULT_MAX_FRAME_SIZE, ExtCodec

__all__ = ["BusConfig"]


@dataclass(frozen=True, slots=True)
class BusConfig:
    """Limits and timers of one connection (both ends choose their own).

    Attributes:
        max_concurrency: requests (and, separately, streams) the peer may run
            here at once; announced in the handshake.
        notify_window: bytes of notifications buffered here before the peer
            must wait for credit.
        stream_window: bytes buffered per incoming message stream.
        subscription_window: bytes buffered per block-policy subscription.
        send_buffer_size: bytes of outgoing frames buffered before producers wait.
        max_frame_size: largest frame accepted (default 16 MiB).
        max_container_len: longest msgpack array/map accepted.
        heartbeat_interval: seconds between pings; ``None`` disables heartbeats
            (``meshlink.connect``/``serve`` do so over a session, whose
            keepalive watches each transport instead).
        heartbeat_timeout: seconds without any incoming byte after which the peer
            is declared lost.
        handshake_timeout: seconds allowed for the peer's hello.
        close_timeout: seconds ``aclose`` spends flushing before it gives up.
        ext_types: msgpack ext types allowed (none by default).
        max_subscriptions: subscriptions the peer may hold on us at once; one
            more is a protocol error (the connection closes naming it).
        frame_timeout: seconds a frame may stay incomplete (a slow trickle
            keeps the heartbeat alive); ``None`` disables the check.
        max_connections: connections a server (:func:`serve_bus_listeners`)
            keeps open at once; one more is closed as soon as it is accepted.
        max_partial_bytes: bytes of incomplete frames a server buffers over
            all its connections; a connection whose incomplete frame would
            exceed it is closed.
    """

    max_concurrency: int = 64
    notify_window: int = 256 * 1024
    stream_window: int = 256 * 1024
    subscription_window: int = 256 * 1024
    send_buffer_size: int = 1024 * 1024
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN
    heartbeat_interval: float | None = 5.0
    heartbeat_timeout: float = 15.0
    handshake_timeout: float = 10.0
    close_timeout: float = 1.0
    ext_types: Sequence[ExtCodec] = ()
    max_subscriptions: int = 1024
    frame_timeout: float | None = 30.0
    max_connections: int = 256
    max_partial_bytes: int = 64 * 1024 * 1024
