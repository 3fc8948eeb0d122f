"""The client's side of the NBD transmission phase, sans-io: requests out, replies in.

Owns cookies, the table of requests in flight, and the reassembly of simple
and structured replies (OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR
chunks) into one :class:`Reply` per request.  It starts from the
:class:`Negotiated` event of ``client_handshake``; the ``client`` adapter
sends the headers it returns and feeds it what the server sends back.

Bounds: a chunk longer than its request could need (or above 16 MiB) is a
:class:`~meshlink.RemoteProtocolError`, never buffered; so are a success
that did not cover a whole READ and EOF with requests in flight.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TypeAlias

from ...errors import LocalProtocolError, RemoteProtocolError
from . import wire as c
from .client_handshake import Negotiated
from .sansio import NEED_DATA, Inbox, NeedData, RecvBuffer


@dataclasses.dataclass(slots=True)
class Reply:
    """Event: one request finished.

    Attributes:
        cookie: the request's handle.
        error: 0 on success, else the NBD errno.
        message: the server's error text, if any.
        data: READ data (exactly the requested length) on success.
        extents: BLOCK_STATUS ``context id -> [(length, flags), ...]``.
    """

    cookie: int
    error: int = 0
    message: str = ""
    data: bytearray | None = None
    extents: dict[int, list[tuple[int, int]]] | None = None


@dataclasses.dataclass(slots=True)
class _Inflight:
    cmd: int
    offset: int
    length: int
    reply: Reply
    covered: int = 0


ClientTransmissionEvent: TypeAlias = Reply | NeedData


class ClientTransmission(Inbox):
    """Serialises requests and reassembles (simple or structured) replies.

    Args:
        negotiated: the :class:`Negotiated` event that ended the handshake.
    """

    def __init__(self, negotiated: Negotiated) -> None:
        self.info = negotiated
        self._structured = negotiated.structured
        self._in = RecvBuffer(1 << 18)
        self._inflight: dict[int, _Inflight] = {}
        self._next_cookie = 1
        self._eof = False
        self._failed = False
        if negotiated.trailing:
            self._in.feed(negotiated.trailing)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._inflight)

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0) -> tuple[
            int, bytes]:
        """Register a request; returns ``(cookie, 28-byte header)``.

        For WRITE the caller sends ``length`` payload bytes right after the header.
        DISC gets no reply and is not tracked.
        """
        if self._failed:
            raise LocalProtocolError("connection already failed")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        if cmd != c.CMD_DISC:
            data = bytearray(length) if cmd == c.CMD_READ else None
            self._inflight[cookie] = _Inflight(cmd, offset, length, Reply(cookie, data=data))
        return cookie, c.REQUEST.pack(c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def get_buffer(self, need: int = 65536) -> memoryview:
        """A writable view to ``recv_into``."""
        return self._in.get_buffer(need)

    def _bad(self, message: str) -> RemoteProtocolError:
        self._failed = True
        return RemoteProtocolError(message)

    def next_event(self) -> ClientTransmissionEvent:
        """Return the next completed :class:`Reply`, or NEED_DATA.

        Raises:
            RemoteProtocolError: malformed reply, unknown cookie, short read
                claimed as success, or EOF with requests in flight.
        """
        inbuf = self._in
        while True:
            avail = inbuf.end - inbuf.start
            if avail < 4:
                return self._need(avail)
            (magic,) = struct.unpack_from(">I", inbuf.buf, inbuf.start)
            if magic == c.SIMPLE_REPLY_MAGIC:
                if avail < 16:
                    return self._need(avail)
                _, error, cookie = c.SIMPLE_REPLY.unpack_from(inbuf.buf, inbuf.start)
                flight = self._inflight.get(cookie)
                if flight is None:
                    raise self._bad(f"reply for unknown cookie {cookie}")
                if flight.cmd == c.CMD_READ and self._structured:
                    raise self._bad("simple reply to READ after structured replies")
                if flight.cmd == c.CMD_READ and not error:
                    if avail < 16 + flight.length:
                        return self._need(avail)
                    assert flight.reply.data is not None
                    start = inbuf.start + 16
                    flight.reply.data[:] = memoryview(inbuf.buf)[start : start + flight.length]
                    inbuf.start = start + flight.length
                else:
                    inbuf.start += 16
                del self._inflight[cookie]
                reply = flight.reply
                if error:
                    reply.error, reply.data = error, None
                return reply
            if magic != c.STRUCTURED_REPLY_MAGIC or not self._structured:
                raise self._bad(f"bad reply magic {magic:#x}")
            if avail < 20:
                return self._need(avail)
            _, flags, rtype, cookie, length = c.CHUNK_HEADER.unpack_from(inbuf.buf, inbuf.start)
            flight = self._inflight.get(cookie)
            if flight is None:
                raise self._bad(f"chunk for unknown cookie {cookie}")
            if length > flight.length + 4096 + 8 and rtype != c.REPLY_TYPE_BLOCK_STATUS:
                raise self._bad(f"chunk of {length} bytes for a {flight.length}-byte request")
            if length > (1 << 24):
                raise self._bad(f"chunk of {length} bytes")
            if avail < 20 + length:
                return self._need(avail)
            start = inbuf.start + 20
            inbuf.start = start + length
            self._chunk(flight, rtype, memoryview(inbuf.buf)[start : start + length])
            if flags & c.REPLY_FLAG_DONE:
                del self._inflight[cookie]
                reply = flight.reply
                if reply.error:
                    reply.data = None
                elif flight.cmd == c.CMD_READ and flight.covered != flight.length:
                    raise self._bad(f"server claimed success for a short read "
                                    f"({flight.covered} of {flight.length} bytes)")
                return reply

    def _chunk(self, flight: _Inflight, rtype: int, body: memoryview) -> None:
        reply = flight.reply
        if rtype == c.REPLY_TYPE_NONE:
            if len(body):
                raise self._bad("NONE chunk with a payload")
        elif rtype in (c.REPLY_TYPE_OFFSET_DATA, c.REPLY_TYPE_OFFSET_HOLE):
            if flight.cmd != c.CMD_READ:
                raise self._bad("read data in reply to a non-read")
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                if len(body) < 9:
                    raise self._bad("short OFFSET_DATA chunk")
                (offset,) = struct.unpack_from(">Q", body)
                size = len(body) - 8
            else:
                if len(body) != 12:
                    raise self._bad("OFFSET_HOLE chunk of the wrong size")
                offset, size = struct.unpack_from(">QI", body)
            rel = offset - flight.offset
            if rel < 0 or size == 0 or rel + size > flight.length:
                raise self._bad("read chunk outside the requested range")
            assert reply.data is not None
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                reply.data[rel : rel + size] = body[8:]
            else:
                reply.data[rel : rel + size] = bytes(size)
            flight.covered += size
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
            if flight.cmd != c.CMD_BLOCK_STATUS or len(body) < 12 or (len(body) - 4) % 8:
                raise self._bad("malformed BLOCK_STATUS chunk")
            values = struct.unpack(f">I{(len(body) - 4) // 4}I", body)
            if reply.extents is None:
                reply.extents = {}
            reply.extents[values[0]] = list(zip(values[1::2], values[2::2], strict=True))
        elif rtype & 0x8000:
            if len(body) < 6:
                raise self._bad("short error chunk")
            error, mlen = struct.unpack_from(">IH", body)
            if mlen > len(body) - 6:
                raise self._bad("error message overruns its chunk")
            reply.error = error or c.EINVAL
            reply.message = bytes(body[6 : 6 + mlen]).decode("utf-8", "replace")
        else:
            raise self._bad(f"unknown chunk type {rtype}")

    def _need(self, avail: int) -> NeedData:
        if self._eof:
            self._failed = True
            if avail or self._inflight:
                raise RemoteProtocolError(
                    f"server closed the connection with {len(self._inflight)} requests in flight")
        return NEED_DATA

    @property
    def eof(self) -> bool:
        """True once EOF was fed."""
        return self._eof
