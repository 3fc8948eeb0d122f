"""NBD without trio: the option phase and transmission on a thread per connection.

The synchronous twin of :class:`~.server.NBDServer`'s plain-socket path,
used by ``meshlink disk serve``'s fast path (:mod:`meshlink.disk.syncserve`
explains why).  The protocol is the sans-io machines' (``server_handshake``,
``server_transmission``), the transmission loop the executor's
:meth:`~.server_executor.Executor.run_thread` (the one the trio server runs
in its worker threads); only the option phase's waiting is here: blocking
socket calls, each bounded by what is left of the one ``handshake_timeout``.
No TLS (STARTTLS is refused as with ``--tls off``): TLS is trio's.

Limits and log lines are the trio server's: at most ``max_connections``
connections (more are closed at once, with a rate-limited warning), the
whole option phase within ``handshake_timeout``, queued READ data bounded by
``max_reply_bytes``.
"""

from __future__ import annotations

import logging
import socket
import time

from ...errors import RemoteProtocolError
from ..syncserve import SyncServer
from .exports import ExportTable
from .sansio import NEED_DATA, HardDisconnect
from .server_executor import MAX_REPLY_BYTES, Executor
from .server_handshake import Aborted, EnterTransmission, ServerHandshake, TLSMode
from .server_listen import HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, size_buffers
from .server_transmission import ServerTransmission

__all__ = ["SyncNBD"]

log = logging.getLogger("meshlink.disk.nbd")
#: How long an aborting client has to read the ABORT acknowledgement.
_ABORT_SEND_SECONDS = 5.0


class SyncNBD:
    """Serves NBD exports on a :class:`~meshlink.disk.syncserve.SyncServer`'s threads.

    Args:
        server: the server whose threads and stop signal are used.
        exports: the exports.
        handshake_timeout: seconds a client has to enter transmission.
        max_connections: connections open at once (over every listener).
        max_reply_bytes: READ data one connection may have queued.

    Raises:
        ValueError: a limit below 1, or a timeout not above 0.
    """

    def __init__(self, server: SyncServer, exports: ExportTable, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        if not handshake_timeout > 0 or max_connections < 1 or max_reply_bytes < 1:
            raise ValueError("handshake_timeout must be above 0, max_connections and "
                             "max_reply_bytes at least 1")
        self.server = server
        self.exports = exports
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_reply_bytes = max_reply_bytes
        #: Open connections.
        self.connections = 0

    def listen(self, sock: socket.socket) -> None:
        """Serve NBD on the listening ``sock``."""
        server = self.server

        def admit(conn: socket.socket) -> None:
            with server.lock:
                if self.connections >= self.max_connections:
                    server.rlog.warning("limit", "refusing a connection: %d open, the limit "
                                        "(max_connections)", self.connections)
                    conn.close()
                    return
                self.connections += 1
            conn.setblocking(True)
            server.start_thread(conn, lambda: self._serve(conn))

        server.add_listener(sock, admit)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._nbd(conn)
        except HardDisconnect as exc:
            log.info("dropping client: %s", exc)
        except RemoteProtocolError as exc:
            log.debug("client left: %s", exc)
        except OSError as exc:
            log.info("connection failed: %s", exc)
        finally:
            with self.server.lock:
                self.connections -= 1

    def _nbd(self, conn: socket.socket) -> None:
        """The option phase against one deadline, then the threaded transmission loop."""
        exports = self.exports
        core = ServerHandshake(exports.lookup, exports.names, tls=TLSMode.OFF)
        deadline = time.monotonic() + self.handshake_timeout
        entered: EnterTransmission | None = None

        def within_deadline() -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)

        try:
            within_deadline()
            conn.sendall(core.data_to_send())
            while entered is None:
                ev = core.next_event()
                out = core.data_to_send()
                if isinstance(ev, Aborted):
                    # The client may close without reading the ACK; that is fine.
                    conn.settimeout(_ABORT_SEND_SECONDS)
                    try:
                        conn.sendall(out)
                    except OSError:
                        pass
                    log.debug("client aborted the handshake")
                    return
                if out:
                    within_deadline()
                    conn.sendall(out)
                if ev is NEED_DATA:
                    within_deadline()
                    core.receive_data(conn.recv(65536))
                elif isinstance(ev, EnterTransmission):
                    entered = ev
                else:  # StartTLS cannot come: TLS is off on this path
                    raise HardDisconnect(f"unexpected handshake event {ev!r}")
        except TimeoutError:
            log.info("dropping client: no transmission phase within %g s",
                     self.handshake_timeout)
            return
        conn.settimeout(None)
        size_buffers(conn)
        export = exports.find(entered.export.name)
        assert export is not None  # the handshake found it
        counters = self.server.stats.open(export.name, "nbd")
        try:
            executor = Executor(export.backend, ServerTransmission(entered),
                                self.max_reply_bytes, counters)
            fd = conn.fileno()
            failure, detail = executor.run_thread(fd, fd)
        finally:
            self.server.stats.close(counters)
        if failure is not None:
            raise failure(detail)
        log.debug("connection ended: %s", detail)
