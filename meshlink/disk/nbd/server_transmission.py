"""The server's side of the NBD transmission phase, sans-io: parse and vet requests.

Owns turning request bytes into :class:`Request` / :class:`BadRequest` /
:class:`Disconnect` events, checked against what the option phase
negotiated (the :class:`EnterTransmission` event from ``server_handshake``).
It executes nothing and writes nothing: the ``server`` adapter runs each
request against the backend and answers with the encoders in ``wire``.

Rules of this file (the shared ones are in ``sansio``):

1. Everything a well-formed but wrong request can cause (bad range,
   read-only, unknown command or flag) is an error *reply*, never a
   disconnect; only bad magic or EOF mid-request raise :class:`HardDisconnect`.
2. A WRITE above ``max_request`` has its payload skipped, not buffered, and
   is answered ``EINVAL``.
3. :meth:`ServerTransmission.next_event` is the hot path of every server:
   it reads the buffer's indexes directly and pre-checks plain READs before
   the general validation.  Keep it that way (``bench/bench_nbd.py``).

Payload views: a WRITE request's ``payload`` is a memoryview into the receive
buffer, valid until the next ``get_buffer``/``receive_data`` call.  The buffer
is fixed-size and only ever overwritten in place or replaced, never resized,
so a stale view can at worst see newer bytes; it can never fault.
"""

from __future__ import annotations

from typing import Final, NamedTuple, TypeAlias

from ...errors import LocalProtocolError
from . import wire as c
from .sansio import NEED_DATA, HardDisconnect, Inbox, NeedData, RecvBuffer
from .server_handshake import EnterTransmission


class Request:
    """A valid transmission request for the adapter to execute.

    Attributes:
        type: ``CMD_*``.
        flags: ``CMD_FLAG_*`` (already checked against what was negotiated).
        cookie: the client's handle, echoed in the reply.
        offset / length: the range (already checked against the export size).
        payload: WRITE data, a view valid until the next buffer call.
    """

    __slots__ = ("type", "flags", "cookie", "offset", "length", "payload")

    def __init__(self, type: int, flags: int, cookie: int, offset: int, length: int,
                 payload: memoryview | None = None) -> None:
        self.type = type
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload

    def __repr__(self) -> str:
        return (f"Request(type={self.type}, flags={self.flags:#x}, cookie={self.cookie}, "
                f"offset={self.offset}, length={self.length})")


class BadRequest(NamedTuple):
    """A request that must be answered with an error (the adapter only replies).

    Attributes:
        type / cookie: from the request header.
        errno: NBD error to send.
        message: human text for a structured error chunk.
    """

    type: int
    cookie: int
    errno: int
    message: str


class Disconnect:
    """Event: NBD_CMD_DISC; finish in-flight replies, then close."""

    __slots__ = ()


TransmissionEvent: TypeAlias = Request | BadRequest | Disconnect | NeedData

# Flags each command accepts (FUA is accepted on all when negotiated, per the document).
_ALLOWED_FLAGS: Final[dict[int, int]] = {
    c.CMD_READ: c.CMD_FLAG_DF,
    c.CMD_WRITE: 0,
    c.CMD_FLUSH: 0,
    c.CMD_TRIM: 0,
    c.CMD_CACHE: 0,
    c.CMD_WRITE_ZEROES: c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO,
    c.CMD_BLOCK_STATUS: c.CMD_FLAG_REQ_ONE,
    c.CMD_DISC: 0,
}
# Transmission flag a command needs before a client may send it.
_NEEDS_FLAG: Final[dict[int, int]] = {
    c.CMD_FLUSH: c.TF_SEND_FLUSH,
    c.CMD_TRIM: c.TF_SEND_TRIM,
    c.CMD_WRITE_ZEROES: c.TF_SEND_WRITE_ZEROES,
    c.CMD_CACHE: c.TF_SEND_CACHE,
}
_WRITING: Final = frozenset({c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES})


