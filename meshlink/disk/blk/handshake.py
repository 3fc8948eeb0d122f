"""What the blk frontend and backend agree on outside the ring itself.

The hello's protocol version, how
long a handshake may take, and how long an idle end spins before sleeping.
Both ends import these from here so the two halves cannot drift apart.
"""

from __future__ import annotations

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_INDIRECT_SEGMENTS",
    "PROTOCOL_VERSION",
    "SPIN_SECONDS",
]

PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT = 5.0
#: How long an end polls the ring before sleeping on its doorbell: long
#: enough to catch a pipelined peer's next batch without a syscall.
SPIN_SECONDS = 50e-6
#: Segments of one INDIRECT request the backend accepts (and advertises); the
#: frontend sends INDIRECT only when its whole slot fits.
MAX_INDIRECT_SEGMENTS = 256

