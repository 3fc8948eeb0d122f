"""The events of the bus protocol: one dataclass per frame kind, and the frame kinds.

These are the vocabulary shared by the sans-io core (:mod:`.proto`), which
turns bytes into events and events into bytes, and the codec (:mod:`.codec`),
which maps each event to its msgpack shape.  They hold plain data and no
behaviour, so any layer may import them without pulling in the others.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "NEED_DATA",
    "Cancel",
    "Channel",
    "Close",
    "ConnectionClosed",
    "Credit",
    "Error",
    "Event",
    "Hello",
    "Kind",
    "NeedData",
    "Notify",
    "Ping",
    "Pong",
    "Publish",
    "Reply",
    "Request",
    "StreamData",
    "StreamEnd",
    "StreamOpen",
    "StreamReset",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
]


class Kind(enum.IntEnum):
    """Frame kinds: the first element of every array frame (``"k"`` of the hello map)."""

    HELLO = 0
    REQUEST = 1
    REPLY = 2
    ERROR = 3
    CANCEL = 4
    NOTIFY = 5
    SUBSCRIBE = 6
    SUBSCRIBED = 7
    UNSUBSCRIBE = 8
    PUBLISH = 9
    STREAM_OPEN = 10
    STREAM_DATA = 11
    STREAM_END = 12
    STREAM_RESET = 13
    CREDIT = 14
    PING = 15
    PONG = 16
    CLOSE = 17


class Channel(enum.IntEnum):
    """What a :class:`Credit` frame refills."""

    NOTIFY = 0
    SUBSCRIPTION = 1
    STREAM = 2


# --- events ----------------------------------------------------------------


@dataclass(slots=True)
class Hello:
    """First frame each way.

    Attributes:
        version: bus protocol version (:data:`~meshlink.bus.PROTOCOL_VERSION`).
        features: feature names the sender supports.
        name: the sender's service name (informational).
        max_concurrency: how many requests the sender runs at once for its peer.
        notify_window: bytes of notify frames the sender buffers before credit.
        stream_window: bytes of stream data the sender buffers per stream.
        max_frame_size: the largest frame the sender accepts.
    """

    version: int
    features: list[str]
    name: str
    max_concurrency: int
    notify_window: int
    stream_window: int
    max_frame_size: int


@dataclass(slots=True)
class Request:
    """Call ``method(*args)`` on the peer; answered by :class:`Reply` or :class:`Error`."""

    id: int
    method: str
    args: list[Any]


@dataclass(slots=True)
class Reply:
    """Successful result of request ``id``."""

    id: int
    result: Any


@dataclass(slots=True)
class Error:
    """Failed request ``id``: the remote exception type name and message."""

    id: int
    type: str
    message: str


@dataclass(slots=True)
class Cancel:
    """The caller of request ``id`` gave up; the handler should be cancelled."""

    id: int


@dataclass(slots=True)
class Notify:
    """One-way call of ``method(*args)``; ``size`` is its wire size (credit)."""

    method: str
    args: list[Any]
    size: int = 0


@dataclass(slots=True)
class Subscribe:
    """Subscription ``id`` (chosen by the subscriber) to topics starting with ``prefix``.

    ``window`` is the subscriber's credit in bytes; 0 means the subscriber drops
    the oldest queued messages itself and the publisher never waits.
    """

    id: int
    prefix: str
    window: int


@dataclass(slots=True)
class Subscribed:
    """The publisher registered subscription ``id``."""

    id: int


@dataclass(slots=True)
class Unsubscribe:
    """The subscriber cancels subscription ``id``."""

    id: int


@dataclass(slots=True)
class Publish:
    """Message ``data`` on ``topic`` for subscription ``id``; ``size`` is its wire size."""

    id: int
    topic: str
    data: Any
    size: int = 0


@dataclass(slots=True)
class StreamOpen:
    """Open message stream ``id`` (chosen by the opener) with handler ``method(*args)``."""

    id: int
    method: str
    args: list[Any]


@dataclass(slots=True)
class StreamData:
    """One message on a stream.

    ``opened_by_sender`` says whose id space ``id`` is in: true when the side that
    sends this frame opened the stream.  ``size`` is the wire size (credit).
    """

    id: int
    opened_by_sender: bool
    data: Any
    size: int = 0


@dataclass(slots=True)
class StreamEnd:
    """The sender will send no more messages on this stream (a normal end)."""

    id: int
    opened_by_sender: bool


@dataclass(slots=True)
class StreamReset:
    """The sender abandons the stream: it will neither send nor read any more.

    ``type``/``message`` describe an error (empty ``type``: a plain close).
    """

    id: int
    opened_by_sender: bool
    type: str = ""
    message: str = ""


@dataclass(slots=True)
class Credit:
    """The sender consumed ``amount`` bytes of a channel's window: the peer may send more."""

    channel: Channel
    amount: int
    id: int = 0
    opened_by_sender: bool = False


@dataclass(slots=True)
class Ping:
    """Liveness probe; answered by :class:`Pong` with the same ``nonce``."""

    nonce: int


@dataclass(slots=True)
class Pong:
    """Answer to :class:`Ping`."""

    nonce: int


@dataclass(slots=True)
class Close:
    """The sender is closing the connection; a non-empty ``type`` names a protocol error."""

    type: str = ""
    message: str = ""


@dataclass(slots=True)
class ConnectionClosed:
    """The transport reached EOF at a frame boundary (never sent, only received)."""


Event = (
    Hello
    | Request
    | Reply
    | Error
    | Cancel
    | Notify
    | Subscribe
    | Subscribed
    | Unsubscribe
    | Publish
    | StreamOpen
    | StreamData
    | StreamEnd
    | StreamReset
    | Credit
    | Ping
    | Pong
    | Close
    | ConnectionClosed
)


class NeedData:
    """The type of :data:`NEED_DATA` (one instance)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`.proto.BusProtocol.next_event` when no complete frame is buffered.
NEED_DATA: Final = NeedData()
