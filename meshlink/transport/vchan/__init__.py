"""vchan: Xen's shared-memory ring protocol as trio streams.

``ring`` wraps the native ring (any provider), ``stream`` is the trio stream
over it, ``local`` rendezvouses two processes of one host through the host
store, ``xen`` sets rings up over Xen's grant tables and event channels.
"""

from .local import VchanListener, connect_vchan, open_vchan_listener
from .stream import DEFAULT_RING_SIZE, MAX_RING_SIZE, VchanStream

__all__ = [
    "DEFAULT_RING_SIZE",
    "MAX_RING_SIZE",
    "VchanListener",
    "VchanStream",
    "connect_vchan",
    "open_vchan_listener",
]
