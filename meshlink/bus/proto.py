"""Sans-io core of the meshlink message bus: frames in, events out, events in, bytes out.

Theory of operation
-------------------
This module does no I/O and knows no clock, in the manner of h11: bytes go in
through :meth:`BusProtocol.receive_data` (``b""`` means EOF), events come out of
:meth:`BusProtocol.next_event` (or the :data:`~.events.NEED_DATA` sentinel), and
:meth:`BusProtocol.send` turns an event into the bytes to write.  The trio
adapter (:mod:`.connection`) owns tasks, timers and waiting.  The events are
in :mod:`.events`; how each one looks on the wire is in :mod:`.codec`.

What the core enforces, because both ends must agree on it:

* the handshake: the first frame each way is :class:`~.events.Hello`; a
  different protocol version raises :class:`VersionMismatch` on whichever side
  reads it (both sides read one, so both sides fail clearly);
* the shape and type of every field of every frame (checked by the codec's
  decoders, and inline here for the hot kinds): input is hostile;
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
from collections.abc import Sequence
from typing import Any, Final, Protocol

import msgpack

from ..errors import LocalProtocolError, RemoteProtocolError
from .codec import (
    DECODERS,
    DEFAULT_MAX_CONTAINER_LEN,
    ENCODERS,
    FEED_CHUNK,
    K_NOTIFY,
    K_PUBLISH,
    K_REPLY,
    K_REQUEST,
    K_STREAM_DATA,
    MAX_ID,
    PROTOCOL_VERSION,
    ExtCodec,
    decode_hello,
    make_packer,
    make_unpackb,
    make_unpacker,
    malformed,
)
from .config import BusConfig
from .errors import PeerClosedError, VersionMismatch
from .events import (
    NEED_DATA,
    Close,
    ConnectionClosed,
    Error,
    Event,
    Hello,
    Kind,
    NeedData,
    Notify,
    Publish,
    Reply,
    Request,
    StreamData,
)

__all__ = ["SHRINK_ABOVE", "BusProtocol", "FrameSink"]

#: After a frame larger than this, the unpacker is replaced as soon as nothing
#: is buffered: its buffer grew to the frame's size and would stay that large
#: for the life of the connection (a peer could pin 16 MiB per connection with
#: one big frame each).
SHRINK_ABOVE: Final = 1 << 20
#: The first two bytes of a request and of a reply as msgpack packs them
#: (a fixarray of 4 or 3, then the kind): take_request and take_reply decode
#: only chunks that start so.
_REQUEST_START: Final = bytes((0x94, K_REQUEST))
_REPLY_START: Final = bytes((0x93, K_REPLY))
#: Notify frame prefixes cached per connection (see BusProtocol.pack_notify):
#: bounds what a caller that invents method names makes us keep.
NOTIFY_PREFIXES: Final = 64


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # the peer's Hello is not in yet
    OPEN = "open"
    CLOSED = "closed"  # EOF or Close received
    ERROR = "error"


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

    @classmethod
    def from_config(cls, config: BusConfig, name: str, features: Sequence[str]) -> BusProtocol:
        """A core whose hello announces ``config``'s limits, our ``name`` and
        ``features``, and which enforces ``config``'s limits on input."""
        return cls(
            Hello(
                version=PROTOCOL_VERSION,
                features=list(features),
                name=name,
                max_concurrency=config.max_concurrency,
                notify_window=config.notify_window,
                stream_window=config.stream_window,
                max_frame_size=config.max_frame_size,
            ),
            max_container_len=config.max_container_len,
            ext_types=config.ext_types,
        )

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
        limit = hello.max_frame_size
        self._max_frame = limit
        self._unpacker = make_unpacker(limit, max_container_len, ext_types)
        self._unpacker_args = (limit, max_container_len, ext_types)
        self._unpackb = make_unpackb(limit, max_container_len, ext_types)
        #: A frame above SHRINK_ABOVE passed: the unpacker's buffer grew to fit
        #: it and never shrinks, so it is replaced once empty (see receive_frames).
        self._grown = False
        self._packer = make_packer(ext_types)
        self._pack_raw = self._packer.pack
        #: method name -> the packed start of a notify frame to it (array
        #: header, kind, name): at most NOTIFY_PREFIXES of them.
        self._notify_prefixes: dict[str, bytes] = {}
        #: Largest frame we may send: our own limit until the peer's hello says.
        self._send_limit = limit
        #: True once sending anything but Close is refused (ERROR state).
        self._send_broken = False
        self._pending: deque[bytes | bytearray] = deque()
        self._fed = 0  # bytes handed to the unpacker so far
        self._pos = 0  # unpacker position after the last complete frame
        self._eof = False
        self.frames_in = 0  # frames received (meshlink.stats); counted per chunk
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

    def incomplete(self) -> tuple[int, int]:
        """``(start, size)`` of the frame buffered but not complete yet.

        ``start`` is the position of its first byte in the stream read so far
        (it changes when another frame becomes the incomplete one); ``size`` is
        0 when no frame is incomplete.  Exact after :meth:`receive_frames`
        returned False (every chunk handed over is then in the unpacker).
        """
        return self._pos, self._fed - self._pos

    def _set_error(self) -> None:
        self._state = _State.ERROR
        self._send_broken = True
        self._notify_prefixes.clear()  # pack_notify's fast path is for a usable sender

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

    def next_event(self) -> Event | NeedData:
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
                assert not isinstance(ev, NeedData)
                sink.event(ev)
                if type(ev) is not Hello:
                    return True
                break
        unpack = self._unpacker.unpack
        tell = self._unpacker.tell
        max_frame = self._max_frame
        shrink_above = min(SHRINK_ABOVE, max_frame)
        max_conc = self.our_hello.max_concurrency
        in_requests = self._in_requests
        out_requests = self._out_requests
        on_notifications = sink.notifications
        batch: list[tuple[str, list[Any], int]] = []
        batch_append = batch.append
        total = 0
        pos = self._pos
        nframes = 0
        try:
            if self._pending:
                # What the first OutOfData below would do, without raising
                # it: the unpacker holds no complete frame between calls.
                self._feed_some()
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
                    if self._grown and self._fed == pos:
                        # Nothing buffered: a fresh unpacker gives the memory back.
                        self._unpacker = make_unpacker(*self._unpacker_args)
                        self._grown = False
                        self._fed = self._pos = pos = 0
                    return False
                except RemoteProtocolError:
                    raise
                except Exception as exc:  # msgpack raises many types: wrap them all
                    raise RemoteProtocolError(f"undecodable frame: {exc!r:.200}") from exc
                new_pos = tell()
                size = new_pos - pos
                pos = new_pos
                nframes += 1
                if size > shrink_above:  # rare: one comparison for the common frame
                    if size > max_frame:
                        raise RemoteProtocolError(
                            f"frame of {size} bytes exceeds the limit of {max_frame}"
                        )
                    self._grown = True
                # The hot kinds, inline; each checks its arity and field types.
                if type(frame) is list:
                    n = len(frame)
                    if n == 3:
                        # A notification, the one-way stream's frame: unpacked
                        # at once, fewer steps than indexing (a reply is 3 too).
                        kind, method, args = frame
                        if kind == 5 and type(method) is str and type(args) is list:  # K_NOTIFY
                            batch_append((method, args, size))
                            total += size
                            continue
                    else:
                        kind = frame[0] if n else None
                    if batch:
                        on_notifications(batch, total)
                        batch = []
                        batch_append = batch.append
                        total = 0
                    if kind == K_REQUEST and n == 4:
                        rid = frame[1]
                        method = frame[2]
                        args = frame[3]
                        if (
                            type(rid) is int
                            and 0 <= rid <= MAX_ID
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
                            if pos == self._fed and self._quiet():
                                return False  # all consumed: no OutOfData round trip
                            continue
                    elif kind == K_REPLY and n == 3:
                        rid = frame[1]
                        if type(rid) is int:
                            try:
                                out_requests.remove(rid)
                            except KeyError:
                                raise RemoteProtocolError(
                                    f"answer to unknown request id {rid!r:.40}"
                                ) from None
                            sink.reply(rid, frame[2])
                            if pos == self._fed and self._quiet():
                                return False  # all consumed: no OutOfData round trip
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
            self.frames_in += nframes

    def _one_frame(self, data: bytes | bytearray) -> Any:
        """The frame ``data`` holds if it is exactly one whole frame and
        nothing is buffered, else None (nothing taken; decoding errors
        included, which the usual path reports)."""
        if (self._pending or self._fed != self._pos or self._state is not _State.OPEN
                or self._eof or len(data) > self._max_frame):
            return None
        try:
            return self._unpackb(data)
        except Exception:  # deliberate: receive_frames decodes it again and says why
            return None

    def take_reply(self, data: bytes, id: int) -> tuple[Any] | None:
        """``(result,)`` if ``data`` is exactly one frame, the reply to our
        request ``id``, and nothing else is buffered; else None, and nothing
        was taken: hand ``data`` to :meth:`receive_data` as usual.

        For a caller that waits for one reply and reads it in one piece (the
        blocking client): the checks and accounting of :meth:`receive_frames`
        for that one frame, without its loop.  Anything else (another
        frame, an error reply, a partial or malformed frame) goes the usual
        way, which also reports what was wrong with it.
        """
        got = self.take_any_reply(data, id)
        return None if got is None else (got[1],)

    def take_any_reply(self, data: bytes | bytearray, only: int | None = None
                       ) -> tuple[int, Any] | None:
        """``(id, result)`` if ``data`` is exactly one frame, the reply to one
        of our requests in flight (to request ``only``, when given), and
        nothing else is buffered; else None, and nothing was taken (as
        :meth:`take_reply`).

        For a reader whose chunks are most often one reply each (a client's):
        the request is then no longer in flight, as after
        :meth:`receive_frames`, and the reply goes to the sink's ``reply``.
        """
        # A reply as our packer (and most) writes it starts with these two
        # bytes: anything else is left to the usual path without decoding it.
        if data[:2] != _REPLY_START:
            return None
        out_requests = self._out_requests
        if only is not None and only not in out_requests:
            return None
        frame = self._one_frame(data)
        if type(frame) is not list or len(frame) != 3 or frame[0] != K_REPLY:
            return None
        rid = frame[1]
        if type(rid) is not int or rid not in out_requests or (only is not None
                                                                and rid != only):
            return None  # the usual path says what is wrong with it
        out_requests.remove(rid)
        self.frames_in += 1
        return rid, frame[2]

    def take_request(self, data: bytes | bytearray) -> tuple[int, str, list[Any]] | None:
        """``(id, method, args)`` if ``data`` is exactly one frame, a request,
        and nothing else is buffered; else None, and nothing was taken (as
        :meth:`take_reply`).  A request the usual path would refuse (an id
        in flight, over our ``max_concurrency``) is not taken either.

        For a reader whose chunks are most often one request each (a
        server's): the request is then counted in flight, as by
        :meth:`receive_frames`, and goes to the sink's ``request``.
        """
        # Decoded only if it starts as our packer (and most) writes a request
        # (a 4-array, kind 1): a client's chunks, replies, are not decoded twice.
        if data[:2] != _REQUEST_START:
            return None
        frame = self._one_frame(data)
        if type(frame) is not list or len(frame) != 4 or frame[0] != K_REQUEST:
            return None
        _, rid, method, args = frame
        in_requests = self._in_requests
        if (type(rid) is not int or not 0 <= rid <= MAX_ID or type(method) is not str
                or type(args) is not list or rid in in_requests
                or len(in_requests) >= self.our_hello.max_concurrency):
            return None
        in_requests.add(rid)
        self.frames_in += 1
        return rid, method, args

    def _quiet(self) -> bool:
        """Whether :meth:`receive_frames` may return at once when the unpacker
        has handed out every byte fed to it: nothing pending, no EOF to
        report, no grown buffer to give back (the OutOfData path does those).
        A request or reply is most often the last frame of its chunk, and
        raising and catching OutOfData costs more than these checks."""
        return not self._pending and not self._eof and not self._grown

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
        if len(chunk) > FEED_CHUNK:
            self._pending.appendleft(chunk[FEED_CHUNK:])
            chunk = chunk[:FEED_CHUNK]
        try:
            self._unpacker.feed(chunk)
        except msgpack.BufferFull as exc:
            raise RemoteProtocolError(
                f"frame exceeds the limit of {self._max_frame} bytes"
            ) from exc
        self._fed += len(chunk)

    def _to_event(self, frame: Any, size: int) -> Event:
        """Validate one frame and do the core's accounting; return its event."""
        if self._state is _State.HANDSHAKE:
            if type(frame) is not dict or frame.get("k") != 0:
                raise RemoteProtocolError("the first frame from the peer must be a hello")
            version = frame.get("v")
            if version != self.our_hello.version:
                raise VersionMismatch(self.our_hello.version, version)
            hello = decode_hello(frame)
            self.peer_hello = hello
            self._send_limit = hello.max_frame_size
            self._state = _State.OPEN
            return hello
        if self._state is _State.CLOSED:
            raise RemoteProtocolError("frame after the peer's close frame")
        if type(frame) is dict and frame.get("k") == 0:
            raise RemoteProtocolError("second hello frame")
        if type(frame) is not list or not frame:
            raise malformed(f"a frame must be a non-empty array, got {type(frame).__name__}")
        kind = frame[0]
        entry = DECODERS.get(kind) if type(kind) is int else None
        if entry is None:
            raise malformed(f"unknown frame kind {kind!r:.40}")
        arity, decoder = entry
        if len(frame) != arity:
            raise malformed(f"{Kind(kind).name} frame has {len(frame)} fields, expected {arity}")
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
        encoder = ENCODERS.get(t)
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
        # A msgpack array is its header and then its items, so the frame is
        # the method's cached prefix followed by the packed arguments: packing
        # the 3-item frame whole took about twice as long for a 64-byte
        # argument (the method name is encoded on every call).  A prefix is
        # cached only once the hello went out, and the cache is emptied when
        # sending breaks, so finding one stands for both checks.
        prefix = self._notify_prefixes.get(method)
        if prefix is None:
            self._check_send_open()
            try:
                prefix = b"\x93" + self._pack_raw(K_NOTIFY) + self._pack_raw(method)
            except Exception:
                self._packer.reset()
                return self._pack((K_NOTIFY, method, args), "Notify")  # raises, worded
            if type(method) is str and len(self._notify_prefixes) < NOTIFY_PREFIXES:
                self._notify_prefixes[method] = prefix
        try:
            data: bytes = prefix + self._pack_raw(args)
        except Exception:
            self._packer.reset()
            return self._pack((K_NOTIFY, method, args), "Notify")  # raises, worded
        if len(data) > self._send_limit:
            return self._pack((K_NOTIFY, method, args), "Notify")  # raises, worded
        return data

    def pack_request(self, id: int, method: str, args: tuple[Any, ...] | list[Any]) -> bytes:
        """``send(Request(id, method, args))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        if id in self._out_requests:
            raise LocalProtocolError(f"request id {id} is already in flight")
        data = self._pack((K_REQUEST, id, method, args), "Request")
        self._out_requests.add(id)
        return data

    def pack_reply(self, id: int, result: Any) -> bytes:
        """``send(Reply(id, result))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        if id not in self._in_requests:
            raise LocalProtocolError(f"answer to request id {id}, which is not in flight")
        data = self._pack((K_REPLY, id, result), "Reply")
        self._in_requests.remove(id)
        return data

    def pack_publish(self, id: int, topic: str, data: Any) -> bytes:
        """``send(Publish(id, topic, data))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        return self._pack((K_PUBLISH, id, topic, data), "Publish")

    def pack_stream_data(self, id: int, opened_by_sender: bool, data: Any) -> bytes:
        """``send(StreamData(id, opened_by_sender, data))`` without the event object."""
        if self._send_broken or not self._hello_sent:
            self._check_send_open()
        return self._pack((K_STREAM_DATA, id, opened_by_sender, data), "StreamData")


class _Eof:
    def __repr__(self) -> str:
        return "_EOF"


_EOF: Final = _Eof()
