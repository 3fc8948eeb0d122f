"""Sans-io core of the meshlink message bus: frames in, events out, events in, bytes out.

Theory of operation
-------------------
The wire is a plain sequence of msgpack objects (DESIGN.md section 6), one per
frame, no length prefix: msgpack frames itself, and one ``msgpack.Unpacker`` per
connection keeps a partial frame buffered until the rest arrives.

Protocol version 2 (this one) sends every frame but the hello as an array
``[kind, field, ...]`` with a fixed length per kind (see :class:`Kind` and
``_DECODERS``); version 1 sent maps with short string keys.  Arrays halve the
cost of packing and unpacking a small frame (measured: 0.19 vs 0.39 us to
pack, 0.12 vs 0.26 us to unpack a 64-byte notify), which is most of the
per-message budget of a one-way stream.  The hello stays a map in every
version, ``{"k": 0, "v": version, ...}``, so that any version can read any
other's hello and both ends report :class:`VersionMismatch` rather than a
malformed frame.

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
from typing import Any, Final, Protocol

import msgpack

from ..errors import LocalProtocolError, RemoteProtocolError
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
    "FrameSink",
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

PROTOCOL_VERSION: Final = 2
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
DEFAULT_MAX_CONTAINER_LEN: Final = 1 << 16
#: Bytes handed to the Unpacker at a time; the Unpacker's buffer is bounded by
#: ``max_frame_size + _FEED_CHUNK`` (a partial frame plus one chunk).
_FEED_CHUNK: Final = 256 * 1024
_MAX_ID: Final = (1 << 63) - 1
_MAX_FEATURES: Final = 64


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


def _check_id(v: Any, what: str) -> int:
    if type(v) is not int or not 0 <= v <= _MAX_ID:
        raise _bad(f"{what} must be an integer in 0..2**63-1, got {v!r:.80}")
    return v


def _check_str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise _bad(f"{what} must be a string, got {v!r:.80}")
    return v


def _check_list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise _bad(f"{what} must be an array, got {v!r:.80}")
    return v


def _check_bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise _bad(f"{what} must be a boolean, got {v!r:.80}")
    return v


def _get_int(frame: dict[Any, Any], key: str) -> int:
    return _check_id(frame.get(key), f"field {key!r}")


def _get_str(frame: dict[Any, Any], key: str) -> str:
    return _check_str(frame.get(key), f"field {key!r}")


def _get_list(frame: dict[Any, Any], key: str) -> list[Any]:
    return _check_list(frame.get(key), f"field {key!r}")


def _decode_hello(f: dict[Any, Any]) -> Hello:
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


# Array frames: [kind, field, ...].  Each decoder gets the frame (its length
# already checked against _ARITY) and its wire size.


def _decode_request(f: list[Any], size: int) -> Request:
    return Request(
        _check_id(f[1], "request id"), _check_str(f[2], "method"), _check_list(f[3], "args")
    )


def _decode_reply(f: list[Any], size: int) -> Reply:
    return Reply(_check_id(f[1], "reply id"), f[2])


def _decode_error(f: list[Any], size: int) -> Error:
    return Error(
        _check_id(f[1], "error id"),
        _check_str(f[2], "error type"),
        _check_str(f[3], "error message"),
    )


def _decode_cancel(f: list[Any], size: int) -> Cancel:
    return Cancel(_check_id(f[1], "cancel id"))


def _decode_notify(f: list[Any], size: int) -> Notify:
    return Notify(_check_str(f[1], "method"), _check_list(f[2], "args"), size)


def _decode_subscribe(f: list[Any], size: int) -> Subscribe:
    return Subscribe(
        _check_id(f[1], "subscription id"), _check_str(f[2], "prefix"), _check_id(f[3], "window")
    )


def _decode_subscribed(f: list[Any], size: int) -> Subscribed:
    return Subscribed(_check_id(f[1], "subscription id"))


def _decode_unsubscribe(f: list[Any], size: int) -> Unsubscribe:
    return Unsubscribe(_check_id(f[1], "subscription id"))


def _decode_publish(f: list[Any], size: int) -> Publish:
    return Publish(_check_id(f[1], "subscription id"), _check_str(f[2], "topic"), f[3], size)


def _decode_stream_open(f: list[Any], size: int) -> StreamOpen:
    return StreamOpen(
        _check_id(f[1], "stream id"), _check_str(f[2], "method"), _check_list(f[3], "args")
    )


def _decode_stream_data(f: list[Any], size: int) -> StreamData:
    return StreamData(_check_id(f[1], "stream id"), _check_bool(f[2], "opened flag"), f[3], size)


def _decode_stream_end(f: list[Any], size: int) -> StreamEnd:
    return StreamEnd(_check_id(f[1], "stream id"), _check_bool(f[2], "opened flag"))


def _decode_stream_reset(f: list[Any], size: int) -> StreamReset:
    return StreamReset(
        _check_id(f[1], "stream id"),
        _check_bool(f[2], "opened flag"),
        _check_str(f[3], "error type"),
        _check_str(f[4], "error message"),
    )


def _decode_credit(f: list[Any], size: int) -> Credit:
    raw = _check_id(f[1], "credit channel")
    try:
        channel = Channel(raw)
    except ValueError:
        raise _bad(f"unknown credit channel {raw}") from None
    return Credit(
        channel,
        _check_id(f[2], "credit amount"),
        _check_id(f[3], "credit id"),
        _check_bool(f[4], "opened flag"),
    )


def _decode_ping(f: list[Any], size: int) -> Ping:
    return Ping(_check_id(f[1], "ping nonce"))


def _decode_pong(f: list[Any], size: int) -> Pong:
    return Pong(_check_id(f[1], "pong nonce"))


def _decode_close(f: list[Any], size: int) -> Close:
    return Close(_check_str(f[1], "error type"), _check_str(f[2], "error message"))


#: kind -> (frame length, decoder); the hello (a map) is not in here.
_DECODERS: Final[dict[int, tuple[int, Callable[[list[Any], int], Event]]]] = {
    Kind.REQUEST: (4, _decode_request),
    Kind.REPLY: (3, _decode_reply),
    Kind.ERROR: (4, _decode_error),
    Kind.CANCEL: (2, _decode_cancel),
    Kind.NOTIFY: (3, _decode_notify),
    Kind.SUBSCRIBE: (4, _decode_subscribe),
    Kind.SUBSCRIBED: (2, _decode_subscribed),
    Kind.UNSUBSCRIBE: (2, _decode_unsubscribe),
    Kind.PUBLISH: (4, _decode_publish),
    Kind.STREAM_OPEN: (4, _decode_stream_open),
    Kind.STREAM_DATA: (4, _decode_stream_data),
    Kind.STREAM_END: (3, _decode_stream_end),
    Kind.STREAM_RESET: (5, _decode_stream_reset),
    Kind.CREDIT: (5, _decode_credit),
    Kind.PING: (2, _decode_ping),
    Kind.PONG: (2, _decode_pong),
    Kind.CLOSE: (3, _decode_close),
}


# Frame-kind ints as plain constants: enum attribute access is slow in hot paths.
_K_REQUEST: Final = 1
_K_REPLY: Final = 2
_K_ERROR: Final = 3
_K_NOTIFY: Final = 5
_K_PUBLISH: Final = 9
_K_STREAM_DATA: Final = 11


def _encode_hello(e: Hello) -> dict[str, Any]:
    # A map, in every protocol version, so that any version can read any
    # other's hello and report VersionMismatch instead of a malformed frame.
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
_ENCODERS: Final[dict[type, Callable[[Any], Any]]] = {
    Notify: lambda e: (_K_NOTIFY, e.method, e.args),
    Request: lambda e: (_K_REQUEST, e.id, e.method, e.args),
    Reply: lambda e: (_K_REPLY, e.id, e.result),
    Publish: lambda e: (_K_PUBLISH, e.id, e.topic, e.data),
    StreamData: lambda e: (_K_STREAM_DATA, e.id, e.opened_by_sender, e.data),
    Error: lambda e: (_K_ERROR, e.id, e.type, e.message),
    Credit: lambda e: (14, int(e.channel), e.amount, e.id, e.opened_by_sender),
    Cancel: lambda e: (4, e.id),
    Hello: _encode_hello,
    Subscribe: lambda e: (6, e.id, e.prefix, e.window),
    Subscribed: lambda e: (7, e.id),
    Unsubscribe: lambda e: (8, e.id),
    StreamOpen: lambda e: (10, e.id, e.method, e.args),
    StreamEnd: lambda e: (12, e.id, e.opened_by_sender),
    StreamReset: lambda e: (13, e.id, e.opened_by_sender, e.type, e.message),
    Ping: lambda e: (15, e.nonce),
    Pong: lambda e: (16, e.nonce),
    Close: lambda e: (17, e.type, e.message),
}


class FrameSink(Protocol):
    """What :meth:`BusProtocol.receive_frames` hands the frames to.

    The hot frame kinds arrive as plain fields (no event object is built);
    every other event, :class:`ConnectionClosed` included, arrives through
    :meth:`event`.  The fields were validated and the core's accounting
    (request ids, concurrency) is done before the call.  A method may raise
    :class:`~meshlink.RemoteProtocolError` to reject the frame: the core then
    enters the ERROR state.

    Consecutive notifications come as one batch of ``(method, args, size)``
    with their total size, handed over before the next frame of another kind
    and before :meth:`BusProtocol.receive_frames` returns; order is kept.
    """

    def notifications(self, batch: list[tuple[str, list[Any], int]], total: int) -> None: ...

    def request(self, id: int, method: str, args: list[Any]) -> None: ...

    def reply(self, id: int, result: Any) -> None: ...

    def error(self, id: int, type: str, message: str) -> None: ...

    def publish(self, id: int, topic: str, data: Any, size: int) -> None: ...

    def stream_data(self, id: int, opened_by_sender: bool, data: Any, size: int) -> None: ...

    def event(self, event: Event) -> None: ...


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

    Two ways to read: :meth:`next_event` returns one event object at a time
    (simple, used by tests and the handshake); :meth:`receive_frames` hands
    every buffered frame to a :class:`FrameSink` without building event
    objects for the hot kinds (what the trio adapter uses).  Likewise
    :meth:`send` takes an event, and the ``pack_*`` methods take the fields of
    the hot kinds directly.  Both ways enforce the same rules.
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
        self._pack_raw = self._packer.pack
        #: Largest frame we may send: our own limit until the peer's hello says.
        self._send_limit = limit
        #: True once sending anything but Close is refused (ERROR state).
        self._send_broken = False
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

    def _set_error(self) -> None:
        self._state = _State.ERROR
        self._send_broken = True

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
            frame = self._next_frame()
            if frame is NEED_DATA or frame is _EOF:
                return NEED_DATA if frame is NEED_DATA else ConnectionClosed()
            return self._to_event(frame, self._last_size)
        except RemoteProtocolError:
            self._set_error()
            raise

    def receive_frames(self, sink: FrameSink) -> bool:
        """Hand every complete buffered frame to ``sink``, in order.

        Returns:
            True once the peer's stream ended (``sink.event`` received
            :class:`ConnectionClosed` or a :class:`Close`), False when more
            data is needed.

        Raises:
            The same as :meth:`next_event`, plus whatever ``sink`` raises
            (a :class:`~meshlink.RemoteProtocolError` from it puts the core in
            the ERROR state too).
        """
        if self._state is not _State.OPEN:
            # Handshake, closed or failed: the careful path (rare).  Only a
            # hello, ConnectionClosed or an error can come out of it.
            while True:
                ev = self.next_event()
                if ev is NEED_DATA:
                    return False
                assert not isinstance(ev, _NeedData)
                sink.event(ev)
                if type(ev) is not Hello:
                    return True
                break
        unpack = self._unpacker.unpack
        tell = self._unpacker.tell
        max_frame = self._max_frame
        max_conc = self.our_hello.max_concurrency
        in_requests = self._in_requests
        out_requests = self._out_requests
        on_notifications = sink.notifications
        batch: list[tuple[str, list[Any], int]] = []
        batch_append = batch.append
        total = 0
        pos = self._pos
        try:
            while True:
                try:
                    frame = unpack()
                except msgpack.OutOfData:
                    self._pos = pos
                    if self._pending:
                        self._feed_some()
                        continue
                    if batch:
                        on_notifications(batch, total)
                        batch = []
                        batch_append = batch.append
                        total = 0
                    if self._eof:
                        ev = self.next_event()  # EOF handling lives there
                        sink.event(ev)  # type: ignore[arg-type]
                        return True
                    return False
                except RemoteProtocolError:
                    raise
                except Exception as exc:  # msgpack raises many types: wrap them all
                    raise RemoteProtocolError(f"undecodable frame: {exc!r:.200}") from exc
                new_pos = tell()
                size = new_pos - pos
                pos = new_pos
                if size > max_frame:
                    raise RemoteProtocolError(
                        f"frame of {size} bytes exceeds the limit of {max_frame}"
                    )
                # The hot kinds, inline; each checks its arity and field types.
                if type(frame) is list:
                    n = len(frame)
                    kind = frame[0] if n else None
                    if kind == 5 and n == 3:  # _K_NOTIFY
                        method = frame[1]
                        args = frame[2]
                        if type(method) is str and type(args) is list:
                            batch_append((method, args, size))
                            total += size
                            continue
                    if batch:
                        on_notifications(batch, total)
                        batch = []
                        batch_append = batch.append
                        total = 0
                    if kind == _K_REQUEST and n == 4:
                        rid = frame[1]
                        method = frame[2]
                        args = frame[3]
                        if (
                            type(rid) is int
                            and 0 <= rid <= _MAX_ID
                            and type(method) is str
                            and type(args) is list
                        ):
                            if rid in in_requests:
                                raise RemoteProtocolError(f"request id {rid} is already in flight")
                            if len(in_requests) >= max_conc:
                                raise RemoteProtocolError(
                                    f"peer exceeded the concurrency limit of {max_conc}"
                                )
                            in_requests.add(rid)
                            sink.request(rid, method, args)
                            continue
                    elif kind == _K_REPLY and n == 3:
                        rid = frame[1]
                        if type(rid) is int:
                            try:
                                out_requests.remove(rid)
                            except KeyError:
                                raise RemoteProtocolError(
                                    f"answer to unknown request id {rid!r:.40}"
                                ) from None
                            sink.reply(rid, frame[2])
                            continue
                if batch:
                    on_notifications(batch, total)
                    batch = []
                    batch_append = batch.append
                    total = 0
                self._pos = pos
                ev = self._to_event(frame, size)
                t = type(ev)
                if t is Notify:
                    on_notifications([(ev.method, ev.args, size)], size)  # type: ignore[union-attr]
                elif t is Request:
                    sink.request(ev.id, ev.method, ev.args)  # type: ignore[union-attr]
                elif t is Reply:
                    sink.reply(ev.id, ev.result)  # type: ignore[union-attr]
                elif t is Error:
                    sink.error(ev.id, ev.type, ev.message)  # type: ignore[union-attr]
                elif t is Publish:
                    sink.publish(ev.id, ev.topic, ev.data, size)  # type: ignore[union-attr]
                elif t is StreamData:
                    sink.stream_data(ev.id, ev.opened_by_sender, ev.data, size)  # type: ignore[union-attr]
                else:
                    sink.event(ev)
                    if t is Close:
                        return True
        except RemoteProtocolError:
            self._set_error()
            raise
        finally:
            self._pos = pos

    def _next_frame(self) -> Any:
        """The next complete msgpack object, NEED_DATA, or _EOF (clean end)."""
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
                    self._state = _State.CLOSED
                    return _EOF
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
            self._last_size = size
            return frame

    _last_size = 0

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

    def _to_event(self, frame: Any, size: int) -> Event:
        """Validate one frame and do the core's accounting; return its event."""
        if self._state is _State.HANDSHAKE:
            if type(frame) is not dict or frame.get("k") != 0:
                raise RemoteProtocolError("the first frame from the peer must be a hello")
            version = frame.get("v")
            if version != self.our_hello.version:
                raise VersionMismatch(self.our_hello.version, version)
            hello = _decode_hello(frame)
            self.peer_hello = hello
            self._send_limit = hello.max_frame_size
            self._state = _State.OPEN
            return hello
        if self._state is _State.CLOSED:
            raise RemoteProtocolError("frame after the peer's close frame")
        if type(frame) is dict and frame.get("k") == 0:
            raise RemoteProtocolError("second hello frame")
        if type(frame) is not list or not frame:
            raise _bad(f"a frame must be a non-empty array, got {type(frame).__name__}")
        kind = frame[0]
        entry = _DECODERS.get(kind) if type(kind) is int else None
        if entry is None:
            raise _bad(f"unknown frame kind {kind!r:.40}")
        arity, decoder = entry
        if len(frame) != arity:
            raise _bad(f"{Kind(kind).name} frame has {len(frame)} fields, expected {arity}")
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
        if self._send_broken and t is not Close:
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
        data = self._pack(encoder(event), t.__name__)
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

    def _pack(self, obj: Any, what: str) -> bytes:
        try:
            data: bytes = self._packer.pack(obj)
        except Exception as exc:
            # The C packer raises TypeError, ValueError or OverflowError and may
            # leave its buffer dirty: reset it.
            self._packer.reset()
            raise LocalProtocolError(f"cannot pack {what}: {exc}") from exc
        if len(data) > self._send_limit:
            raise LocalProtocolError(
                f"{what} frame of {len(data)} bytes exceeds the peer's limit of {self._send_limit}"
            )
        return data

    # The hot kinds without an event object.  Same rules as send(); they are
    # only valid once the hello went out.

    def _check_send_open(self) -> None:
        if self._send_broken:
            raise LocalProtocolError("connection already failed with a protocol error")
        if not self._hello_sent:
            raise LocalProtocolError("the first frame must be a hello")

    def pack_notify(self, method: str, args: tuple[Any, ...] | list[Any]) -> bytes:
        """``send(Notify(method, args))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        try:
            data: bytes = self._pack_raw((_K_NOTIFY, method, args))
        except Exception:
            self._packer.reset()
            return self._pack((_K_NOTIFY, method, args), "Notify")  # raises, worded
        if len(data) > self._send_limit:
            return self._pack((_K_NOTIFY, method, args), "Notify")  # raises, worded
        return data

    def pack_request(self, id: int, method: str, args: tuple[Any, ...] | list[Any]) -> bytes:
        """``send(Request(id, method, args))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        if id in self._out_requests:
            raise LocalProtocolError(f"request id {id} is already in flight")
        data = self._pack((_K_REQUEST, id, method, args), "Request")
        self._out_requests.add(id)
        return data

    def pack_reply(self, id: int, result: Any) -> bytes:
        """``send(Reply(id, result))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        if id not in self._in_requests:
            raise LocalProtocolError(f"answer to request id {id}, which is not in flight")
        data = self._pack((_K_REPLY, id, result), "Reply")
        self._in_requests.remove(id)
        return data

    def pack_publish(self, id: int, topic: str, data: Any) -> bytes:
        """``send(Publish(id, topic, data))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        return self._pack((_K_PUBLISH, id, topic, data), "Publish")

    def pack_stream_data(self, id: int, opened_by_sender: bool, data: Any) -> bytes:
        """``send(StreamData(id, opened_by_sender, data))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        return self._pack((_K_STREAM_DATA, id, opened_by_sender, data), "StreamData")

    def _default(self, obj: Any) -> Any:
        for codec in self._ext_types:
            if isinstance(obj, codec.type):
                return msgpack.ExtType(codec.code, codec.encode(obj))
        raise TypeError(f"cannot serialize {type(obj).__name__!r} (no ext codec registered)")


class _Eof:
    def __repr__(self) -> str:
        return "_EOF"


_EOF: Final = _Eof()
