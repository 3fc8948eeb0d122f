"""Sessions: one bus connection's bytes, carried over transports that come and go.

:class:`SessionStream` is a trio stream the bus runs over; underneath, the
bytes travel in acknowledged records (:mod:`.wire`) over whichever transport
is attached now, and a resumed transport resends exactly what the peer lacks.
:mod:`.handshake` opens and resumes sessions (the client's greeting, the
server's :class:`SessionTable`).  This layer knows nothing of the bus, of
names or of particular transports: ``meshlink.connect`` (:mod:`meshlink.client`)
and ``meshlink.serve`` drive it.  Wire format: ``docs/sessions.md``.
"""

from .handshake import PrefixedStream, SessionTable, greet
from .stream import SessionConfig, SessionStream
from .wire import NEW, REFUSED, RESUMED, Greeting

__all__ = ["NEW", "REFUSED", "RESUMED", "Greeting", "PrefixedStream", "SessionConfig",
           "SessionStream", "SessionTable", "greet"]
