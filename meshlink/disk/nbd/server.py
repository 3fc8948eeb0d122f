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

The transmission phase has two drivers over one executor (:class:`_Executor`,
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

import dataclasses
import logging
import math
import os
import select
import socket as _socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import trio

from ...errors import DiskError, RemoteProtocolError
from ..backends._base import Backend, Buffer
from ..counters import DiskCounters, DiskStats
from . import wire as c
from .sansio import NEED_DATA, HardDisconnect, StartTLS
from .server_handshake import Aborted, EnterTransmission, ExportInfo, ServerHandshake, TLSMode
from .server_listen import RateLimitedLog, accept_connections
from .server_transmission import BadRequest, Disconnect, Request, ServerTransmission
from .wire import (
    block_status_reply,
    clip_extents,
    error_reply,
    read_reply_header,
    simple_reply,
    transmission_flags,
)

log = logging.getLogger("meshlink.disk.nbd")

_NBD_ERRNOS = frozenset({c.EPERM, c.EIO, c.ENOMEM, c.EINVAL, c.ENOSPC, c.EOVERFLOW,
                         c.ENOTSUP, c.ESHUTDOWN})
_ZERO_MIB = bytes(1 << 20)
_IOV_MAX = 512
_SOCKET_BUFFER = 4 << 20
_VECTORED_MIN = 65536  # reads above this use read_vectored when offered
_DIRECT_MIN = 65536  # writes from this size are received straight into the backend
#: After answering, the worker polls the socket this long before blocking in
#: readv: a client running requests back to back (queue depth 1) usually sends
#: the next one within a few tens of microseconds, and waking a blocked thread
#: costs about that much again.  poll() releases the GIL on every turn.
_BUSY_POLL = 40e-6
#: Defaults of the per-client bounds (see :class:`NBDServer`).  Ten seconds is
#: ample for a handshake, even over TLS on a slow link, yet frees a slot soon;
#: 64 MiB of queued reply data is two maximum-size READs, which keeps a deep
#: queue of large reads streaming while capping what one client can pin.
HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
MAX_REPLY_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Export:
    """One export: a name bound to a backend.

    Attributes:
        name: the name clients ask for.
        backend: the disk (shared by every connection to this export).
        description: shown by ``nbdinfo``.
        read_only: force read-only even if the backend is writable.
    """

    name: str
    backend: Backend
    description: str = ""
    read_only: bool = False

    def info(self) -> ExportInfo:
        """The handshake's view of this export (flags from declared capabilities)."""
        caps = self.backend.capabilities
        read_only = self.read_only or self.backend.read_only
        flags = transmission_flags(
            read_only=read_only, can_flush=caps.can_flush, can_fua=caps.can_fua,
            can_trim=caps.can_trim, can_zero=caps.can_zero, can_fast_zero=caps.can_fast_zero,
            can_multi_conn=caps.can_multi_conn, can_cache=caps.can_cache)
        return ExportInfo(self.name, self.backend.size, flags, self.description,
                          min_block=1, preferred_block=max(4096, self.backend.sector_size),
                          max_block=c.MAX_REQUEST)


class _Executor:
    """Runs valid requests against one backend; turns results into reply buffers.

    Synchronous and free of trio: the threaded driver calls it from a worker
    thread, the async driver from the trio thread or ``to_thread``.
    """

    def __init__(self, backend: Backend, tx: ServerTransmission,
                 max_reply_bytes: int = MAX_REPLY_BYTES,
                 counters: DiskCounters | None = None) -> None:
        self.backend = backend
        self.tx = tx
        # This connection's own: only its one driver (task or thread) adds to them.
        self.counters = counters if counters is not None else DiskCounters()
        self.max_reply_bytes = max_reply_bytes
        self.structured = tx.structured
        caps = backend.capabilities
        self._can_zero = caps.can_zero
        self._can_extents = caps.can_extents
        self._can_cache = caps.can_cache

    def error(self, cookie: int, err: int, message: str) -> bytes:
        return error_reply(cookie, err if err in _NBD_ERRNOS else c.EINVAL, message,
                           self.structured)

    def execute(self, req: Request) -> list[Buffer]:
        """Execute ``req``; return the buffers of its reply (never raises DiskError)."""
        cmd = req.type
        backend = self.backend
        n = self.counters
        t0 = time.monotonic_ns()
        try:
            if cmd == c.CMD_READ:
                n.reads += 1
                if req.length == 0:
                    return [read_reply_header(req.cookie, req.offset, 0, self.structured)]
                data = backend.read(req.offset, req.length)
                n.bytes_read += req.length
                return [read_reply_header(req.cookie, req.offset, req.length, self.structured),
                        data]
            if cmd == c.CMD_WRITE:
                n.writes += 1
                assert req.payload is not None
                if req.length:
                    backend.write(req.offset, req.payload, bool(req.flags & c.CMD_FLAG_FUA))
                    n.bytes_written += req.length
            elif cmd == c.CMD_FLUSH:
                n.flushes += 1
                backend.flush()
            elif cmd == c.CMD_TRIM:
                n.discards += 1
                if req.length:
                    backend.discard(req.offset, req.length, bool(req.flags & c.CMD_FLAG_FUA))
            else:
                n.other += 1  # WRITE_ZEROES, CACHE, BLOCK_STATUS
                if cmd == c.CMD_WRITE_ZEROES:
                    self._zero(req)
                elif cmd == c.CMD_CACHE:
                    if self._can_cache and req.length:
                        backend.cache(req.offset, req.length)
                elif cmd == c.CMD_BLOCK_STATUS:
                    return self._block_status(req)
            return [simple_reply(req.cookie)]
        except DiskError as exc:
            n.errors += 1
            return [self.error(req.cookie, exc.errno, str(exc))]
        except Exception as exc:  # a backend bug must not kill the connection
            n.errors += 1
            log.exception("backend failed on %s", c.CMD_NAMES.get(cmd, cmd))
            return [self.error(req.cookie, c.EIO, f"internal error: {type(exc).__name__}")]
        finally:
            n.latency_ns_sum += time.monotonic_ns() - t0
            n.latency_count += 1

    def refused(self, ev: BadRequest) -> bytes:
        """The reply to a request refused before it reached the disk (counted)."""
        self.counters.other += 1
        self.counters.errors += 1
        return self.error(ev.cookie, ev.errno, ev.message)

    def _zero(self, req: Request) -> None:
        fast = bool(req.flags & c.CMD_FLAG_FAST_ZERO)
        fua = bool(req.flags & c.CMD_FLAG_FUA)
        if not req.length:
            return
        if self._can_zero:
            self.backend.write_zeroes(req.offset, req.length,
                                      may_trim=not req.flags & c.CMD_FLAG_NO_HOLE,
                                      fast=fast, fua=fua)
            return
        if fast:
            # Not advertised for such backends; answer as the document asks anyway.
            raise DiskError("zeroing is no faster than writing", c.ENOTSUP)
        pos = 0
        while pos < req.length:
            n = min(len(_ZERO_MIB), req.length - pos)
            self.backend.write(req.offset + pos, memoryview(_ZERO_MIB)[:n], fua)
            pos += n

    def _block_status(self, req: Request) -> list[Buffer]:
        length = max(req.length, 1) if req.offset < self.tx.export.size else 0
        if length == 0:
            return [self.error(req.cookie, c.EINVAL, "block status at end of export")]
        if self._can_extents:
            extents = self.backend.extents(req.offset, length)
        else:
            extents = [(min(length, self.tx.export.size - req.offset), 0)]
        shaped = clip_extents(extents, length, bool(req.flags & c.CMD_FLAG_REQ_ONE))
        ids = list(self.tx.contexts)
        return [block_status_reply(req.cookie, ctx, shaped, done=i == len(ids) - 1)
                for i, ctx in enumerate(ids)]

    # -- the threaded driver ------------------------------------------------------

    def run_blocking(self, rfd: int, wfd: int) -> str:
        """Serve requests on blocking fds until DISC or EOF (runs in a worker thread).

        Returns:
            Why the loop ended (for the log).

        Raises:
            HardDisconnect: the client broke the protocol.
            OSError: the connection failed.

        Backpressure: read data queued for one ``writev`` is counted, and the
        queue is written out once it reaches ``max_reply_bytes``.  The
        blocking ``writev`` then waits for the client to drain its socket, so
        a client that pipelines reads but never reads the replies stops being
        read from, and pins at most about ``max_reply_bytes`` plus one request.
        """
        tx = self.tx
        limit = self.max_reply_bytes
        queued = 0  # READ payload bytes in ``out``; a counter, so the hot path stays cheap
        execute = self.execute
        readv = os.readv
        read = self.backend.read
        read_vectored = getattr(self.backend, "read_vectored", None)
        write_views = getattr(self.backend, "write_views", None)
        tx.direct_min = _DIRECT_MIN
        pack_data = c.DATA_CHUNK_HEADER.pack if self.structured else None
        out: list[Buffer] = []
        views_pending = False
        poller = select.poll()
        poller.register(rfd, select.POLLIN)
        clock = time.perf_counter
        counters = self.counters
        now_ns = time.monotonic_ns
        while True:
            ev = tx.next_event()
            if ev is NEED_DATA:
                if out:
                    _writev_all(wfd, out)
                    out = []
                    queued = 0
                    views_pending = False
                    deadline = clock() + _BUSY_POLL
                    while not poller.poll(0) and clock() < deadline:
                        pass
                n = readv(rfd, [tx.get_buffer()])
                tx.buffer_updated(n)
                continue
            if type(ev) is Request:
                cmd = ev.type
                if cmd == c.CMD_READ and pack_data is not None and ev.length:
                    # Hot path: the same as execute() for a structured READ, inlined.
                    t0 = now_ns()
                    counters.reads += 1
                    try:
                        if ev.length > _VECTORED_MIN and read_vectored is not None:
                            pieces = read_vectored(ev.offset, ev.length)
                        else:
                            pieces = [read(ev.offset, ev.length)]
                    except DiskError as exc:
                        counters.errors += 1
                        out.append(self.error(ev.cookie, exc.errno, str(exc)))
                        continue
                    counters.bytes_read += ev.length
                    counters.latency_ns_sum += now_ns() - t0
                    counters.latency_count += 1
                    out.append(pack_data(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                                         c.REPLY_TYPE_OFFSET_DATA, ev.cookie, ev.length + 8,
                                         ev.offset))
                    out += pieces
                    views_pending = True
                    queued += ev.length
                    if queued >= limit or len(out) >= _IOV_MAX:
                        _writev_all(wfd, out)
                        out = []
                        queued = 0
                        views_pending = False
                    continue
                if views_pending and cmd in (c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES):
                    _writev_all(wfd, out)
                    out = []
                    queued = 0
                    views_pending = False
                if ev.payload is None and cmd == c.CMD_WRITE:
                    out.append(self._direct_write(ev, rfd, write_views))
                    continue
                out += execute(ev)
                if cmd == c.CMD_READ:
                    views_pending = True
                    queued += ev.length
                if queued >= limit or len(out) >= _IOV_MAX:
                    _writev_all(wfd, out)
                    out = []
                    queued = 0
                    views_pending = False
            elif type(ev) is BadRequest:
                out.append(self.refused(ev))
            elif type(ev) is Disconnect:
                if out:
                    _writev_all(wfd, out)
                return "client sent NBD_CMD_DISC"

    def run_thread(self, rfd: int, wfd: int) -> tuple[type[Exception] | None, str]:
        """:meth:`run_blocking` for a worker thread: failures come back as values.

        Returns:
            ``(None, why it ended)``, or ``(HardDisconnect or OSError, message)``
            for the caller to raise.

        Why not let the exception through: ``trio.to_thread`` hands it over in
        an outcome that the raising frame still holds, so exception, traceback
        and frame form a cycle; the traceback also holds this thread's frames
        and so the replies still queued (up to ``max_reply_bytes``) until the
        next garbage collection.  Catching here frees them when the connection
        drops.
        """
        try:
            return None, self.run_blocking(rfd, wfd)
        except HardDisconnect as exc:
            return HardDisconnect, str(exc)
        except OSError as exc:
            return OSError, str(exc)

    def _direct_write(self, req: Request, rfd: int,
                      write_views: Callable[[int, int], list[memoryview]] | None) -> bytes:
        """Receive a large WRITE's payload straight into its destination, then reply."""
        scratch: bytearray | None = None
        if write_views is not None:
            sinks = write_views(req.offset, req.length)
        else:
            scratch = bytearray(req.length)
            sinks = [memoryview(scratch)]
        rest = self.tx.fill_payload(sinks)
        while rest:
            n = os.readv(rfd, rest[:_IOV_MAX])
            if n == 0:
                raise HardDisconnect("client closed the connection in the middle of a write")
            while n:
                if n >= len(rest[0]):
                    n -= len(rest[0])
                    rest.pop(0)
                else:
                    rest[0] = rest[0][n:]
                    n = 0
        self.tx.payload_done()
        counts = self.counters
        counts.writes += 1
        t0 = time.monotonic_ns()  # the disk's part: the payload is already here
        try:
            if scratch is not None:
                self.backend.write(req.offset, scratch, bool(req.flags & c.CMD_FLAG_FUA))
            elif req.flags & c.CMD_FLAG_FUA:
                self.backend.flush()
        except DiskError as exc:
            counts.errors += 1
            return self.error(req.cookie, exc.errno, str(exc))
        finally:
            counts.latency_ns_sum += time.monotonic_ns() - t0
            counts.latency_count += 1
        counts.bytes_written += req.length
        return simple_reply(req.cookie)

    # -- the async driver -----------------------------------------------------------

    async def run_async(self, stream: trio.abc.Stream) -> str:
        """Serve requests on a trio stream until DISC or EOF.

        Returns:
            Why the loop ended.

        Raises:
            HardDisconnect: the client broke the protocol.
            trio.BrokenResourceError: the connection failed.

        Cancellation: stops between requests or mid-send (the connection is
        then unusable and is closed by the caller).

        Backpressure: each request's reply is sent before the next request is
        executed, so at most one reply is pending and a client that does not
        read its replies stops being served.
        """
        tx = self.tx
        offload = self.backend.capabilities.blocking
        out: list[Buffer] = []
        while True:
            ev = tx.next_event()
            if ev is NEED_DATA:
                if out:
                    await stream.send_all(b"".join(out))
                    out = []
                tx.receive_data(await stream.receive_some(1 << 18))
                continue
            if type(ev) is Request:
                if offload:
                    out += await trio.to_thread.run_sync(self.execute, ev)
                else:
                    out += self.execute(ev)
                # Views of backend memory must not outlive a later write: send now.
                await stream.send_all(b"".join(out))
                out = []
            elif type(ev) is BadRequest:
                out.append(self.refused(ev))
            elif type(ev) is Disconnect:
                if out:
                    await stream.send_all(b"".join(out))
                return "client sent NBD_CMD_DISC"


def _writev_all(fd: int, buffers: list[Buffer]) -> None:
    """writev until every byte is written (blocking fd)."""
    # Every buffer here is bytes-like with 1-byte items, so len() counts bytes.
    remaining = sum(map(len, buffers))
    sent = os.writev(fd, buffers)
    if sent == remaining:
        return
    views = [memoryview(b).cast("B") for b in buffers]
    while sent < remaining:
        while sent >= len(views[0]):
            sent -= len(views[0])
            remaining -= len(views[0])
            views.pop(0)
        views[0] = views[0][sent:]
        remaining -= sent
        sent = os.writev(fd, views[:_IOV_MAX])


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
        export = self._exports.get(name)
        if export is None and name == "":
            key = self._default if self._default is not None else next(iter(self._exports), None)
            export = self._exports.get(key) if key is not None else None
        return export

    def _lookup(self, name: str) -> ExportInfo | None:
        export = self._find(name)
        return export.info() if export is not None else None

    def _names(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self._exports.values()]

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
        executor = _Executor(export.backend, ServerTransmission(ev), self._max_reply_bytes,
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
        # Bigger buffers mean fewer wake-ups per MiB (the kernel caps the value).
        # TCP gets only the send side: a fixed SO_RCVBUF would switch off the
        # receive window's auto-tuning (measured: 1 MiB reads over TCP loopback
        # 0.92x -> 1.02-1.19x nbdkit; writes unchanged).
        options: tuple[int, ...]
        if stream.socket.family == _socket.AF_UNIX:
            options = (_socket.SO_SNDBUF, _socket.SO_RCVBUF)
        else:
            options = (_socket.SO_SNDBUF,)
        for opt in options:
            try:
                stream.socket.setsockopt(_socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            except OSError:
                pass
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
