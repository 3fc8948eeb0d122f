"""The NBD wire format: numbers, record layouts and the pure encoders both sides share.

Everything here follows the NBD protocol document (NetworkBlockDevice/nbd
``doc/proto.md``); integers are big-endian on the wire.  This module owns
*what the bytes look like*; the state machines that decide *when* to send or
expect them live in ``server_handshake``, ``server_transmission``,
``client_handshake`` and ``client_transmission``.

Plain ints rather than enums: the transmission hot path compares them per
request.  The encoders are plain functions returning ``bytes`` so the
adapters can queue them for one ``writev`` without touching a machine.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR + 1
REP_ERR_POLICY = REP_FLAG_ERROR + 2
REP_ERR_INVALID = REP_FLAG_ERROR + 3
REP_ERR_PLATFORM = REP_FLAG_ERROR + 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR + 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9

# NBD_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE",
             6: "WRITE_ZEROES", 7: "BLOCK_STATUS"}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# errors (NBD_E*)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation
STATE_HOLE = 1
STATE_ZERO = 2
BASE_ALLOCATION = "base:allocation"

# fixed-size records
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")  # chunk header + offset
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags

#: Longest string the NBD document allows (names, messages).
MAX_STRING = 4096
#: Largest READ/WRITE/CACHE we accept (the spec's "never call this DoS" bound).
MAX_REQUEST = 32 * 1024 * 1024


# --- option framing (handshake phase) --------------------------------------------


def option_request(option: int, data: bytes = b"") -> bytes:
    """A client's option: IHAVEOPT header then ``data``."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    """A server's reply to ``option``: reply header then ``data``."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, rtype, len(data)) + data


# --- reply serialisers (transmission phase) ----------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A 16-byte simple reply (success or error; READ data follows separately)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def read_reply_header(cookie: int, offset: int, length: int, structured: bool) -> bytes:
    """Header preceding ``length`` bytes of READ data (one chunk, DONE when structured)."""
    if structured:
        if length == 0:
            return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                     REPLY_TYPE_NONE, cookie, 0)
        return DATA_CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                      REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset)
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)


def hole_reply(cookie: int, offset: int, length: int) -> bytes:
    """A structured READ reply saying the whole range reads as zeroes."""
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                             REPLY_TYPE_OFFSET_HOLE, cookie, 12) + struct.pack(
                                 ">QI", offset, length)


def error_reply(cookie: int, error: int, message: str, structured: bool) -> bytes:
    """An error reply: a structured ERROR chunk with text, or a simple reply."""
    if not structured:
        return simple_reply(cookie, error)
    text = message.encode()[:1024]
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                             REPLY_TYPE_ERROR, cookie, 6 + len(text)) + struct.pack(
                                 ">IH", error, len(text)) + text


def block_status_reply(cookie: int, context_id: int, extents: Sequence[tuple[int, int]],
                       *, done: bool = True) -> bytes:
    """One BLOCK_STATUS chunk: ``extents`` are ``(length, flags)``, lengths < 2^32."""
    body = struct.pack(f">I{2 * len(extents)}I", context_id,
                       *[v for ext in extents for v in ext])
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                             REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body


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
    flags = TF_HAS_FLAGS
    if read_only:
        flags |= TF_READ_ONLY
    if can_flush:
        flags |= TF_SEND_FLUSH
    if can_fua and not read_only:
        flags |= TF_SEND_FUA
    if can_trim and not read_only:
        flags |= TF_SEND_TRIM
    if not read_only:
        # WRITE_ZEROES can always be served (a buffer of zeroes at worst).
        flags |= TF_SEND_WRITE_ZEROES
        if can_zero and can_fast_zero:
            flags |= TF_SEND_FAST_ZERO
    if can_multi_conn:
        flags |= TF_CAN_MULTI_CONN
    if can_cache:
        flags |= TF_SEND_CACHE
    return flags
