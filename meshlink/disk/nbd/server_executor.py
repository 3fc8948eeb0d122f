"""The NBD transmission phase: one executor, two drivers.

:class:`Executor` turns a parsed :class:`Request` into reply buffers by
calling the backend; its drivers move the bytes:

* **threaded** (plain sockets and stdio, :meth:`Executor.run_thread`): the
  connection's file descriptors are handed to a worker thread that loops
  blocking ``readv`` -> parse every complete request -> execute -> one
  ``writev`` of all the replies (see :mod:`.server` for why);
* **async** (TLS, or no thread available, :meth:`Executor.run_async`): the
  same loop on the trio stream.

The threaded driver counts the READ data it has queued and writes it out at
``max_reply_bytes``, where the blocking ``writev`` stops the loop until the
client drains its replies.  :mod:`.server` runs the option phase and hands
each connection that enters transmission to an executor.
"""


from __future__ import annotations

import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...errors import DiskError
from ..backends._base import Backend, Buffer
from ..counters import DiskCounters
from . import wire as c
from .sansio import NEED_DATA, HardDisconnect
from .server_transmission import BadRequest, Disconnect, Request, ServerTransmission
from .wire import (
    block_status_reply,
    clip_extents,
    error_reply,
    read_reply_header,
    simple_reply,
)

if TYPE_CHECKING:
    import trio

log = logging.getLogger("meshlink.disk.nbd")

_NBD_ERRNOS = frozenset({c.EPERM, c.EIO, c.ENOMEM, c.EINVAL, c.ENOSPC, c.EOVERFLOW,
                         c.ENOTSUP, c.ESHUTDOWN})
_ZERO_MIB = bytes(1 << 20)
_IOV_MAX = 512
_VECTORED_MIN = 65536  # reads above this use read_vectored when offered
_DIRECT_MIN = 65536  # writes from this size are received straight into the backend
#: After answering, the worker polls the socket this long before blocking in
#: readv: a client running requests back to back (queue depth 1) usually sends
#: the next one within a few tens of microseconds, and waking a blocked thread
#: costs about that much again.  poll() releases the GIL on every turn.
_BUSY_POLL = 40e-6
MAX_REPLY_BYTES = 64 << 20


class Executor:
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
        receive = _PayloadReceiver(rfd)
        try:
            return self._serve_blocking(rfd, wfd, receive)
        finally:
            receive.close()

    def _serve_blocking(self, rfd: int, wfd: int, receive: _PayloadReceiver) -> str:
        """:meth:`run_blocking`'s loop; ``receive`` fills large WRITEs' payloads."""
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
        # After a direct WRITE, read only the next header: a client streaming
        # large writes has the next payload queued behind it, and a full-size
        # read would pull up to 256 KiB of it into the request buffer, from
        # where fill_payload copies it again.  One more small read per request
        # is cheaper than that copy (measured: see bench/RESULTS.md).
        lean = False
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
                if lean:
                    n = readv(rfd, [tx.get_buffer()[: tx.bytes_wanted]])
                else:
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
                    out.append(self._direct_write(ev, receive, write_views))
                    lean = True
                    continue
                lean = False
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

    def _direct_write(self, req: Request, receive: _PayloadReceiver,
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
            n = receive(rest[:_IOV_MAX])
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
        import trio  # here: the threaded driver must not load it (see syncserve)

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


class _PayloadReceiver:
    """Reads a WRITE's payload into its destination views, as much as one call can.

    On a socket, ``recvmsg_into`` with ``MSG_WAITALL``: the kernel returns once
    every view is full (or at EOF), instead of once per arriving segment, so a
    1 MiB payload costs one wake-up and one trip through Python rather than
    dozens (measured: 1 MiB writes at QD8 over TCP, nine alternating fio runs,
    2,634 -> 2,961 MiB/s, nbdkit 2,939).  Anything else (a pipe with ``--stdio``)
    gets ``readv``, which returns what is there.  Both block: the fd is blocking.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # A duplicate, so that closing this object never closes the connection's fd.
        self._sock: socket.socket | None = None
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            self._sock = socket.socket(fileno=os.dup(fd))

    def __call__(self, views: list[memoryview]) -> int:
        if self._sock is not None:
            return self._sock.recvmsg_into(views, 0, socket.MSG_WAITALL)[0]
        return os.readv(self._fd, views)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


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
