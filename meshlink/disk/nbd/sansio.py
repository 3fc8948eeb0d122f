"""The sans-io NBD core's common parts: NEED_DATA, the receive buffer, shared events.

Theory of operation
-------------------
Follows the NBD protocol document (NetworkBlockDevice/nbd ``doc/proto.md``):
fixed newstyle negotiation, then the transmission phase.  Each side of each
phase is one plain state machine in the manner of h11, in its own module:

* ``server_handshake``: the server's option phase (:class:`ServerHandshake`);
* ``server_transmission``: the server's request parser (:class:`ServerTransmission`);
* ``client_handshake``: the client's option phase (:class:`ClientHandshake`);
* ``client_transmission``: the client's reply reassembly (:class:`ClientTransmission`).

Bytes go in (``receive_data``, or the zero-copy ``get_buffer`` /
``buffer_updated`` pair), ``next_event`` returns one event or
:data:`NEED_DATA`, and bytes to write come out of ``data_to_send`` or the
encoders in ``wire``.  No trio, socket or clock imports: any loop, or a plain
blocking thread, can drive them (``server`` and ``client`` are the adapters).

Rules every machine keeps:

1. Blame is split: a peer breaking a MUST raises
   :class:`~meshlink.RemoteProtocolError` (the adapter then hard-disconnects);
   our caller misusing the API raises :class:`~meshlink.LocalProtocolError`.
   After either, the machine is failed and every later call fails fast.
2. Buffers are bounded; each machine's module says how.
"""

from __future__ import annotations

from typing import Final

from ...errors import LocalProtocolError, RemoteProtocolError


class NeedData:
    """Sentinel: feed more bytes before asking again."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class HardDisconnect(RemoteProtocolError):
    """The protocol requires us to drop the connection (no error reply is possible).

    Raised for bad magic, unknown client flags, an EXPORT_NAME we cannot
    satisfy, or data after EOF in the middle of a message.
    """


class RecvBuffer:
    """A fixed-capacity bytearray with a read and a write index.

    ``get_buffer(n)`` guarantees ``n`` free bytes; it compacts in place (a
    same-length slice assignment, legal even while views exist) or, when
    more capacity is needed, swaps in a larger bytearray (old views keep the
    old one alive).
    """

    __slots__ = ("buf", "start", "end")

    def __init__(self, capacity: int = 1 << 18) -> None:
        self.buf = bytearray(capacity)
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def get_buffer(self, need: int) -> memoryview:
        pending = self.end - self.start
        free = len(self.buf) - self.end
        if free < need or free < 4096:
            if pending + need <= len(self.buf):
                if pending:
                    self.buf[0:pending] = memoryview(self.buf)[self.start : self.end]
            else:
                size = max(len(self.buf), pending + need + 65536)
                new = bytearray(size)
                new[0:pending] = memoryview(self.buf)[self.start : self.end]
                self.buf = new
            self.start, self.end = 0, pending
        return memoryview(self.buf)[self.end :]

    def updated(self, n: int) -> None:
        if n < 0 or self.end + n > len(self.buf):
            raise LocalProtocolError("buffer_updated beyond the buffer handed out")
        self.end += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.get_buffer(n)[:n] = data
        self.end += n

    def take(self, n: int) -> bytes:
        out = bytes(memoryview(self.buf)[self.start : self.start + n])
        self.start += n
        return out

    def rest(self) -> bytes:
        return self.take(self.end - self.start)


class Inbox:
    """Bytes in, for the four machines: ``_in`` (a :class:`RecvBuffer`) and ``_eof``.

    Two ways to feed a machine: copy bytes in with :meth:`receive_data`, or
    ``recv_into`` a view from the machine's ``get_buffer`` and report the
    count with :meth:`buffer_updated`.  Zero bytes means EOF either way.
    """

    _in: RecvBuffer
    _eof: bool

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes (copying); ``b""`` means EOF."""
        if not data:
            self._eof = True
        else:
            self._in.feed(data)

    def buffer_updated(self, n: int) -> None:
        """``n`` bytes landed in the last ``get_buffer`` view (0 = EOF)."""
        if n == 0:
            self._eof = True
        else:
            self._in.updated(n)


class Outbox:
    """Bytes out, for the handshake machines: ``_out``, drained by :meth:`data_to_send`."""

    _out: list[bytes]

    def data_to_send(self) -> bytes:
        """Bytes the adapter must write now (may be empty)."""
        out = b"".join(self._out)
        self._out.clear()
        return out


class StartTLS:
    """Event: STARTTLS was acknowledged; send pending bytes, then run the TLS handshake.

    Either handshake machine returns it; the adapter then calls that
    machine's ``tls_established`` once the TLS handshake completed.
    """

    __slots__ = ()
