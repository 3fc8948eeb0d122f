"""The client's side of the NBD option phase (fixed newstyle negotiation), sans-io.

Owns everything from the server's greeting to the :class:`Negotiated` event
that hands over to ``client_transmission``: which options we send and in
what order ([STARTTLS], STRUCTURED_REPLY, [SET_META_CONTEXT], GO with a
fallback to EXPORT_NAME; or LIST then ABORT), and how we read the replies.

Rules of this file (the shared ones are in ``sansio``):

1. Every state change goes through ``_goto``, checked against the
   transition table ``_CLIENT_TRANSITIONS``; a transition missing from the
   table is a bug (``LocalProtocolError``).
2. An option reply above 1 MiB is a :class:`~meshlink.RemoteProtocolError`,
   never buffered.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias

from ...errors import LocalProtocolError, RemoteProtocolError
from . import wire as c
from .sansio import NEED_DATA, Inbox, NeedData, Outbox, RecvBuffer, StartTLS


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


ClientEvent: TypeAlias = StartTLS | Negotiated | ExportList | NeedData

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


class ClientHandshake(Inbox, Outbox):
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
        self._in = RecvBuffer(8192)
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

    def tls_established(self) -> None:
        """Continue after the TLS handshake that followed a :class:`StartTLS` event."""
        self._goto(_C.STRUCTURED)
        self._out.append(c.option_request(c.OPT_STRUCTURED_REPLY))

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

    def _need(self) -> NeedData:
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
                    self._out.append(c.option_request(c.OPT_STARTTLS))
                else:
                    self._goto(_C.STRUCTURED)
                    self._out.append(c.option_request(c.OPT_STRUCTURED_REPLY))
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
        self._out.append(c.option_request(c.OPT_GO, struct.pack(">I", len(self._raw_name))
                                          + self._raw_name
                                          + struct.pack(">HH", 1, c.INFO_BLOCK_SIZE)))

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
                self._out.append(c.option_request(c.OPT_LIST))
            elif self._meta and self._structured:
                self._goto(_C.META)
                body = struct.pack(">I", len(self._raw_name)) + self._raw_name
                body += struct.pack(">I", len(self._meta))
                for query in self._meta:
                    raw = query.encode()
                    body += struct.pack(">I", len(raw)) + raw
                self._out.append(c.option_request(c.OPT_SET_META_CONTEXT, body))
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
            self._out.append(c.option_request(c.OPT_ABORT))
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
            self._out.append(c.option_request(c.OPT_EXPORT_NAME, self._raw_name))
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

