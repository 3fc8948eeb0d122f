"""The wire format of the bus: events to msgpack frames and back, within limits.

The wire is a plain sequence of msgpack objects (docs/bus-wire.md), one per
frame, no length prefix: msgpack frames itself, and one ``msgpack.Unpacker`` per
connection keeps a partial frame buffered until the rest arrives.

Protocol version 2 (this one) sends every frame but the hello as an array
``[kind, field, ...]`` with a fixed length per kind (see
:class:`~.events.Kind` and :data:`DECODERS`); version 1 sent maps with short
string keys.  Arrays halve the cost of packing and unpacking a small frame
(measured: 0.19 vs 0.39 us to pack, 0.12 vs 0.26 us to unpack a 64-byte
notify), which is most of the per-message budget of a one-way stream.  The
hello stays a map in every version, ``{"k": 0, "v": version, ...}``, so that
any version can read any other's hello and both ends report
:class:`~meshlink.bus.VersionMismatch` rather than a malformed frame.

This module owns the shape of each frame and the checks on every field (input
is hostile), the msgpack limits that bound what one frame may cost, and the
ext types a connection allows.  It keeps no per-connection state: the order
of frames and the accounting live in :mod:`.proto`, which calls these tables
and, on its hot paths, inlines their rules for the frequent kinds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ..errors import RemoteProtocolError
from .events import (
    Cancel,
    Channel,
    Close,
    Credit,
    Error,
    Event,
    Hello,
    Kind,
    Notify,
    Ping,
    Pong,
    Publish,
    Reply,
    Request,
    StreamData,
    StreamEnd,
    StreamOpen,
    StreamReset,
    Subscribe,
    Subscribed,
    Unsubscribe,
)

__all__ = [
    "DECODERS",
    "DEFAULT_MAX_CONTAINER_LEN",
    "DEFAULT_MAX_FRAME_SIZE",
    "ENCODERS",
    "FEED_CHUNK",
    "K_ERROR",
    "K_NOTIFY",
    "K_PUBLISH",
    "K_REPLY",
    "K_REQUEST",
    "K_STREAM_DATA",
    "MAX_ID",
    "PROTOCOL_VERSION",
    "ExtCodec",
    "decode_hello",
    "make_packer",
    "make_unpacker",
    "malformed",
]

PROTOCOL_VERSION: Final = 2
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
DEFAULT_MAX_CONTAINER_LEN: Final = 1 << 16
#: Bytes handed to the Unpacker at a time; the Unpacker's buffer is bounded by
#: ``max_frame_size + FEED_CHUNK`` (a partial frame plus one chunk).
FEED_CHUNK: Final = 256 * 1024
MAX_ID: Final = (1 << 63) - 1
_MAX_FEATURES: Final = 64


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


# --- frame field validation (every value from the wire is hostile) ----------


def malformed(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed frame: {what}")


def _check_id(v: Any, what: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_ID:
        raise malformed(f"{what} must be an integer in 0..2**63-1, got {v!r:.80}")
    return v


def _check_str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise malformed(f"{what} must be a string, got {v!r:.80}")
    return v


def _check_list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise malformed(f"{what} must be an array, got {v!r:.80}")
    return v


def _check_bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise malformed(f"{what} must be a boolean, got {v!r:.80}")
    return v


def _get_int(frame: dict[Any, Any], key: str) -> int:
    return _check_id(frame.get(key), f"field {key!r}")


def _get_str(frame: dict[Any, Any], key: str) -> str:
    return _check_str(frame.get(key), f"field {key!r}")


def _get_list(frame: dict[Any, Any], key: str) -> list[Any]:
    return _check_list(frame.get(key), f"field {key!r}")


def decode_hello(f: dict[Any, Any]) -> Hello:
    features = _get_list(f, "f")
    if len(features) > _MAX_FEATURES or any(type(x) is not str for x in features):
        raise malformed("hello features must be a short list of strings")
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
        raise malformed("hello limits must be positive")
    if hello.max_frame_size < 1024:
        raise malformed("hello max frame size must be at least 1024 bytes")
    return hello


# Array frames: [kind, field, ...].  Each decoder gets the frame (its length
# already checked against DECODERS) and its wire size.


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
        raise malformed(f"unknown credit channel {raw}") from None
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
DECODERS: Final[dict[int, tuple[int, Callable[[list[Any], int], Event]]]] = {
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
K_REQUEST: Final = 1
K_REPLY: Final = 2
K_ERROR: Final = 3
K_NOTIFY: Final = 5
K_PUBLISH: Final = 9
K_STREAM_DATA: Final = 11


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
ENCODERS: Final[dict[type, Callable[[Any], Any]]] = {
    Notify: lambda e: (K_NOTIFY, e.method, e.args),
    Request: lambda e: (K_REQUEST, e.id, e.method, e.args),
    Reply: lambda e: (K_REPLY, e.id, e.result),
    Publish: lambda e: (K_PUBLISH, e.id, e.topic, e.data),
    StreamData: lambda e: (K_STREAM_DATA, e.id, e.opened_by_sender, e.data),
    Error: lambda e: (K_ERROR, e.id, e.type, e.message),
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


def _unpack_options(
    max_frame_size: int, max_container_len: int, ext_types: Sequence[ExtCodec]
) -> dict[str, Any]:
    """The msgpack limits for hostile input: strings, binaries and ext payloads
    bounded by the frame size, arrays and maps by ``max_container_len``, an
    ext type accepted only if registered."""
    by_code = {c.code: c for c in ext_types}

    def ext_hook(code: int, data: bytes) -> Any:
        codec = by_code.get(code)
        if codec is None:
            raise RemoteProtocolError(f"msgpack ext type {code} is not registered")
        try:
            return codec.decode(data)
        except Exception as exc:
            raise RemoteProtocolError(f"ext type {code} failed to decode: {exc!r:.200}") from exc

    return {
        "raw": False,
        "strict_map_key": True,
        "use_list": True,
        "max_str_len": max_frame_size,
        "max_bin_len": max_frame_size,
        "max_array_len": max_container_len,
        "max_map_len": max_container_len,
        "max_ext_len": max_frame_size if ext_types else 0,
        "ext_hook": ext_hook,
    }


def make_unpacker(
    max_frame_size: int, max_container_len: int, ext_types: Sequence[ExtCodec]
) -> msgpack.Unpacker:
    """The streaming unpacker of one connection, bounded for hostile input.

    Its buffer holds at most a partial frame plus one fed chunk; the other
    limits are :func:`_unpack_options`'.
    """
    return msgpack.Unpacker(
        max_buffer_size=max_frame_size + FEED_CHUNK,
        **_unpack_options(max_frame_size, max_container_len, ext_types),
    )


def make_unpackb(
    max_frame_size: int, max_container_len: int, ext_types: Sequence[ExtCodec]
) -> Callable[[bytes | bytearray], Any]:
    """``msgpack.unpackb`` with the limits of :func:`make_unpacker`: decodes
    exactly one whole object (anything after it raises ``ExtraData``)."""
    return functools.partial(
        msgpack.unpackb, **_unpack_options(max_frame_size, max_container_len, ext_types)
    )


def make_packer(ext_types: Sequence[ExtCodec]) -> msgpack.Packer:
    """The packer of one connection: bin type on, registered ext types only."""
    codecs = tuple(ext_types)

    def default(obj: Any) -> Any:
        for codec in codecs:
            if isinstance(obj, codec.type):
                return msgpack.ExtType(codec.code, codec.encode(obj))
        raise TypeError(f"cannot serialize {type(obj).__name__!r} (no ext codec registered)")

    return msgpack.Packer(use_bin_type=True, default=default if codecs else None)