class ServerTransmission(Inbox):
    """Parses requests and validates them against what was negotiated.

    Args:
        event: the :class:`EnterTransmission` that started this phase.
        max_request: largest READ/WRITE/CACHE length accepted.
    """

    def __init__(self, event: EnterTransmission, *, max_request: int = c.MAX_REQUEST) -> None:
        self.export = event.export
        self.flags = event.flags
        self.structured = event.structured
        self.contexts = dict(event.contexts)
        self._size = event.export.size
        self._max = min(max_request, event.export.max_block)
        self._in = RecvBuffer(1 << 18)
        self._skip = 0
        self._pending_bad: BadRequest | None = None
        self._eof = False
        self._failed = False
        self.bytes_wanted = c.REQUEST.size
        #: WRITEs at least this long are returned with ``payload=None``: the caller
        #: pulls the payload with :meth:`fill_payload` (0 disables; see there).
        self.direct_min = 0
        self._direct = 0  # payload bytes the caller still owes us
        self._allowed = dict(_ALLOWED_FLAGS)
        fua = c.CMD_FLAG_FUA if self.flags & c.TF_SEND_FUA else 0
        for cmd in self._allowed:
            self._allowed[cmd] |= fua
        if not self.flags & c.TF_SEND_DF:
            self._allowed[c.CMD_READ] &= ~c.CMD_FLAG_DF
        if not self.flags & c.TF_SEND_FAST_ZERO:
            self._allowed[c.CMD_WRITE_ZEROES] &= ~c.CMD_FLAG_FAST_ZERO
        if event.trailing:
            self._in.feed(event.trailing)

    def get_buffer(self, need: int = 0) -> memoryview:
        """A writable view to ``recv_into``; at least ``max(need, bytes_wanted)`` long."""
        return self._in.get_buffer(max(need, self.bytes_wanted, 65536))

    def next_event(self) -> TransmissionEvent:
        """Parse the next request.

        Returns:
            :class:`Request` (valid: execute and reply), :class:`BadRequest`
            (reply with its errno), :class:`Disconnect`, or :data:`NEED_DATA`.

        Raises:
            HardDisconnect: bad request magic (the stream cannot be resynchronised),
                or EOF in the middle of a request.
        """
        if self._failed:
            raise LocalProtocolError("transmission already failed")
        if self._direct:
            raise LocalProtocolError("the pending WRITE payload was not consumed")
        inbuf = self._in
        if self._skip:
            n = min(self._skip, inbuf.end - inbuf.start)
            inbuf.start += n
            self._skip -= n
            if self._skip:
                self.bytes_wanted = self._skip
                return self._need()
            bad, self._pending_bad = self._pending_bad, None
            assert bad is not None
            self.bytes_wanted = c.REQUEST.size
            return bad
        avail = inbuf.end - inbuf.start
        if avail < 28:
            self.bytes_wanted = 28 - avail
            return self._need(avail)
        magic, flags, cmd, cookie, offset, length = c.REQUEST.unpack_from(inbuf.buf, inbuf.start)
        if magic != c.REQUEST_MAGIC:
            self._failed = True
            raise HardDisconnect(f"bad request magic {magic:#x}")
        if cmd == c.CMD_WRITE:
            if length > self._max:
                inbuf.start += 28
                self._skip = length
                self._pending_bad = BadRequest(cmd, cookie, c.EINVAL,
                                               f"write of {length} bytes exceeds {self._max}")
                return self.next_event()
            if self.direct_min and length >= self.direct_min:
                bad = self._check(cmd, flags, cookie, offset, length)
                if bad is None:
                    inbuf.start += 28
                    self._direct = length
                    self.bytes_wanted = 28
                    return Request(cmd, flags, cookie, offset, length, None)
            if avail < 28 + length:
                self.bytes_wanted = 28 + length - avail
                return self._need(avail)
            start = inbuf.start + 28
            inbuf.start = start + length
            self.bytes_wanted = 28
            bad = self._check(cmd, flags, cookie, offset, length)
            if bad is not None:
                return bad
            return Request(cmd, flags, cookie, offset, length,
                           memoryview(inbuf.buf)[start : start + length])
        inbuf.start += 28
        if cmd == c.CMD_READ and not flags and offset + length <= self._size \
                and length <= self._max:
            return Request(cmd, flags, cookie, offset, length)  # the hot path, pre-checked
        if cmd == c.CMD_DISC:
            return Disconnect()
        bad = self._check(cmd, flags, cookie, offset, length)
        if bad is not None:
            return bad
        return Request(cmd, flags, cookie, offset, length)

    def fill_payload(self, sinks: list[memoryview]) -> list[memoryview]:
        """Copy the buffered part of a direct WRITE's payload into ``sinks``.

        After :meth:`next_event` returned a WRITE with ``payload=None``, the
        caller supplies the destination (for example views of backend memory,
        so the bytes are received with no user-space copy).  This copies what
        is already buffered and returns the views still to be filled; the
        caller reads exactly those from the connection, then calls
        :meth:`payload_done`.
        """
        inbuf = self._in
        rest: list[memoryview] = []
        for sink in sinks:
            take = min(len(sink), inbuf.end - inbuf.start)
            if take:
                sink[:take] = memoryview(inbuf.buf)[inbuf.start : inbuf.start + take]
                inbuf.start += take
            if take < len(sink):
                rest.append(sink[take:])
        return rest

    def payload_done(self) -> None:
        """The direct WRITE payload has been received in full."""
        self._direct = 0

    def _need(self, avail: int = 0) -> NeedData:
        if self._eof:
            self._failed = True
            if avail or self._skip:
                raise HardDisconnect("client closed the connection in the middle of a request")
            raise HardDisconnect("client closed the connection without NBD_CMD_DISC")
        return NEED_DATA

    @property
    def clean_eof(self) -> bool:
        """True if EOF arrived between requests (abrupt but not mid-message)."""
        return self._eof and self._in.end == self._in.start and not self._skip

    def _check(self, cmd: int, flags: int, cookie: int, offset: int,
               length: int) -> BadRequest | None:
        allowed = self._allowed.get(cmd)
        name = c.CMD_NAMES.get(cmd, str(cmd))
        if allowed is None:
            return BadRequest(cmd, cookie, c.EINVAL, f"unknown command {cmd}")
        if cmd in _WRITING and self.flags & c.TF_READ_ONLY:
            return BadRequest(cmd, cookie, c.EPERM, "export is read-only")
        need = _NEEDS_FLAG.get(cmd)
        if need is not None and not self.flags & need:
            return BadRequest(cmd, cookie, c.EINVAL, f"{name} was not negotiated")
        if cmd == c.CMD_BLOCK_STATUS and not self.contexts:
            return BadRequest(cmd, cookie, c.EINVAL, "no metadata context was negotiated")
        if flags & ~allowed:
            return BadRequest(cmd, cookie, c.EINVAL, f"flags {flags:#x} not valid for {name}")
        if cmd == c.CMD_FLUSH:
            return None  # offset and length are reserved; tolerated if not zero
        if offset + length > self._size:
            err = c.ENOSPC if cmd in (c.CMD_WRITE, c.CMD_WRITE_ZEROES) else c.EINVAL
            return BadRequest(cmd, cookie, err,
                              f"{name} {offset}+{length} beyond export size {self._size}")
        if length > self._max and cmd in (c.CMD_READ, c.CMD_CACHE):
            return BadRequest(cmd, cookie, c.EINVAL, f"{name} of {length} exceeds {self._max}")
        return None

