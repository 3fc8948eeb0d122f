"""Sans-io core of the meshlink message bus: frames in, events out, events in, bytes out.

Theory of operation
-------------------
The wire is a plain sequence of msgpack maps (DESIGN.md section 6), one map per
frame, no length prefix: msgpack frames itself, and one ``msgpack.Unpacker`` per
connection keeps a partial frame buffered until the rest arrives.  Every map
carries the frame kind under ``"k"`` (a small int, see :class:`Kind`) and short
string keys for the fields; integer keys would be smaller but ``strict_map_key``
(which we keep, as msgpack 1.x does) only admits str and bytes keys.

This module does no I/O and knows no clock, in the manner of h11: bytes go in
through :meth:`BusProtocol.receive_data` (``b""`` means EOF), events come out of
:meth:`BusProtocol.next_event` (or the :data:`NEED_DATA` sentinel), and
:meth:`BusProtocol.send` turns an event into the bytes to write.  The trio
adapter (``_connection.py``) owns tasks, timers and waiting.

What the core enforces, because both ends must agree on it:

* the handshake: the first frame each way is :class:`Hello`; a different
  protocol version raises :class:`VersionMismatch` on whichever side reads it
  (both sides read one, so both sides fail clearly);
* the shape and type of every field of every frame: input is hostile;
* size limits: no frame above ``max_frame_size`` (16 MiB by default), no array
  or map longer than ``max_container_len``, no msgpack ext type unless a codec
  was registered for its code, str/bytes map keys only;
* request accounting: a reply must answer a request we sent, each request id
  is answered once, and the peer may not run more requests at once than the
  ``max_concurrency`` we announced;
* the wire size of each frame (``size`` on the events that use credit), read
  from ``Unpacker.tell()``, so that the sender (who measured the packed bytes)
  and the receiver count flow-control credit identically.

Errors are split by blame: :class:`~meshlink.RemoteProtocolError` when the peer
broke the protocol (after which the core is in the ERROR state and every later
call raises again), :class:`~meshlink.LocalProtocolError` when our caller did.
A value that cannot be packed (or a frame too large for the peer) raises
``LocalProtocolError`` *without* breaking the connection: nothing was emitted.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from .._errors import LocalProtocolError, RemoteProtocolError
from ._errors import PeerClosedError, VersionMismatch

__all__ = [
    "DEFAULT_MAX_CONTAINER_LEN",
    "DEFAULT_MAX_FRAME_SIZE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "BusProtocol",
    "Cancel",
    "Channel",
    "Close",
    "ConnectionClosed",
    "Credit",
    "Error",
    "Event",
    "ExtCodec",
    "Hello",
    "Kind",
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

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
DEFAULT_MAX_CONTAINER_LEN: Final = 1 << 16
#: Bytes handed to the Unpacker at a time; the Unpacker's buffer is bounded by
#: ``max_frame_size + _FEED_CHUNK`` (a partial frame plus one chunk).
_FEED_CHUNK: Final = 256 * 1024
_MAX_ID: Final = (1 << 63) - 1
_MAX_FEATURES: Final = 64


class Kind(enum.IntEnum):
    """Frame kinds, the value of key ``"k"`` in every frame."""

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
        version: bus protocol version (:data:`PROTOCOL_VERSION`).
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


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`BusProtocol.next_event` when no complete frame is buffered.
NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class ExtCodec:
    """A msgpack ext type allowed on this connection (none are, unless registered).

    Attributes:
        code: the ext type code, 0..127.
        type: Python class packed with this code (``isinstance`` match).
        encode: turns an instance into bytes.
        decode: turns bytes back into an instance; any exception it raises makes
            the frame malformed (:class:`~meshlink.RemoteProtocolError`).
    """

    code: int
    type: type
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # the peer's Hello is not in yet
    OPEN = "open"
    CLOSED = "closed"  # EOF or Close received
    ERROR = "error"


# --- frame field validation (every value from the wire is hostile) ----------


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed frame: {what}")


def _get_int(frame: dict[Any, Any], key: str) -> int:
    v = frame.get(key)
    if type(v) is not int or not 0 <= v <= _MAX_ID:
        raise _bad(f"field {key!r} must be an integer in 0..2**63-1, got {v!r:.80}")
    return v


def _get_str(frame: dict[Any, Any], key: str, default: str | None = None) -> str:
    v = frame.get(key, default)
    if type(v) is not str:
        raise _bad(f"field {key!r} must be a string, got {v!r:.80}")
    return v


def _get_list(frame: dict[Any, Any], key: str) -> list[Any]:
    v = frame.get(key)
    if type(v) is not list:
        raise _bad(f"field {key!r} must be an array, got {v!r:.80}")
    return v


def _get_bool(frame: dict[Any, Any], key: str) -> bool:
    v = frame.get(key)
    if type(v) is not bool:
        raise _bad(f"field {key!r} must be a boolean, got {v!r:.80}")
    return v


def _need(frame: dict[Any, Any], key: str) -> Any:
    try:
        return frame[key]
    except KeyError:
        raise _bad(f"field {key!r} is missing") from None


def _decode_hello(f: dict[Any, Any], size: int) -> Hello:
    features = _get_list(f, "f")
    if len(features) > _MAX_FEATURES or any(type(x) is not str for x in features):
        raise _bad("hello features must be a short list of strings")
    hello = Hello(
        version=_get_int(f, "v"),
        features=features,
        name=_get_str(f, "n"),
        max_concurrency=_get_int(f, "c"),
        notify_window=_get_int(f, "nw"),
        stream_window=_get_int(f, "sw"),
        max_frame_size=_get_int(f, "x"),
    )
    if hello.max_concurrency < 1 or hello.notify_window < 1 or hello.stream_window < 1:
        raise _bad("hello limits must be positive")
    if hello.max_frame_size < 1024:
        raise _bad("hello max frame size must be at least 1024 bytes")
    return hello


def _decode_request(f: dict[Any, Any], size: int) -> Request:
    return Request(_get_int(f, "i"), _get_str(f, "m"), _get_list(f, "a"))


def _decode_reply(f: dict[Any, Any], size: int) -> Reply:
    return Reply(_get_int(f, "i"), _need(f, "r"))


def _decode_error(f: dict[Any, Any], size: int) -> Error:
    return Error(_get_int(f, "i"), _get_str(f, "e"), _get_str(f, "s", ""))


def _decode_cancel(f: dict[Any, Any], size: int) -> Cancel:
    return Cancel(_get_int(f, "i"))


def _decode_notify(f: dict[Any, Any], size: int) -> Notify:
    return Notify(_get_str(f, "m"), _get_list(f, "a"), size)


def _decode_subscribe(f: dict[Any, Any], size: int) -> Subscribe:
    return Subscribe(_get_int(f, "i"), _get_str(f, "p"), _get_int(f, "w"))


def _decode_subscribed(f: dict[Any, Any], size: int) -> Subscribed:
    return Subscribed(_get_int(f, "i"))


def _decode_unsubscribe(f: dict[Any, Any], size: int) -> Unsubscribe:
    return Unsubscribe(_get_int(f, "i"))


def _decode_publish(f: dict[Any, Any], size: int) -> Publish:
    return Publish(_get_int(f, "i"), _get_str(f, "t"), _need(f, "d"), size)


def _decode_stream_open(f: dict[Any, Any], size: int) -> StreamOpen:
    return StreamOpen(_get_int(f, "i"), _get_str(f, "m"), _get_list(f, "a"))


def _decode_stream_data(f: dict[Any, Any], size: int) -> StreamData:
    return StreamData(_get_int(f, "i"), _get_bool(f, "o"), _need(f, "d"), size)


def _decode_stream_end(f: dict[Any, Any], size: int) -> StreamEnd:
    return StreamEnd(_get_int(f, "i"), _get_bool(f, "o"))


def _decode_stream_reset(f: dict[Any, Any], size: int) -> StreamReset:
    return StreamReset(
        _get_int(f, "i"), _get_bool(f, "o"), _get_str(f, "e", ""), _get_str(f, "s", "")
    )


def _decode_credit(f: dict[Any, Any], size: int) -> Credit:
    raw = _get_int(f, "c")
    try:
        channel = Channel(raw)
    except ValueError:
        raise _bad(f"unknown credit channel {raw}") from None
    opened = f.get("o", False)
    if type(opened) is not bool:
        raise _bad("field 'o' must be a boolean")
    return Credit(channel, _get_int(f, "n"), _get_int(f, "i") if "i" in f else 0, opened)


def _decode_ping(f: dict[Any, Any], size: int) -> Ping:
    return Ping(_get_int(f, "i"))


def _decode_pong(f: dict[Any, Any], size: int) -> Pong:
    return Pong(_get_int(f, "i"))


def _decode_close(f: dict[Any, Any], size: int) -> Close:
    return Close(_get_str(f, "e", ""), _get_str(f, "s", ""))


_DECODERS: Final[dict[int, Callable[[dict[Any, Any], int], Event]]] = {
    Kind.HELLO: _decode_hello,
    Kind.REQUEST: _decode_request,
    Kind.REPLY: _decode_reply,
    Kind.ERROR: _decode_error,
    Kind.CANCEL: _decode_cancel,
    Kind.NOTIFY: _decode_notify,
    Kind.SUBSCRIBE: _decode_subscribe,
    Kind.SUBSCRIBED: _decode_subscribed,
    Kind.UNSUBSCRIBE: _decode_unsubscribe,
    Kind.PUBLISH: _decode_publish,
    Kind.STREAM_OPEN: _decode_stream_open,
    Kind.STREAM_DATA: _decode_stream_data,
    Kind.STREAM_END: _decode_stream_end,
    Kind.STREAM_RESET: _decode_stream_reset,
    Kind.CREDIT: _decode_credit,
    Kind.PING: _decode_ping,
    Kind.PONG: _decode_pong,
    Kind.CLOSE: _decode_close,
}


# Frame-kind ints as plain constants: enum attribute access is slow in hot paths.
_K_NOTIFY: Final = int(Kind.NOTIFY)
_K_REQUEST: Final = int(Kind.REQUEST)
_K_REPLY: Final = int(Kind.REPLY)
_K_PUBLISH: Final = int(Kind.PUBLISH)
_K_STREAM_DATA: Final = int(Kind.STREAM_DATA)


def _encode_hello(e: Any) -> dict[str, Any]:
    return {
        "k": 0,
        "v": e.version,
        "f": list(e.features),
        "n": e.name,
        "c": e.max_concurrency,
        "nw": e.notify_window,
        "sw": e.stream_window,
        "x": e.max_frame_size,
    }


# One encoder per event type (a dict lookup beats a chain of isinstance checks).
_ENCODERS: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    Notify: lambda e: {"k": _K_NOTIFY, "m": e.method, "a": e.args},
    Request: lambda e: {"k": _K_REQUEST, "i": e.id, "m": e.method, "a": e.args},
    Reply: lambda e: {"k": _K_REPLY, "i": e.id, "r": e.result},
    Publish: lambda e: {"k": _K_PUBLISH, "i": e.id, "t": e.topic, "d": e.data},
    StreamData: lambda e: {"k": _K_STREAM_DATA, "i": e.id, "o": e.opened_by_sender, "d": e.data},
    Error: lambda e: {"k": int(Kind.ERROR), "i": e.id, "e": e.type, "s": e.message},
    Credit: lambda e: {
        "k": int(Kind.CREDIT),
        "c": int(e.channel),
        "n": e.amount,
        "i": e.id,
        "o": e.opened_by_sender,
    },
    Cancel: lambda e: {"k": int(Kind.CANCEL), "i": e.id},
    Hello: _encode_hello,
    Subscribe: lambda e: {"k": int(Kind.SUBSCRIBE), "i": e.id, "p": e.prefix, "w": e.window},
    Subscribed: lambda e: {"k": int(Kind.SUBSCRIBED), "i": e.id},
    Unsubscribe: lambda e: {"k": int(Kind.UNSUBSCRIBE), "i": e.id},
    StreamOpen: lambda e: {"k": int(Kind.STREAM_OPEN), "i": e.id, "m": e.method, "a": e.args},
    StreamEnd: lambda e: {"k": int(Kind.STREAM_END), "i": e.id, "o": e.opened_by_sender},
    StreamReset: lambda e: {
        "k": int(Kind.STREAM_RESET),
        "i": e.id,
        "o": e.opened_by_sender,
        "e": e.type,
        "s": e.message,
    },
    Ping: lambda e: {"k": int(Kind.PING), "i": e.nonce},
    Pong: lambda e: {"k": int(Kind.PONG), "i": e.nonce},
    Close: lambda e: {"k": int(Kind.CLOSE), "e": e.type, "s": e.message},
}


class BusProtocol:
    """One end of a bus connection, without I/O.

    Args:
        hello: the :class:`Hello` this side announces.  It must be the first
            event passed to :meth:`send`; its limits are the ones enforced on
            incoming frames.
        max_container_len: longest array or map accepted in incoming frames.
        ext_types: msgpack ext types allowed both ways; any other ext type in
            incoming data is a protocol error, and packing an unknown object
            raises :class:`~meshlink.LocalProtocolError`.

    The same class serves both ends: the protocol is symmetric.
    """

    def __init__(
        self,
        hello: Hello,
        *,
        max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
        ext_types: Sequence[ExtCodec] = (),
    ) -> None:
        if hello.max_frame_size < 1024:
            raise LocalProtocolError("max_frame_size must be at least 1024 bytes")
        self.our_hello: Final = hello
        self.peer_hello: Hello | None = None
        self._state = _State.HANDSHAKE
        self._hello_sent = False
        self._ext_by_code = {c.code: c for c in ext_types}
        self._ext_types = tuple(ext_types)
        limit = hello.max_frame_size
        self._max_frame = limit
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_buffer_size=limit + _FEED_CHUNK,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=max_container_len,
            max_map_len=max_container_len,
            max_ext_len=limit if ext_types else 0,
            ext_hook=self._ext_hook,
        )
        self._packer = msgpack.Packer(
            use_bin_type=True, default=self._default if ext_types else None
        )
        self._pending: deque[bytes | bytearray] = deque()
        self._fed = 0  # bytes handed to the unpacker so far
        self._pos = 0  # unpacker position after the last complete frame
        self._eof = False
        self._in_requests: set[int] = set()  # requests the peer made, not yet answered
        self._out_requests: set[int] = set()  # requests we made, not yet answered

    # --- state ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"handshake"``, ``"open"``, ``"closed"`` or ``"error"``."""
        return self._state.value

    @property
    def requests_in_flight(self) -> int:
        """Requests the peer made that we have not answered yet."""
        return len(self._in_requests)

    # --- incoming --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes received from the peer; ``b""`` means EOF.

        Raises:
            LocalProtocolError: data after EOF.
        """
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data after EOF")
            return
        if data:
            self._pending.append(data)
        else:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        """Return the next complete event, or :data:`NEED_DATA`.

        After EOF at a frame boundary it returns :class:`ConnectionClosed`
        (repeatedly).

        Raises:
            RemoteProtocolError: malformed or oversized frame, EOF inside a frame,
                a frame out of order (see the module docstring).  The core is then
                in the ERROR state and every later call raises again.
            VersionMismatch: the peer's hello has another protocol version.
            PeerClosedError: the peer closed the connection reporting our error.
        """
        if self._state is _State.ERROR:
            raise RemoteProtocolError("connection already failed with a protocol error")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._state = _State.ERROR
            raise

    def _next_event(self) -> Event | _NeedData:
        unpacker = self._unpacker
        while True:
            try:
                frame = unpacker.unpack()
            except msgpack.OutOfData:
                if self._pending:
                    self._feed_some()
                    continue
                if self._eof:
                    if self._fed != self._pos:
                        raise RemoteProtocolError("EOF in the middle of a frame") from None
                    if self._state is not _State.ERROR:
                        self._state = _State.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            except RemoteProtocolError:
                raise
            except Exception as exc:  # msgpack raises many types: wrap them all
                raise RemoteProtocolError(f"undecodable frame: {exc!r:.200}") from exc
            pos = unpacker.tell()
            size = pos - self._pos
            self._pos = pos
            if size > self._max_frame:
                raise RemoteProtocolError(
                    f"frame of {size} bytes exceeds the limit of {self._max_frame}"
                )
            return self._dispatch(frame, size)

    def _feed_some(self) -> None:
        chunk = self._pending.popleft()
        if len(chunk) > _FEED_CHUNK:
            self._pending.appendleft(chunk[_FEED_CHUNK:])
            chunk = chunk[:_FEED_CHUNK]
        try:
            self._unpacker.feed(chunk)
        except msgpack.BufferFull as exc:
            raise RemoteProtocolError(
                f"frame exceeds the limit of {self._max_frame} bytes"
            ) from exc
        self._fed += len(chunk)

    def _ext_hook(self, code: int, data: bytes) -> Any:
        codec = self._ext_by_code.get(code)
        if codec is None:
            raise RemoteProtocolError(f"msgpack ext type {code} is not registered")
        try:
            return codec.decode(data)
        except Exception as exc:
            raise RemoteProtocolError(f"ext type {code} failed to decode: {exc!r:.200}") from exc

    def _dispatch(self, frame: Any, size: int) -> Event:
        if type(frame) is not dict:
            raise _bad(f"a frame must be a map, got {type(frame).__name__}")
        kind = frame.get("k")
        decoder = _DECODERS.get(kind) if type(kind) is int else None
        if decoder is None:
            raise _bad(f"unknown frame kind {kind!r:.40}")
        if self._state is _State.HANDSHAKE:
            if kind != 0:  # Kind.HELLO
                raise RemoteProtocolError("the first frame from the peer must be a hello")
            version = frame.get("v")
            if version != self.our_hello.version:
                raise VersionMismatch(self.our_hello.version, version)
            hello = _decode_hello(frame, size)
            self.peer_hello = hello
            self._state = _State.OPEN
            return hello
        if self._state is _State.CLOSED:
            raise RemoteProtocolError("frame after the peer's close frame")
        event = decoder(frame, size)
        # Only the frames that change shared accounting need more than decoding.
        t = type(event)
        if t is Request:
            assert isinstance(event, Request)
            if event.id in self._in_requests:
                raise RemoteProtocolError(f"request id {event.id} is already in flight")
            if len(self._in_requests) >= self.our_hello.max_concurrency:
                raise RemoteProtocolError(
                    f"peer exceeded the concurrency limit of {self.our_hello.max_concurrency}"
                )
            self._in_requests.add(event.id)
        elif t is Reply or t is Error:
            assert isinstance(event, Reply | Error)
            try:
                self._out_requests.remove(event.id)
            except KeyError:
                raise RemoteProtocolError(f"answer to unknown request id {event.id}") from None
        elif t is Hello:
            raise RemoteProtocolError("second hello frame")
        elif t is Close:
            assert isinstance(event, Close)
            self._state = _State.CLOSED
            if event.type:
                raise PeerClosedError(f"peer closed the connection: {event.type}: {event.message}")
        return event

    # --- outgoing --------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Return the bytes that carry ``event`` to the peer.

        After a protocol error only :class:`Close` may still be sent.

        Raises:
            LocalProtocolError: the event is out of order (not hello first, an
                answer to a request the peer never made, after close), a value
                cannot be packed, or the frame exceeds the peer's size limit.  The
                last two leave the connection usable: nothing was emitted.
        """
        t = type(event)
        if self._state is _State.ERROR and t is not Close:
            # A close frame naming the error is the one thing still worth sending.
            raise LocalProtocolError("connection already failed with a protocol error")
        if not self._hello_sent:
            if t is not Hello:
                raise LocalProtocolError("the first frame must be a hello")
            self._hello_sent = True
        elif t is Hello:
            raise LocalProtocolError("hello already sent")
        if t is ConnectionClosed:
            raise LocalProtocolError("ConnectionClosed is never sent; close the transport")
        encoder = _ENCODERS.get(t)
        if encoder is None:
            raise LocalProtocolError(f"cannot send {event!r:.80}")
        try:
            data: bytes = self._packer.pack(encoder(event))
        except Exception as exc:
            # The C packer raises TypeError, ValueError or OverflowError and may
            # leave its buffer dirty: reset it.
            self._packer.reset()
            raise LocalProtocolError(f"cannot pack {t.__name__}: {exc}") from exc
        limit = self.peer_hello.max_frame_size if self.peer_hello else self._max_frame
        if len(data) > limit:
            raise LocalProtocolError(
                f"{t.__name__} frame of {len(data)} bytes exceeds the peer's limit of {limit}"
            )
        if t is Request:
            assert isinstance(event, Request)
            if event.id in self._out_requests:
                raise LocalProtocolError(f"request id {event.id} is already in flight")
            self._out_requests.add(event.id)
        elif t is Reply or t is Error:
            assert isinstance(event, Reply | Error)
            try:
                self._in_requests.remove(event.id)
            except KeyError:
                raise LocalProtocolError(
                    f"answer to request id {event.id}, which is not in flight"
                ) from None
        return data

    def _default(self, obj: Any) -> Any:
        for codec in self._ext_types:
            if isinstance(obj, codec.type):
                return msgpack.ExtType(codec.code, codec.encode(obj))
        raise TypeError(f"cannot serialize {type(obj).__name__!r} (no ext codec registered)")
