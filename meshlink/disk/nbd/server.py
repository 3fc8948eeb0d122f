"""The NBD server: a trio adapter around the sans-io server machines.

Theory of operation
-------------------
The protocol itself lives in ``server_handshake`` (option phase),
``server_transmission`` (request parsing) and ``wire`` (reply encoders);
this module only moves bytes and calls the backend.

Each connection runs the handshake in trio over a :class:`trio.abc.Stream`
(a TCP or Unix :class:`trio.SocketStream`, stdin/stdout, or a
:class:`trio.SSLStream` once STARTTLS has run).  The adapter only loops:
receive, feed :class:`ServerHandshake`, write what it queued, act on its
events (wrap the stream in TLS, enter transmission, close).

The transmission phase has two drivers over one executor (:class:`~.server_executor.Executor`,
which turns a :class:`Request` into reply buffers by calling the backend):

* **threaded** (plain sockets and stdio): the connection's file descriptors
  are handed to a worker thread that loops blocking ``readv`` -> parse every
  complete request in the buffer -> execute -> one ``writev`` of all the
  replies.  A blocked ``readv`` wakes the thread straight from the kernel,
  and a burst of pipelined requests costs one read and one write syscall,
  which is how a Python server keeps up with C ones at queue depth 1 and 32.
  Rejected alternative: the same loop on trio checkpoints, which adds a
  scheduler round-trip (~20-40 us here) per wake-up and halves QD1 IOPS.
  Cancellation shuts the socket down, which wakes the thread; a worker
  thread is only used while the server's thread limiter has room, otherwise
  the connection falls back to the async driver.
* **async** (TLS, or no thread available): the same loop on the trio stream;
  backends that declare ``blocking`` I/O run in ``trio.to_thread``.

Reads may return views of backend memory; the threaded driver therefore sends
queued replies before executing any write-type request, so a reply never shows
bytes written after its request was executed.

Limits, so that no client can hold the server's time, slots or memory: the
option phase runs against one deadline (``handshake_timeout``);
:meth:`NBDServer.serve_listeners` closes connections beyond
``max_connections`` as soon as they are accepted; the threaded driver counts
the READ data it has queued and writes it out at ``max_reply_bytes``, where
the blocking ``writev`` stops the loop until the client drains its replies.

Errors: a well-formed but invalid request gets an error reply from the core;
a backend :class:`~meshlink.DiskError` becomes an error reply with its errno;
only protocol breaches (bad magic, EOF mid-request) end the connection.  No
connection's failure reaches another one or the listener.
"""

from __future__ import annotations

import logging
import math
import os
import socket as _socket
import ssl
from collections.abc import Iterable, Mapping, Sequence

import trio

from ...errors import RemoteProtocolError
from ...ratelog import RateLimitedLog
from ..counters import DiskCounters, DiskStats
from .exports import Export, ExportTable
from .sansio import NEED_DATA, HardDisconnect, StartTLS
from .server_executor import MAX_REPLY_BYTES, Executor
from .server_handshake import Aborted, EnterTransmission, ExportInfo, ServerHandshake, TLSMode
from .server_listen import (
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    accept_connections,
    size_buffers,
)
from .server_transmission import ServerTransmission

log = logging.getLogger("meshlink.disk.nbd")



