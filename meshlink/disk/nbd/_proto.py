"""Sans-io NBD: the handshake and transmission phases, both sides, no I/O.

Theory of operation
-------------------
Follows the NBD protocol document (NetworkBlockDevice/nbd ``doc/proto.md``):
fixed newstyle negotiation, options EXPORT_NAME, ABORT, LIST, STARTTLS,
INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT (``base:allocation``), then
the transmission phase (simple and structured replies).

Every class here is a plain state machine in the manner of h11: bytes go in
(:meth:`receive_data`, or the zero-copy :meth:`get_buffer` /
:meth:`buffer_updated` pair), :meth:`next_event` returns one event or
:data:`NEED_DATA`, and bytes to write come out of :meth:`data_to_send` or
from the reply serialisers.  No trio, socket or clock imports: any loop, or a
plain blocking thread, can drive them.

Rules of this file:

1. Every state change goes through ``_goto``, checked against the
   transition table ``_SERVER_TRANSITIONS`` / ``_CLIENT_TRANSITIONS``;
   a transition missing from the table is a bug (``LocalProtocolError``).
2. Blame is split: a peer breaking a MUST raises
   :class:`~meshlink.RemoteProtocolError` (the adapter then hard-disconnects);
   our caller misusing the API raises :class:`~meshlink.LocalProtocolError`.
   After either, the machine is in ERROR and every later call fails fast.
3. Buffers are bounded: option data above ``max_option`` is skipped (not
   buffered) and answered with ``NBD_REP_ERR_TOO_BIG``; a WRITE above
   ``max_request`` has its payload skipped and is answered ``EINVAL``.
   Everything a well-formed but wrong request can cause (bad range, read-only,
   unknown command or flag) is an error *reply*, never a disconnect.

Payload views: a WRITE request's ``payload`` is a memoryview into the receive
buffer, valid until the next ``get_buffer``/``receive_data`` call.  The buffer
is fixed-size and only ever overwritten in place or replaced, never resized,
so a stale view can at worst see newer bytes; it can never fault.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, TypeAlias

from ..._errors import LocalProtocolError, RemoteProtocolError
from . import _const as c


class _NeedData:
    """Sentinel: feed more bytes before asking again."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class HardDisconnect(RemoteProtocolError):
    """The protocol requires us to drop the connection (no error reply is possible).

    Raised for bad magic, unknown client flags, an EXPORT_NAME we cannot
    satisfy, or data after EOF in the middle of a message.
    """


# --- a receive buffer with a zero-copy fill path ----------------------------


class _RecvBuffer:
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


# --- shared value types --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export (no backend here).

    Attributes:
        name: export name as listed.
        size: size in bytes.
        flags: transmission flags (``TF_*``), HAS_FLAGS included, DF excluded
            (it is added when structured replies are negotiated).
        description: human text for NBD_INFO_DESCRIPTION / LIST.
        min_block / preferred_block / max_block: NBD_INFO_BLOCK_SIZE values.
    """

    name: str
    size: int
    flags: int
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = c.MAX_REQUEST


@dataclasses.dataclass(frozen=True, slots=True)
class StartTLS:
    """Event: STARTTLS was acknowledged; send pending bytes, then run the TLS handshake.

    The adapter calls :meth:`ServerHandshake.tls_established` afterwards.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class Aborted:
    """Event: the client sent NBD_OPT_ABORT (ACK queued); close after sending."""


@dataclasses.dataclass(frozen=True, slots=True)
class EnterTransmission:
    """Event: GO / EXPORT_NAME succeeded; switch to :class:`ServerTransmission`.

    Attributes:
        export: the chosen export.
        flags: the transmission flags actually sent.
        structured: structured replies negotiated.
        contexts: metadata context id -> name selected for this export.
        trailing: bytes received after the final option (normally empty).
    """

    export: ExportInfo
    flags: int
    structured: bool
    contexts: Mapping[int, str]
    trailing: bytes


ServerEvent: TypeAlias = StartTLS | Aborted | EnterTransmission | _NeedData


class TLSMode(enum.Enum):
    """Server TLS policy (NBD document: NOTLS, SELECTIVETLS, FORCEDTLS)."""

    OFF = "off"
    OPTIONAL = "optional"
    REQUIRED = "required"


class _S(enum.Enum):
    """Server handshake states."""

    CLIENT_FLAGS = "await client flags"
    OPTIONS = "await option"
    TLS_PENDING = "TLS handshake in progress"
    DONE = "transmission"
    CLOSED = "closed"
    ERROR = "error"


