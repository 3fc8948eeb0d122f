"""The server's side of the NBD option phase (fixed newstyle negotiation), sans-io.

Owns everything between the server's greeting and the first transmission
request: client flags, every option we answer (EXPORT_NAME, ABORT, LIST,
STARTTLS, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT with
``base:allocation``), TLS policy, and the :class:`EnterTransmission` event
that hands over to ``server_transmission``.  To support a new option, add a
``_opt_*`` method and one line in ``ServerHandshake._handlers``.

Rules of this file (the shared ones are in ``sansio``):

1. Every state change goes through ``_goto``, checked against the
   transition table ``_SERVER_TRANSITIONS``; a transition missing from the
   table is a bug (``LocalProtocolError``).
2. Option data above ``max_option`` is skipped (not buffered) and answered
   with ``NBD_REP_ERR_TOO_BIG``.  A malformed option is an error *reply*;
   only what the document says must end the connection raises
   :class:`HardDisconnect`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Final, NamedTuple, TypeAlias

from ...errors import LocalProtocolError, RemoteProtocolError
from . import wire as c
from .sansio import NEED_DATA, HardDisconnect, Inbox, NeedData, Outbox, RecvBuffer, StartTLS


class ExportInfo(NamedTuple):
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


class Aborted:
    """Event: the client sent NBD_OPT_ABORT (ACK queued); close after sending."""

    __slots__ = ()


class EnterTransmission(NamedTuple):
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


ServerEvent: TypeAlias = StartTLS | Aborted | EnterTransmission | NeedData


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


def _string(data: bytes, what: str) -> str:
    if len(data) > c.MAX_STRING:
        raise ValueError(f"{what} longer than {c.MAX_STRING} bytes")
    text = data.decode("utf-8")
    if "\0" in text:
        raise ValueError(f"{what} contains NUL")
    return text


class ServerHandshake(Inbox, Outbox):
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
        self._in = RecvBuffer(8192)
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
        super().receive_data(data)

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
                self._out.append(c.option_reply(self._skip_option, c.REP_ERR_TOO_BIG,
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

    def _need(self) -> NeedData:
        if self._eof:
            raise RemoteProtocolError(
                f"client closed the connection during the handshake ({self._state.value})")
        return NEED_DATA

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(c.option_reply(option, rtype, data))

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