class NBDServer:
    """Serves any number of exports to any number of clients.

    Args:
        exports: the exports (more can be added with :meth:`add_export`).
        tls: ``"off"``, ``"optional"`` or ``"required"`` (NBD NOTLS, SELECTIVETLS
            with no TLS-only exports, FORCEDTLS).
        ssl_context: a server-side context; required unless ``tls`` is off.
        default_export: export used for the empty name (default: the first).
        max_threads: connections served by worker threads at once; more
            connections still work, on the slower async driver.
        handshake_timeout: seconds a client has from connecting to entering
            the transmission phase (greeting, options, TLS); a client that is
            silent or stalls that long is disconnected.  ``None``: no limit.
        max_connections: open connections accepted by :meth:`serve_listeners`
            at once; more are closed as soon as they are accepted.
        max_reply_bytes: read data one connection may have queued for sending
            before the server stops reading its requests until it drains them.
        stats: counts each export's requests under ``"nbd"`` (see
            :mod:`meshlink.disk.counters`; default: counted, not reported).

    Raises:
        ValueError: TLS enabled without an ``ssl_context``; a limit below 1
            (or a timeout not above 0).
    """

    def __init__(self, exports: Iterable[Export] = (), *, tls: TLSMode | str = TLSMode.OFF,
                 ssl_context: ssl.SSLContext | None = None, default_export: str | None = None,
                 max_threads: int = 256, handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_reply_bytes: int = MAX_REPLY_BYTES,
                 stats: DiskStats | None = None) -> None:
        self._tls = TLSMode(tls)
        if self._tls is not TLSMode.OFF and ssl_context is None:
            raise ValueError("TLS needs an ssl_context")
        if handshake_timeout is not None and not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be above 0, got {handshake_timeout}")
        if max_connections < 1 or max_reply_bytes < 1 or max_threads < 1:
            raise ValueError("max_connections, max_reply_bytes and max_threads must be >= 1")
        self._ssl = ssl_context
        self._exports: dict[str, Export] = {}
        self._default = default_export
        self._limiter = trio.CapacityLimiter(max_threads)
        self._handshake_timeout = math.inf if handshake_timeout is None else handshake_timeout
        self._max_connections = max_connections
        self._max_reply_bytes = max_reply_bytes
        self._rlog = RateLimitedLog(log)
        #: Requests, bytes, errors and latency per export (``stats.snapshot()``).
        self.stats = stats if stats is not None else DiskStats()
        #: Open connections (counted from accept, or from :meth:`handle_stream`).
        self.connections = 0
        for export in exports:
            self.add_export(export)

    def add_export(self, export: Export) -> None:
        """Add (or replace) an export; new connections see it at once."""
        self._exports[export.name] = export

    @property
    def exports(self) -> Mapping[str, Export]:
        """The exports by name."""
        return dict(self._exports)

    def _find(self, name: str) -> Export | None:
        return self._table().find(name)

    def _lookup(self, name: str) -> ExportInfo | None:
        return self._table().lookup(name)

    def _names(self) -> list[tuple[str, str]]:
        return self._table().names()

    def _table(self) -> ExportTable:
        return ExportTable(self._exports, self._default)

    # -- one connection -------------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream,
                            fds: tuple[int, int] | None = None) -> None:
        """Serve one client on ``stream`` until it leaves; closes the stream.

        Args:
            stream: the connection.
            fds: ``(read fd, write fd)`` of the same connection if the threaded
                driver may use them directly (plain sockets, stdio); None otherwise.

        Never raises for anything the client does; protocol breaches, lost
        connections and handshakes over ``handshake_timeout`` are logged and
        end only this connection.

        Cancellation: closes the connection (forcefully); a worker thread
        serving it is woken by shutting the socket down.
        """
        self.connections += 1
        try:
            await self._serve(stream, fds)
        finally:
            self.connections -= 1

    async def _serve(self, stream: trio.abc.Stream, fds: tuple[int, int] | None) -> None:
        """handle_stream without the counting (the accept loop counts at accept)."""
        core = ServerHandshake(self._lookup, self._names, tls=self._tls)
        entered: EnterTransmission | None = None
        try:
            # The whole option phase, TLS included, runs against one deadline:
            # until a client is in transmission it has proven nothing, and a
            # silent one must not hold a connection slot for ever.
            with trio.move_on_after(self._handshake_timeout):
                await stream.send_all(core.data_to_send())
                while entered is None:
                    ev = core.next_event()
                    out = core.data_to_send()
                    if isinstance(ev, Aborted):
                        # The client may close without reading the ACK; that is fine.
                        with trio.move_on_after(5):
                            try:
                                await stream.send_all(out)
                            except (trio.BrokenResourceError, OSError):
                                pass
                        log.debug("client aborted the handshake")
                        return
                    if out:
                        await stream.send_all(out)
                    if ev is NEED_DATA:
                        core.receive_data(await stream.receive_some(65536))
                    elif isinstance(ev, StartTLS):
                        assert self._ssl is not None
                        stream = trio.SSLStream(stream, self._ssl, server_side=True)
                        await stream.do_handshake()
                        fds = None  # TLS runs in trio; no raw fd access from here on
                        core.tls_established()
                    elif isinstance(ev, EnterTransmission):
                        entered = ev
            if entered is None:
                log.info("dropping client: no transmission phase within %g s",
                         self._handshake_timeout)
                return
            why = await self._transmission(stream, entered, fds)
            log.debug("connection ended: %s", why)
        except HardDisconnect as exc:
            log.info("dropping client: %s", exc)
        except RemoteProtocolError as exc:
            log.debug("client left: %s", exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                OSError) as exc:
            log.info("connection failed: %s", exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _transmission(self, stream: trio.abc.Stream, ev: EnterTransmission,
                            fds: tuple[int, int] | None) -> str:
        export = self._find(ev.export.name)
        assert export is not None
        counters = self.stats.open(export.name, "nbd")
        try:
            return await self._drive(stream, export, ev, fds, counters)
        finally:
            self.stats.close(counters)

    async def _drive(self, stream: trio.abc.Stream, export: Export, ev: EnterTransmission,
                     fds: tuple[int, int] | None, counters: DiskCounters) -> str:
        executor = Executor(export.backend, ServerTransmission(ev), self._max_reply_bytes,
                             counters)
        if fds is None or self._limiter.available_tokens < 1:
            return await executor.run_async(stream)
        rfd, wfd = fds
        sock = getattr(stream, "socket", None)
        os.set_blocking(rfd, True)
        os.set_blocking(wfd, True)
        try:
            failure, detail = await trio.to_thread.run_sync(
                executor.run_thread, rfd, wfd, abandon_on_cancel=True, limiter=self._limiter)
        finally:
            if sock is not None:
                # Wakes an abandoned worker blocked in readv on this socket.
                try:
                    sock.shutdown(_socket.SHUT_RDWR)
                except OSError:
                    pass
        if failure is not None:
            raise failure(detail)
        return detail

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        """Serve an accepted socket; the accept loop already counted it."""
        try:
            await self._serve_socket(stream)
        finally:
            self.connections -= 1

    async def _serve_socket(self, stream: trio.SocketStream) -> None:
        fd = stream.socket.fileno()
        size_buffers(stream.socket)
        await self._serve(stream, (fd, fd))

    # -- listening ----------------------------------------------------------------------

    async def serve_listeners(self, listeners: Sequence[trio.SocketListener], *,
                              task_status: trio.TaskStatus[Sequence[trio.SocketListener]]
                              = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections on ``listeners`` until cancelled.

        Cancellation: stops accepting and closes every connection.

        Backpressure: at most ``max_connections`` connections are open at
        once (over all listeners); one more is closed right after ``accept``
        (a rate-limited warning says so).  Each connection costs one task
        (and one worker thread while it is in the transmission phase).
        When ``accept`` runs out of file descriptors the loop backs off
        (see :func:`~meshlink.disk.nbd.server_listen.accept_connections`).

        Raises:
            OSError: a listener failed for good.
        """
        listeners = list(listeners)
        async with trio.open_nursery() as nursery:

            def admit(stream: trio.SocketStream) -> None:
                if self.connections >= self._max_connections:
                    self._rlog.warning("limit", "refusing a connection: %d open, the limit "
                                       "(max_connections)", self.connections)
                    stream.socket.close()
                    return
                self.connections += 1  # here, not in the task: admit() may run again first
                nursery.start_soon(self._handle_socket, stream)

            for listener in listeners:
                nursery.start_soon(accept_connections, listener, admit, self._rlog)
            task_status.started(listeners)

    async def serve_stdio(self, rfd: int = 0, wfd: int = 1) -> None:
        """Serve exactly one client on stdin/stdout (inetd / ``nbdkit -s`` style).

        Cancellation: closes the connection.
        """
        rstream = trio.lowlevel.FdStream(os.dup(rfd))
        wstream = trio.lowlevel.FdStream(os.dup(wfd))
        stream = trio.StapledStream(wstream, rstream)
        await self.handle_stream(stream, (rstream.fileno(), wstream.fileno()))
