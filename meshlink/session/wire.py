"""The session layer's bytes: the greeting that opens or resumes a session, and records.

Sans-io: no trio, no socket, no clock.  The layout is specified in
``docs/sessions.md``; this module is its only encoder and decoder.

A transport that carries a session starts with a *greeting* from the client
and a *reply* from the server (48 bytes each).  The first byte, ``0xC1``, is
the one byte msgpack never uses, so a server tells a session greeting from a
bare bus hello (a msgpack map) by its first byte.

After the greeting every byte is inside a *record*: a 16-byte header
(kind, payload length, cumulative acknowledgement) and, for ``DATA``, the
payload.  Sequence numbers are byte offsets into each direction's stream of
payload bytes: the acknowledgement says how many the sender of the record has
received, in total, since the session began.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..errors import RemoteProtocolError

__all__ = [
    "ACK", "DATA", "END", "GREETING_SIZE", "HEADER", "HEADER_SIZE", "MAGIC", "MAX_RECORD",
    "NEW", "REFUSED", "RESUMED", "Greeting", "ID_SIZE", "ZERO_ID", "pack_greeting",
    "parse_greeting",
]

#: First four bytes of every greeting and reply; 0xC1 is never valid msgpack.
MAGIC: Final = b"\xc1MLS"
VERSION: Final = 1
ID_SIZE: Final = 16
ZERO_ID: Final = bytes(ID_SIZE)

#: magic, version, status (reply) or flags (greeting), 2 reserved bytes,
#: session id, token, bytes received so far.
_GREETING: Final = struct.Struct("<4sBBH16s16sQ")
GREETING_SIZE: Final = _GREETING.size  # 48

# Reply statuses.
NEW: Final = 0       #: a new session (the client asked for one, or the one it named is gone)
RESUMED: Final = 1   #: the named session continues on this transport
REFUSED: Final = 2   #: the token was wrong (never says whether the id exists)

#: kind (u8), 3 zero bytes, payload length (u32), acknowledgement (u64).
HEADER: Final = struct.Struct("<B3xIQ")
HEADER_SIZE: Final = HEADER.size  # 16
DATA: Final = 1   #: payload bytes of the session's stream
ACK: Final = 2    #: nothing but the acknowledgement (also the keepalive)
END: Final = 3    #: the session is over: the sender will never resume it
#: Largest payload of one record we accept (a sender splits larger writes).
MAX_RECORD: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Greeting:
    """A decoded greeting (client) or reply (server).

    Attributes:
        status: for a reply, :data:`NEW`, :data:`RESUMED` or :data:`REFUSED`;
            0 in a greeting.
        session_id: 16 bytes; all zero in a greeting that asks for a new session.
        token: the 16-byte secret that proves a resumer owns the session.
        received: payload bytes the sender has received in this session.
    """

    status: int
    session_id: bytes
    token: bytes
    received: int


def pack_greeting(status: int, session_id: bytes, token: bytes, received: int) -> bytes:
    """Encode a greeting or reply."""
    return _GREETING.pack(MAGIC, VERSION, status, 0, session_id, token, received)


def parse_greeting(data: bytes, *, reply: bool) -> Greeting:
    """Decode 48 bytes of greeting (``reply=False``) or reply (``reply=True``).

    Raises:
        RemoteProtocolError: wrong magic, version, status or reserved bytes.
    """
    if len(data) != GREETING_SIZE:
        raise RemoteProtocolError(f"session greeting of {len(data)} bytes, not {GREETING_SIZE}")
    magic, version, status, reserved, sid, token, received = _GREETING.unpack(data)
    if magic != MAGIC:
        raise RemoteProtocolError("not a meshlink session greeting (bad magic)")
    if version != VERSION:
        raise RemoteProtocolError(f"session protocol version {version}, we speak {VERSION}")
    if reserved or (not reply and status) or status not in (NEW, RESUMED, REFUSED):
        raise RemoteProtocolError(f"malformed session greeting (status {status}, "
                                  f"reserved {reserved})")
    return Greeting(status, sid, token, received)