_SERVER_TRANSITIONS: Final[frozenset[tuple[_S, _S]]] = frozenset({
    (_S.CLIENT_FLAGS, _S.OPTIONS),
    (_S.OPTIONS, _S.OPTIONS),
    (_S.OPTIONS, _S.TLS_PENDING),
    (_S.TLS_PENDING, _S.OPTIONS),
    (_S.OPTIONS, _S.DONE),
    (_S.OPTIONS, _S.CLOSED),
    # any state may fail
    *((s, _S.ERROR) for s in _S),
})


def _option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return c.OPTION_REPLY_HEADER.pack(c.OPTION_REPLY_MAGIC, option, rtype, len(data)) + data


def _string(data: bytes, what: str) -> str:
    if len(data) > c.MAX_STRING:
        raise ValueError(f"{what} longer than {c.MAX_STRING} bytes")
    text = data.decode("utf-8")
    if "\0" in text:
        raise ValueError(f"{what} contains NUL")
    return text


class ServerHandshake:
    """The server side of fixed newstyle negotiation.

    Args:
        lookup: maps an export name to its :class:`ExportInfo`, or None if
            unknown; the empty name means "the default export".
        names: export names to report for NBD_OPT_LIST (with descriptions).
        tls: TLS policy; OPTIONAL/REQUIRED need the adapter to handle StartTLS.
        tls_active: start as if TLS were already running (TLS-wrapped listener).
        max_option: largest option payload buffered; longer ones are skipped
            and refused with NBD_REP_ERR_TOO_BIG.
    """

    def __init__(self, lookup: Callable[[str], ExportInfo | None],
                 names: Callable[[], Iterable[tuple[str, str]]], *,
                 tls: TLSMode = TLSMode.OFF, tls_active: bool = False,
                 max_option: int = 65536) -> None:
        self._lookup = lookup
        self._names = names
        self._tls = tls
        self._tls_active = tls_active
        self._max_option = max_option
        self._state = _S.CLIENT_FLAGS
        self._in = _RecvBuffer(8192)
        self._out: list[bytes] = [c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT,
                                                  c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)]
        self._fixed = False
        self._no_zeroes = False
        self._eof = False
        self._skip = 0  # bytes of an oversized option still to discard
        self._skip_option = 0
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        self._structured = False
        self._contexts: dict[int, str] = {}
        self._contexts_export: str | None = None

    # -- plumbing ---------------------------------------------------------

    @property
    def state(self) -> str:
        """Current state's name (for logs and tests)."""
        return self._state.name

    @property
    def tls_active(self) -> bool:
        """True once TLS is established on this connection."""
        return self._tls_active

    def _goto(self, new: _S) -> None:
        if (self._state, new) not in _SERVER_TRANSITIONS:
            raise LocalProtocolError(f"no transition {self._state.name} -> {new.name}")
        self._state = new

    def _fail(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        self._state = _S.ERROR
        return exc

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means EOF.

        Raises:
            LocalProtocolError: called after an error or after EOF.
        """
        if self._state is _S.ERROR:
            raise LocalProtocolError("handshake already failed")
        if self._eof:
            raise LocalProtocolError("data after EOF")
        if not data:
            self._eof = True
        else:
            self._in.feed(data)

    def data_to_send(self) -> bytes:
        """Bytes the adapter must write now (may be empty)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """Tell the machine the TLS handshake completed after a :class:`StartTLS` event.

        All negotiation state from before STARTTLS is discarded, as the NBD
        document requires.
        """
        self._goto(_S.OPTIONS)
        self._tls_active = True
        self._reset_negotiation()

    # -- the machine --------------------------------------------------------

    def next_event(self) -> ServerEvent:
        """Process buffered input; return the next event or NEED_DATA.

        Returns:
            :class:`StartTLS`, :class:`Aborted`, :class:`EnterTransmission`,
            or :data:`NEED_DATA` (option replies were queued meanwhile).

        Raises:
            HardDisconnect: the client broke a MUST; drop the connection.
            RemoteProtocolError: EOF in the middle of the handshake.
            LocalProtocolError: called in a state that takes no input.
        """
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None

    def _next_event(self) -> ServerEvent:
        while True:
            state = self._state
            if state is _S.ERROR:
                raise LocalProtocolError("handshake already failed")
            if state in (_S.DONE, _S.CLOSED, _S.TLS_PENDING):
                raise LocalProtocolError(f"next_event in state {state.name}")
            if self._skip:
                n = min(self._skip, len(self._in))
                self._in.take(n)
                self._skip -= n
                if self._skip:
                    return self._need()
                self._out.append(_option_reply(self._skip_option, c.REP_ERR_TOO_BIG,
                                               b"option data too long"))
                continue
            if state is _S.CLIENT_FLAGS:
                if len(self._in) < 4:
                    return self._need()
                (flags,) = c.CLIENT_FLAGS.unpack(self._in.take(4))
                if flags & ~(c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES):
                    raise HardDisconnect(f"unknown client flags {flags:#x}")
                self._fixed = bool(flags & c.FLAG_C_FIXED_NEWSTYLE)
                self._no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
                self._goto(_S.OPTIONS)
                continue
            # OPTIONS
            if len(self._in) < 16:
                return self._need()
            magic, option, length = c.OPTION_HEADER.unpack_from(self._in.buf, self._in.start)
            if magic != c.IHAVEOPT:
                raise HardDisconnect(f"bad option magic {magic:#x}")
            if length > self._max_option and option != c.OPT_EXPORT_NAME:
                self._in.take(16)
                self._skip, self._skip_option = length, option
                continue
            if length > self._max_option:
                raise HardDisconnect("EXPORT_NAME longer than any name we serve")
            if len(self._in) < 16 + length:
                return self._need()
            self._in.take(16)
            data = self._in.take(length)
            event = self._option(option, data)
            if event is not None:
                return event

    def _need(self) -> _NeedData:
        if self._eof:
            raise RemoteProtocolError(
                f"client closed the connection during the handshake ({self._state.value})")
        return NEED_DATA

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_option_reply(option, rtype, data))

    def _error(self, option: int, rtype: int, message: str) -> None:
        self._reply(option, rtype, message.encode()[: c.MAX_STRING])

    def _option(self, option: int, data: bytes) -> ServerEvent | None:
        if not self._fixed and option != c.OPT_EXPORT_NAME:
            raise HardDisconnect("only EXPORT_NAME is valid without fixed newstyle")
        if (self._tls is TLSMode.REQUIRED and not self._tls_active
                and option not in (c.OPT_STARTTLS, c.OPT_ABORT)):
            if option == c.OPT_EXPORT_NAME:
                raise HardDisconnect("EXPORT_NAME before STARTTLS on a TLS-only server")
            self._error(option, c.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            return None
        handler = self._handlers.get(option)
        if handler is None:
            self._error(option, c.REP_ERR_UNSUP, f"option {option} not supported")
            return None
        return handler(self, option, data)

    # -- one method per option ------------------------------------------------

    def _opt_abort(self, option: int, data: bytes) -> ServerEvent | None:
        # Data is ignored, as the document asks of servers.
        self._reply(option, c.REP_ACK)
        self._goto(_S.CLOSED)
        return Aborted()

    def _opt_list(self, option: int, data: bytes) -> ServerEvent | None:
        if data:
            self._error(option, c.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None
        for name, description in self._names():
            raw = name.encode()
            self._reply(option, c.REP_SERVER,
                        struct.pack(">I", len(raw)) + raw + description.encode())
        self._reply(option, c.REP_ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> ServerEvent | None:
        if data:
            self._error(option, c.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self._tls is TLSMode.OFF:
            self._error(option, c.REP_ERR_POLICY, "TLS is not enabled on this server")
        elif self._tls_active:
            self._error(option, c.REP_ERR_INVALID, "TLS is already active")
        elif len(self._in):
            raise HardDisconnect("client sent data before the STARTTLS reply")
        else:
            self._reply(option, c.REP_ACK)
            self._goto(_S.TLS_PENDING)
            return StartTLS()
        return None

    def _opt_structured(self, option: int, data: bytes) -> ServerEvent | None:
        if data:
            self._error(option, c.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            return None
        self._structured = True
        self._reply(option, c.REP_ACK)
        return None

    def _opt_info_go(self, option: int, data: bytes) -> ServerEvent | None:
        try:
            if len(data) < 6:
                raise ValueError("too short")
            (nlen,) = struct.unpack_from(">I", data)
            if nlen > len(data) - 6:
                raise ValueError("name length overruns the option")
            name = _string(data[4 : 4 + nlen], "export name")
            (count,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 6 + nlen + 2 * count:
                raise ValueError("information request list has the wrong length")
            wanted = set(struct.unpack_from(f">{count}H", data, 6 + nlen))
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            self._error(option, c.REP_ERR_INVALID, f"malformed INFO/GO: {exc}")
            return None
        export = self._lookup(name)
        if export is None:
            self._error(option, c.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        flags = self._flags(export)
        self._reply(option, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, export.size, flags))
        if c.INFO_NAME in wanted or name != export.name:
            self._reply(option, c.REP_INFO,
                        struct.pack(">H", c.INFO_NAME) + export.name.encode())
        if c.INFO_DESCRIPTION in wanted and export.description:
            self._reply(option, c.REP_INFO,
                        struct.pack(">H", c.INFO_DESCRIPTION) + export.description.encode())
        if c.INFO_BLOCK_SIZE in wanted:
            self._reply(option, c.REP_INFO, struct.pack(
                ">HIII", c.INFO_BLOCK_SIZE, export.min_block, export.preferred_block,
                export.max_block))
        self._reply(option, c.REP_ACK)
        if option == c.OPT_INFO:
            return None
        return self._enter(export, flags)

    def _flags(self, export: ExportInfo) -> int:
        flags = export.flags | c.TF_HAS_FLAGS
        if self._structured:
            flags |= c.TF_SEND_DF  # we never fragment a read reply
        return flags

    def _enter(self, export: ExportInfo, flags: int) -> EnterTransmission:
        contexts = self._contexts if self._contexts_export == export.name else {}
        self._goto(_S.DONE)
        return EnterTransmission(export, flags, self._structured, dict(contexts),
                                 self._in.rest())

    def _opt_export_name(self, option: int, data: bytes) -> ServerEvent | None:
        try:
            name = _string(data, "export name")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HardDisconnect(f"bad EXPORT_NAME: {exc}") from None
        export = self._lookup(name)
        if export is None:
            raise HardDisconnect(f"EXPORT_NAME {name!r}: no such export")
        flags = self._flags(export)
        self._out.append(c.EXPORT_NAME_REPLY.pack(export.size, flags))
        if not self._no_zeroes:
            self._out.append(bytes(124))
        return self._enter(export, flags)

    def _opt_meta(self, option: int, data: bytes) -> ServerEvent | None:
        setting = option == c.OPT_SET_META_CONTEXT
        if setting:
            self._contexts, self._contexts_export = {}, None  # replaced even on failure
        if not self._structured:
            self._error(option, c.REP_ERR_INVALID, "negotiate structured replies first")
            return None
        try:
            if len(data) < 8:
                raise ValueError("too short")
            (nlen,) = struct.unpack_from(">I", data)
            if nlen > len(data) - 8:
                raise ValueError("name length overruns the option")
            name = _string(data[4 : 4 + nlen], "export name")
            pos = 4 + nlen
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries: list[str] = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > len(data) - pos:
                    raise ValueError("query length overruns the option")
                query = _string(data[pos : pos + qlen], "query")
                pos += qlen
                if ":" not in query:
                    raise ValueError(f"query {query!r} has no namespace")
                queries.append(query)
            if pos != len(data):
                raise ValueError("trailing bytes after the queries")
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            self._error(option, c.REP_ERR_INVALID, f"malformed META_CONTEXT: {exc}")
            return None
        export = self._lookup(name)
        if export is None:
            self._error(option, c.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        if setting:
            chosen = [q for q in queries if q == c.BASE_ALLOCATION]
        else:
            chosen = [q for q in queries if q in ("base:", c.BASE_ALLOCATION)]
            if not queries:
                chosen = [c.BASE_ALLOCATION]
        if chosen:
            ctx_id = 1 if setting else 0
            self._reply(option, c.REP_META_CONTEXT,
                        struct.pack(">I", ctx_id) + c.BASE_ALLOCATION.encode())
            if setting:
                self._contexts, self._contexts_export = {1: c.BASE_ALLOCATION}, export.name
        self._reply(option, c.REP_ACK)
        return None

    _handlers: Final[dict[int, Callable[[ServerHandshake, int, bytes], ServerEvent | None]]] = {
        c.OPT_EXPORT_NAME: _opt_export_name,
        c.OPT_ABORT: _opt_abort,
        c.OPT_LIST: _opt_list,
        c.OPT_STARTTLS: _opt_starttls,
        c.OPT_INFO: _opt_info_go,
        c.OPT_GO: _opt_info_go,
        c.OPT_STRUCTURED_REPLY: _opt_structured,
        c.OPT_LIST_META_CONTEXT: _opt_meta,
        c.OPT_SET_META_CONTEXT: _opt_meta,
    }


# --- server transmission ---------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Request:
    """A valid transmission request for the adapter to execute.

    Attributes:
        type: ``CMD_*``.
        flags: ``CMD_FLAG_*`` (already checked against what was negotiated).
        cookie: the client's handle, echoed in the reply.
        offset / length: the range (already checked against the export size).
        payload: WRITE data, a view valid until the next buffer call.
    """

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: memoryview | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class BadRequest:
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


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """Event: NBD_CMD_DISC; finish in-flight replies, then close."""


TransmissionEvent: TypeAlias = Request | BadRequest | Disconnect | _NeedData

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


class ServerTransmission:
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
        self._in = _RecvBuffer(1 << 18)
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

    def buffer_updated(self, n: int) -> None:
        """Record that ``n`` bytes were written into the last :meth:`get_buffer` view."""
        if n == 0:
            self._eof = True
        else:
            self._in.updated(n)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes (copying); ``b""`` means EOF."""
        if not data:
            self._eof = True
        else:
            self._in.feed(data)

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

    def _need(self, avail: int = 0) -> _NeedData:
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


# --- reply serialisers (pure functions) --------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A 16-byte simple reply (success or error; READ data follows separately)."""
    return c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)


def read_reply_header(cookie: int, offset: int, length: int, structured: bool) -> bytes:
    """Header preceding ``length`` bytes of READ data (one chunk, DONE when structured)."""
    if structured:
        if length == 0:
            return c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                                       c.REPLY_TYPE_NONE, cookie, 0)
        return c.DATA_CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                                        c.REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset)
    return c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie)


def hole_reply(cookie: int, offset: int, length: int) -> bytes:
    """A structured READ reply saying the whole range reads as zeroes."""
    return c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                               c.REPLY_TYPE_OFFSET_HOLE, cookie, 12) + struct.pack(
                                   ">QI", offset, length)


def error_reply(cookie: int, error: int, message: str, structured: bool) -> bytes:
    """An error reply: a structured ERROR chunk with text, or a simple reply."""
    if not structured:
        return simple_reply(cookie, error)
    text = message.encode()[:1024]
    return c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                               c.REPLY_TYPE_ERROR, cookie, 6 + len(text)) + struct.pack(
                                   ">IH", error, len(text)) + text


def block_status_reply(cookie: int, context_id: int, extents: Sequence[tuple[int, int]],
                       *, done: bool = True) -> bytes:
    """One BLOCK_STATUS chunk: ``extents`` are ``(length, flags)``, lengths < 2^32."""
    body = struct.pack(f">I{2 * len(extents)}I", context_id,
                       *[v for ext in extents for v in ext])
    return c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE if done else 0,
                               c.REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body


def clip_extents(extents: Iterable[tuple[int, int]], length: int, req_one: bool,
                 limit: int = 0xFFFFF000) -> list[tuple[int, int]]:
    """Shape backend extents for the wire.

    Each length is capped below 2^32; with REQ_ONE only the first extent is kept
    and it never exceeds ``length``.  Without it, extents stop once ``length``
    is covered (the last may run past it, as the document allows).
    """
    out: list[tuple[int, int]] = []
    covered = 0
    for elen, flags in extents:
        elen = min(elen, limit)
        if req_one:
            return [(min(elen, length), flags)]
        out.append((elen, flags))
        covered += elen
        if covered >= length or len(out) >= 4096:
            break
    return out


def transmission_flags(*, read_only: bool, can_flush: bool, can_fua: bool, can_trim: bool,
                       can_zero: bool, can_fast_zero: bool, can_multi_conn: bool,
                       can_cache: bool) -> int:
    """Transmission flags that tell the truth about an export's declared capabilities."""
    flags = c.TF_HAS_FLAGS
    if read_only:
        flags |= c.TF_READ_ONLY
    if can_flush:
        flags |= c.TF_SEND_FLUSH
    if can_fua and not read_only:
        flags |= c.TF_SEND_FUA
    if can_trim and not read_only:
        flags |= c.TF_SEND_TRIM
    if not read_only:
        # WRITE_ZEROES can always be served (a buffer of zeroes at worst).
        flags |= c.TF_SEND_WRITE_ZEROES
        if can_zero and can_fast_zero:
            flags |= c.TF_SEND_FAST_ZERO
    if can_multi_conn:
        flags |= c.TF_CAN_MULTI_CONN
    if can_cache:
        flags |= c.TF_SEND_CACHE
    return flags


# --- client handshake ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Negotiated:
    """Event: the client handshake finished; transmission may start.

    Attributes:
        name: export name requested.
        size: export size in bytes.
        flags: transmission flags from the server.
        structured: structured replies negotiated.
        contexts: metadata context id -> name selected.
        min_block / preferred_block / max_block: NBD_INFO_BLOCK_SIZE (defaults if absent).
        description: NBD_INFO_DESCRIPTION, if sent.
        trailing: bytes received after the final reply.
    """

    name: str
    size: int
    flags: int
    structured: bool
    contexts: Mapping[int, str]
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = c.MAX_REQUEST
    description: str = ""
    trailing: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportList:
    """Event: the answer to NBD_OPT_LIST; ``(name, description)`` pairs."""

    exports: tuple[tuple[str, str], ...]


class OptionError(RemoteProtocolError):
    """The server refused an option we needed (its NBD_REP_ERR_* code is attached).

    Attributes:
        option: the option refused.
        reply: the ``REP_ERR_*`` code.
    """

    def __init__(self, message: str, option: int, reply: int) -> None:
        super().__init__(message)
        self.option = option
        self.reply = reply


ClientEvent: TypeAlias = StartTLS | Negotiated | ExportList | _NeedData

_REPLY_NAMES: Final = {
    c.REP_ERR_UNSUP: "unsupported", c.REP_ERR_POLICY: "refused by policy",
    c.REP_ERR_INVALID: "invalid", c.REP_ERR_PLATFORM: "unsupported on this platform",
    c.REP_ERR_TLS_REQD: "TLS required", c.REP_ERR_UNKNOWN: "unknown export",
    c.REP_ERR_SHUTDOWN: "server shutting down",
    c.REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required",
    c.REP_ERR_TOO_BIG: "too big",
}


class _C(enum.Enum):
    """Client handshake states."""

    GREETING = "await greeting"
    STARTTLS = "await STARTTLS reply"
    TLS_PENDING = "TLS handshake in progress"
    STRUCTURED = "await STRUCTURED_REPLY reply"
    META = "await SET_META_CONTEXT replies"
    LIST = "await LIST replies"
    GO = "await GO replies"
    EXPORT_NAME = "await EXPORT_NAME reply"
    DONE = "done"
    ERROR = "error"


_CLIENT_TRANSITIONS: Final[frozenset[tuple[_C, _C]]] = frozenset({
    (_C.GREETING, _C.STARTTLS), (_C.GREETING, _C.STRUCTURED),
    (_C.STARTTLS, _C.TLS_PENDING), (_C.TLS_PENDING, _C.STRUCTURED),
    (_C.STRUCTURED, _C.META), (_C.STRUCTURED, _C.GO), (_C.STRUCTURED, _C.LIST),
    (_C.META, _C.GO), (_C.GO, _C.EXPORT_NAME),
    (_C.GO, _C.DONE), (_C.EXPORT_NAME, _C.DONE), (_C.LIST, _C.DONE),
    *((s, _C.ERROR) for s in _C),
})


def _option(option: int, data: bytes = b"") -> bytes:
    return c.OPTION_HEADER.pack(c.IHAVEOPT, option, len(data)) + data


class ClientHandshake:
    """The client side of fixed newstyle negotiation.

    Sends, in order: [STARTTLS], STRUCTURED_REPLY, [SET_META_CONTEXT], then GO
    with an NBD_INFO_BLOCK_SIZE request (falling back to EXPORT_NAME if the
    server does not know GO); or LIST then ABORT when ``list_exports``.

    Args:
        name: export to open.
        tls: send STARTTLS first and refuse to continue without it.
        meta_contexts: contexts to select (e.g. ``("base:allocation",)``).
        list_exports: ask for the export list instead of opening an export.
    """

    def __init__(self, name: str = "", *, tls: bool = False,
                 meta_contexts: Sequence[str] = (), list_exports: bool = False) -> None:
        self._name = name
        self._raw_name = name.encode()
        if len(self._raw_name) > c.MAX_STRING:
            raise LocalProtocolError("export name longer than 4096 bytes")
        self._tls = tls
        self._meta = tuple(meta_contexts)
        self._list = list_exports
        self._state = _C.GREETING
        self._in = _RecvBuffer(8192)
        self._out: list[bytes] = []
        self._eof = False
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[int, str] = {}
        self._info: dict[str, int | str] = {}
        self._exports: list[tuple[str, str]] = []

    @property
    def state(self) -> str:
        """Current state's name."""
        return self._state.name

    def _goto(self, new: _C) -> None:
        if (self._state, new) not in _CLIENT_TRANSITIONS:
            raise LocalProtocolError(f"no transition {self._state.name} -> {new.name}")
        self._state = new

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means EOF."""
        if not data:
            self._eof = True
        else:
            self._in.feed(data)

    def data_to_send(self) -> bytes:
        """Bytes to write now."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """Continue after the TLS handshake that followed a :class:`StartTLS` event."""
        self._goto(_C.STRUCTURED)
        self._out.append(_option(c.OPT_STRUCTURED_REPLY))

    def next_event(self) -> ClientEvent:
        """Process buffered replies.

        Returns:
            :class:`StartTLS`, :class:`Negotiated`, :class:`ExportList` or NEED_DATA.

        Raises:
            OptionError: the server refused GO (unknown export, TLS required...) or STARTTLS.
            RemoteProtocolError: the server broke the protocol or closed early.
        """
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._state = _C.ERROR
            raise

    def _need(self) -> _NeedData:
        if self._eof:
            raise RemoteProtocolError(f"server closed the connection ({self._state.value})")
        return NEED_DATA

    def _next_event(self) -> ClientEvent:
        while True:
            if self._state in (_C.DONE, _C.ERROR, _C.TLS_PENDING):
                raise LocalProtocolError(f"next_event in state {self._state.name}")
            if self._state is _C.GREETING:
                if len(self._in) < 18:
                    return self._need()
                magic, opt, hflags = c.GREETING.unpack(self._in.take(18))
                if magic != c.NBDMAGIC:
                    raise RemoteProtocolError("not an NBD server (bad magic)")
                if opt != c.IHAVEOPT:
                    raise RemoteProtocolError("oldstyle NBD servers are not supported")
                if not hflags & c.FLAG_FIXED_NEWSTYLE:
                    raise RemoteProtocolError("server does not speak fixed newstyle")
                self._no_zeroes = bool(hflags & c.FLAG_NO_ZEROES)
                cflags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if self._no_zeroes else 0)
                self._out.append(c.CLIENT_FLAGS.pack(cflags))
                if self._tls:
                    self._goto(_C.STARTTLS)
                    self._out.append(_option(c.OPT_STARTTLS))
                else:
                    self._goto(_C.STRUCTURED)
                    self._out.append(_option(c.OPT_STRUCTURED_REPLY))
                continue
            if self._state is _C.EXPORT_NAME:
                need = 10 + (0 if self._no_zeroes else 124)
                if len(self._in) < need:
                    return self._need()
                size, flags = c.EXPORT_NAME_REPLY.unpack(self._in.take(need)[:10])
                self._goto(_C.DONE)
                return Negotiated(self._name, size, flags, self._structured,
                                  self._contexts, trailing=self._in.rest())
            if len(self._in) < 20:
                return self._need()
            magic, option, rtype, length = c.OPTION_REPLY_HEADER.unpack_from(
                self._in.buf, self._in.start)
            if magic != c.OPTION_REPLY_MAGIC:
                raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
            if length > 1 << 20:
                raise RemoteProtocolError(f"option reply of {length} bytes")
            if len(self._in) < 20 + length:
                return self._need()
            self._in.take(20)
            data = self._in.take(length)
            event = self._reply(option, rtype, data)
            if event is not None:
                return event

    def _send_go(self) -> None:
        self._goto(_C.GO)
        self._out.append(_option(c.OPT_GO, struct.pack(">I", len(self._raw_name))
                                 + self._raw_name + struct.pack(">HH", 1, c.INFO_BLOCK_SIZE)))

    def _reply(self, option: int, rtype: int, data: bytes) -> ClientEvent | None:
        state = self._state
        expected = {_C.STARTTLS: c.OPT_STARTTLS, _C.STRUCTURED: c.OPT_STRUCTURED_REPLY,
                    _C.META: c.OPT_SET_META_CONTEXT, _C.LIST: c.OPT_LIST,
                    _C.GO: c.OPT_GO}[state]
        if option != expected:
            raise RemoteProtocolError(f"reply to option {option} while waiting for {expected}")
        error = ""
        if rtype & c.REP_FLAG_ERROR:
            error = f"{_REPLY_NAMES.get(rtype, hex(rtype))}"
            if data:
                error += ": " + data.decode("utf-8", "replace")
        if state is _C.STARTTLS:
            if rtype != c.REP_ACK:
                raise OptionError(f"server will not start TLS ({error or rtype})", option, rtype)
            if len(self._in):
                raise RemoteProtocolError("server sent data after the STARTTLS reply")
            self._goto(_C.TLS_PENDING)
            return StartTLS()
        if state is _C.STRUCTURED:
            if rtype & c.REP_FLAG_ERROR:
                if rtype == c.REP_ERR_TLS_REQD:
                    raise OptionError(f"server requires TLS ({error})", option, rtype)
                self._structured = False  # falls back to simple replies
            elif rtype == c.REP_ACK:
                self._structured = True
            else:
                raise RemoteProtocolError(f"unexpected reply {rtype} to STRUCTURED_REPLY")
            if self._list:
                self._goto(_C.LIST)
                self._out.append(_option(c.OPT_LIST))
            elif self._meta and self._structured:
                self._goto(_C.META)
                body = struct.pack(">I", len(self._raw_name)) + self._raw_name
                body += struct.pack(">I", len(self._meta))
                for query in self._meta:
                    raw = query.encode()
                    body += struct.pack(">I", len(raw)) + raw
                self._out.append(_option(c.OPT_SET_META_CONTEXT, body))
            else:
                self._send_go()
            return None
        if state is _C.META:
            if rtype == c.REP_META_CONTEXT:
                if len(data) < 4:
                    raise RemoteProtocolError("short META_CONTEXT reply")
                (ctx,) = struct.unpack_from(">I", data)
                self._contexts[ctx] = data[4:].decode("utf-8", "replace")
                return None
            if rtype & c.REP_FLAG_ERROR:
                self._contexts.clear()  # carry on without block status
            self._send_go()
            return None
        if state is _C.LIST:
            if rtype == c.REP_SERVER:
                if len(data) < 4:
                    raise RemoteProtocolError("short SERVER reply")
                (nlen,) = struct.unpack_from(">I", data)
                if nlen > len(data) - 4:
                    raise RemoteProtocolError("SERVER reply name overruns")
                self._exports.append((data[4 : 4 + nlen].decode("utf-8", "replace"),
                                      data[4 + nlen :].decode("utf-8", "replace")))
                return None
            if rtype & c.REP_FLAG_ERROR:
                raise OptionError(f"LIST refused ({error})", option, rtype)
            self._goto(_C.DONE)
            self._out.append(_option(c.OPT_ABORT))
            return ExportList(tuple(self._exports))
        # GO
        if rtype == c.REP_INFO:
            if len(data) < 2:
                raise RemoteProtocolError("short INFO reply")
            (itype,) = struct.unpack_from(">H", data)
            if itype == c.INFO_EXPORT and len(data) == 12:
                _, size, flags = struct.unpack(">HQH", data)
                self._info["size"], self._info["flags"] = size, flags
            elif itype == c.INFO_BLOCK_SIZE and len(data) == 14:
                _, lo, pref, hi = struct.unpack(">HIII", data)
                self._info.update(min_block=lo, preferred_block=pref, max_block=hi)
            elif itype == c.INFO_DESCRIPTION:
                self._info["description"] = data[2:].decode("utf-8", "replace")
            return None  # unknown info types are ignored, as required
        if rtype == c.REP_ERR_UNSUP:
            self._goto(_C.EXPORT_NAME)
            self._out.append(_option(c.OPT_EXPORT_NAME, self._raw_name))
            return None
        if rtype & c.REP_FLAG_ERROR:
            raise OptionError(f"cannot open export {self._name!r}: {error}", option, rtype)
        if rtype != c.REP_ACK or "size" not in self._info:
            raise RemoteProtocolError("GO succeeded without NBD_INFO_EXPORT")
        self._goto(_C.DONE)
        info = self._info
        return Negotiated(
            self._name, int(info["size"]), int(info["flags"]), self._structured,
            dict(self._contexts), int(info.get("min_block", 1)),
            int(info.get("preferred_block", 4096)),
            int(info.get("max_block", c.MAX_REQUEST)), str(info.get("description", "")),
            self._in.rest())


# --- client transmission -----------------------------------------------------------


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


ClientTransmissionEvent: TypeAlias = Reply | _NeedData


class ClientTransmission:
    """Serialises requests and reassembles (simple or structured) replies.

    Args:
        negotiated: the :class:`Negotiated` event that ended the handshake.
    """

    def __init__(self, negotiated: Negotiated) -> None:
        self.info = negotiated
        self._structured = negotiated.structured
        self._in = _RecvBuffer(1 << 18)
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

    def buffer_updated(self, n: int) -> None:
        """``n`` bytes landed in the last :meth:`get_buffer` view (0 = EOF)."""
        if n == 0:
            self._eof = True
        else:
            self._in.updated(n)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means EOF."""
        if not data:
            self._eof = True
        else:
            self._in.feed(data)

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

    def _need(self, avail: int) -> _NeedData:
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
