"""Disks shared over the Xen block ring (blkif) between co-located processes.

Theory of operation
-------------------
As in Xen, the *frontend* (the disk's user, :class:`BlkDisk`) owns the memory:
it creates a sealed memfd holding the shared ring (2^order pages, grant refs
0..) followed by a pool of data pages (11 per ring slot, so every request in
flight has its own pages and no allocator is needed), and two eventfds.  It
connects to the server's rendezvous socket ``<service>.blk`` in the host
store, names the disk it wants, and passes the fds by ``SCM_RIGHTS``.  The
*backend* (:func:`serve_blk`) checks the client's uid, checks the memfd (size,
seals), maps it, and answers with the disk's size and features.

The backend serves requests in ring order, one connection per task.  Each
request is copied out of the ring once and validated in C (``native/
blkring.c``) before Python sees it; only then are its pages read or written.
Disks that are one contiguous buffer in memory (``null``, ``mmap``) are
served entirely by the native loop; other backends by a Python loop that
calls the backend.  FLUSH_DISKCACHE flushes the backend; WRITE_BARRIER is
served after everything before it (the loop is sequential), flushed before
and after.  The liveness of each side is the rendezvous socket, as for vchan.
"""

from __future__ import annotations

import array
import errno as _errno
import fcntl
import logging
import mmap
import os
import socket
from collections import deque
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Any

import outcome
import trio

from resolver import HostStore, blk_entry_name

from .._errors import (
    ConnectionLost,
    DiskError,
    HandshakeError,
    LocalProtocolError,
    RingCorruptError,
    ServiceNotFound,
    resolver_errors,
)
from .._native import ffi, lib
from ..transport.doorbell import Doorbell, spin
from ..transport.rendezvous import (
    check_reply,
    encode,
    peer_credentials,
    recv_message,
    recv_message_with_fds,
    send_refusal,
)
from .backends import Backend, MmapBackend, NullBackend

__all__ = ["BlkDisk", "open_blk", "serve_blk"]

log = logging.getLogger("meshlink.disk.blk")

PAGE = 4096
SECTOR = 512
SEGMENTS = 11  # segments of a direct request
#: Data pages per ring slot: the largest request, sent as one INDIRECT request
#: (its segment list in the slot's extra indirect page) when the server
#: accepts indirect requests, else split into direct 11-segment requests.
SLOT_PAGES = 256
MAX_INDIRECT_SEGMENTS = 256
PROTOCOL_VERSION = 1
DEFAULT_RING_ORDER = 1
HANDSHAKE_TIMEOUT = 5.0
SPIN_SECONDS = 50e-6
_FREE, _INFLIGHT, _ORPHAN, _DONE = range(4)
_STATUS_ERRNO = {lib.ML_BLK_RSP_ERROR: _errno.EIO, lib.ML_BLK_RSP_EOPNOTSUPP: _errno.ENOTSUP}


# --------------------------------------------------------------------------
# frontend


class BlkDisk:
    """A served disk opened over the blk ring.  Use :func:`open_blk`.

    Requests are pipelined: every call submits its requests at once (large
    I/O is split into 11-segment requests) and at most ``ring_entries``
    requests are in flight per disk.  Each ring slot owns fixed data pages,
    so a request's data is copied once into (write) or out of (read) its
    pages.  A task waiting for a response sleeps until the response pump
    reschedules it directly; a cancelled request's slot is reclaimed when its
    response arrives, so cancellation never leaks ring capacity.

    Attributes:
        size: disk size in bytes.
        read_only: writes, discards and barriers are refused.
        sector_size: 512.
        ring_entries: requests that may be in flight at once.
    """

    sector_size = SECTOR

    def __init__(self, *, size: int, read_only: bool, features: dict[str, object],
                 mm: mmap.mmap, front: Any, order: int, bell: Doorbell) -> None:
        self.size = size
        self.read_only = read_only
        self.features = features
        self._mm = mm
        self._view = memoryview(mm)
        self._front = front
        self._pool = PAGE << order
        self.ring_entries = n = int(lib.ml_blk_ring_entries(order))
        indirect = features.get("max_indirect_segments")
        self._indirect = isinstance(indirect, int) and indirect >= SLOT_PAGES
        self._chunk = SLOT_PAGES * PAGE if self._indirect else SEGMENTS * PAGE
        self._bell = bell
        self._free = deque(range(n))
        self._slot_freed = trio.lowlevel.ParkingLot()
        # Per slot: FREE, INFLIGHT or ORPHAN; the task waiting on it; its status.
        self._state = [_FREE] * n
        self._waiter: list[trio.lowlevel.Task | None] = [None] * n
        self._result: list[int | None] = [None] * n
        self._inflight = 0
        # One request struct per slot, rebuilt by ml_blk_front_submit on each use.
        self._reqs = [ffi.new("struct ml_blk_request *") for _ in range(n)]
        self._mem = ffi.from_buffer(mm)
        self._ids = ffi.new("uint64_t[]", n)
        self._statuses = ffi.new("int16_t[]", n)
        self._broken: BaseException | None = None
        self._closed = False

    # -- slots and the response pump ----------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("disk closed")
        if self._broken is not None:
            raise ConnectionLost(f"blk ring to the disk server is broken: {self._broken}")

    async def _take_slot(self, mine: deque[tuple[int, int]] | None = None,
                         collect: Any = None) -> int:
        while not self._free:
            if mine:
                await collect(*mine.popleft())
            else:
                await self._slot_freed.park()
            self._check()
        return self._free.popleft()

    def _release(self, slot: int) -> None:
        self._state[slot] = _FREE
        self._result[slot] = None
        self._free.append(slot)
        if self._slot_freed:
            self._slot_freed.unpark()

    def _orphan(self, slot: int) -> None:
        """Give up on a slot's response (cancelled); reclaim it when it arrives."""
        if self._result[slot] is not None or self._state[slot] != _INFLIGHT:
            self._release(slot)
        else:
            self._state[slot] = _ORPHAN

    def _drain(self) -> int:
        n = lib.ml_blk_front_get_many(self._front, self._ids, self._statuses,
                                      self.ring_entries)
        if n < 0:
            raise RingCorruptError("blk server published impossible response indices")
        for i in range(n):
            slot = int(self._ids[i])
            if (slot >= self.ring_entries or self._state[slot] in (_FREE, _DONE)
                    or self._result[slot] is not None):
                raise RingCorruptError(f"blk server answered request id {slot}, "
                                       "which is not in flight")
            self._inflight -= 1
            status = int(self._statuses[i])
            if self._state[slot] == _ORPHAN:
                self._release(slot)
                continue
            task = self._waiter[slot]
            if task is not None:
                self._waiter[slot] = None
                self._state[slot] = _DONE
                trio.lowlevel.reschedule(task, outcome.Value(status))
            else:
                self._result[slot] = status
        return int(n)

    def _fail_waiters(self, exc: BaseException) -> None:
        for slot, task in enumerate(self._waiter):
            if task is not None:
                self._waiter[slot] = None
                trio.lowlevel.reschedule(task, outcome.Error(exc))

    async def _pump(self) -> None:
        """Deliver responses to waiting requests until closed or broken."""
        try:
            while True:
                if self._drain():
                    continue
                if self._inflight and await spin(lambda: self._drain() > 0, SPIN_SECONDS):
                    continue
                more = lib.ml_blk_front_final_check(self._front)
                if more < 0:
                    raise RingCorruptError("blk server published impossible response indices")
                if more:
                    continue
                if self._bell.peer_dead:
                    raise ConnectionLost("blk disk server went away")
                await self._bell.wait()
        except (RingCorruptError, ConnectionLost) as exc:
            self._broken = exc
            self._fail_waiters(ConnectionLost(f"blk ring to the disk server is broken: {exc}"))
            self._slot_freed.unpark_all()

    # -- requests -----------------------------------------------------------

    def _slot_data(self, slot: int) -> int:
        """Offset in the shared memory of ``slot``'s first data page."""
        return self._pool + slot * (SLOT_PAGES + 1) * PAGE

    def _submit(self, slot: int, op: int, sector: int, nbytes: int) -> None:
        first = self._slot_data(slot)
        indirect = first + SLOT_PAGES * PAGE
        rc = lib.ml_blk_front_submit(
            self._front, self._reqs[slot], slot, op, sector, nbytes, first // PAGE,
            self._mem + indirect if self._indirect else ffi.NULL, indirect // PAGE)
        if rc < 0:
            raise LocalProtocolError(f"blk request op {op} of {nbytes} bytes cannot be built")
        self._state[slot] = _INFLIGHT
        self._result[slot] = None
        self._inflight += 1
        if rc:
            self._bell.ring()

    async def _wait(self, slot: int) -> int:
        """Wait for ``slot``'s response and return its status (slot stays taken)."""
        status = self._result[slot]
        if status is not None:
            await trio.lowlevel.checkpoint()
            return status
        self._check()
        self._waiter[slot] = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiter[slot] = None
            return trio.lowlevel.Abort.SUCCEEDED

        result: int = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _raise_status(self, status: int, what: str) -> None:
        if status != lib.ML_BLK_RSP_OKAY:
            code = _STATUS_ERRNO.get(status, _errno.EIO)
            raise DiskError(f"blk {what} failed: status {status} ({os.strerror(code)})", code)

    def _check_range(self, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"range {offset}+{length} outside the disk ({self.size} bytes)",
                            _errno.EINVAL)
        if write and self.read_only:
            raise DiskError("disk is read-only", _errno.EPERM)
        if write and (offset % SECTOR or length % SECTOR):
            raise LocalProtocolError("writes must be aligned to 512-byte sectors")

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (any alignment).

        Raises:
            DiskError: out of range, or the server reported an error.
            ConnectionLost: the server went away.
            trio.ClosedResourceError: the disk was closed.

        Cancellation: safe; the ring slots of cancelled requests are reclaimed
        when their responses arrive.

        Backpressure: waits for a free ring slot when ``ring_entries``
        requests are in flight.
        """
        self._check()
        self._check_range(offset, length, write=False)
        first = offset - offset % SECTOR
        end = -(-(offset + length) // SECTOR) * SECTOR
        if end - first <= self._chunk:
            # One request: the common small read, without the pipeline.
            slot = self._free.popleft() if self._free else await self._take_slot()
            try:
                self._submit(slot, lib.ML_BLK_OP_READ, first // SECTOR, end - first)
                status = await self._wait(slot)
                self._raise_status(status, "read")
                at = self._slot_data(slot) + (offset - first)
                data = bytes(self._view[at : at + length])
            except BaseException:
                self._orphan(slot)
                raise
            self._release(slot)
            return data
        # Each chunk is copied once out of its slot, then joined: cheaper than
        # filling one big zeroed bytearray (which page-faults on every call).
        chunks: list[bytes] = []
        await self._transfer(lib.ML_BLK_OP_READ, first, end - first, chunks)
        data = b"".join(chunks)
        if first == offset and end - first == length:
            return data
        return data[offset - first : offset - first + length]

    async def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` from the disk at ``offset`` (both multiples of 512).

        The allocation-free form of :meth:`read`: each byte is copied once,
        from the ring's data pages into ``buffer``.  Same errors,
        cancellation and backpressure as :meth:`read` (if cancelled, part of
        ``buffer`` may have been filled).

        Raises:
            LocalProtocolError: unaligned offset or length.
        """
        self._check()
        view = memoryview(buffer).cast("B")
        self._check_range(offset, len(view), write=False)
        if offset % SECTOR or len(view) % SECTOR:
            raise LocalProtocolError("readinto needs a 512-byte aligned offset and length")
        await self._transfer(lib.ML_BLK_OP_READ, offset, len(view), view)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (both multiples of 512 bytes).

        Returns once the server acknowledged every request (the data is in the
        backend; call :meth:`flush` for durability).

        Raises:
            LocalProtocolError: unaligned offset or length.
            DiskError: out of range, read-only, or a server error.
            ConnectionLost: the server went away.

        Cancellation: if cancelled, some of the data may have been written.

        Backpressure: at most ``ring_entries`` requests are in flight.
        """
        self._check()
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv), write=True)
        await self._transfer(lib.ML_BLK_OP_WRITE, offset, len(mv), mv)

    async def _transfer(self, op: int, offset: int, total: int,
                        data: memoryview | list[bytes]) -> None:
        """Move ``total`` bytes at ``offset``: from ``data`` for a write; for
        a read into ``data`` (a view) or appended to it chunk by chunk (a list)."""
        mine: deque[tuple[int, int]] = deque()
        failure: list[int] = []

        async def collect(slot: int, pos: int) -> None:
            try:
                status = await self._wait(slot)
            except BaseException:
                self._orphan(slot)
                raise
            if status == lib.ML_BLK_RSP_OKAY and op == lib.ML_BLK_OP_READ:
                n = min(self._chunk, total - pos)
                at = self._slot_data(slot)
                if isinstance(data, list):
                    data.append(bytes(self._view[at : at + n]))
                else:
                    data[pos : pos + n] = self._view[at : at + n]
            elif status != lib.ML_BLK_RSP_OKAY:
                failure.append(status)
            self._release(slot)

        try:
            pos = 0
            while pos < total:
                n = min(self._chunk, total - pos)
                slot = await self._take_slot(mine, collect)
                if op == lib.ML_BLK_OP_WRITE:
                    assert isinstance(data, memoryview)
                    at = self._slot_data(slot)
                    self._view[at : at + n] = data[pos : pos + n]
                self._submit(slot, op, (offset + pos) // SECTOR, n)
                mine.append((slot, pos))
                pos += n
            while mine:
                await collect(*mine.popleft())
        finally:
            while mine:  # cancelled or failed midway: reclaim the rest later
                self._orphan(mine.popleft()[0])
        if failure:
            self._raise_status(failure[0], "read" if op == lib.ML_BLK_OP_READ else "write")

    async def _simple(self, op: int, sector: int, nbytes: int, what: str) -> None:
        self._check()
        slot = self._free.popleft() if self._free else await self._take_slot()
        try:
            self._submit(slot, op, sector, nbytes)
            status = await self._wait(slot)
        except BaseException:
            self._orphan(slot)
            raise
        self._release(slot)
        self._raise_status(status, what)

    async def flush(self) -> None:
        """FLUSH_DISKCACHE: everything acknowledged so far is durable when this returns.

        Raises:
            DiskError: the server's flush failed.
            ConnectionLost: the server went away.

        Cancellation: the flush may still happen.
        """
        await self._simple(lib.ML_BLK_OP_FLUSH_DISKCACHE, 0, 0, "flush")

    async def barrier(self) -> None:
        """WRITE_BARRIER with no data: orders and flushes all earlier writes.

        Raises:
            DiskError: read-only disk or a server error.
        """
        if self.read_only:
            raise DiskError("disk is read-only", _errno.EPERM)
        await self._simple(lib.ML_BLK_OP_WRITE_BARRIER, 0, 0, "barrier")

    async def discard(self, offset: int, length: int) -> None:
        """DISCARD: the range reads as zeroes afterwards (sector-aligned).

        Raises:
            LocalProtocolError: unaligned range.
            DiskError: out of range, read-only, or unsupported by the backend.
        """
        self._check()
        self._check_range(offset, length, write=True)
        await self._simple(lib.ML_BLK_OP_DISCARD, offset // SECTOR, length, "discard")

    async def aclose(self) -> None:
        """Close the disk; requests in flight fail with ClosedResourceError."""
        if not self._closed:
            self._closed = True
            self._fail_waiters(trio.ClosedResourceError("disk closed"))
            self._slot_freed.unpark_all()
            self._bell.close()
            lib.ml_blk_front_free(self._front)
            self._front = None
            ffi.release(self._mem)
            self._view.release()
            self._mm.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> BlkDisk:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class _OpenBlk:
    """``async with open_blk(...) as disk`` (also awaitable-free context form)."""

    def __init__(self, target: str, host_store: HostStore | str | os.PathLike[str] | None,
                 ring_order: int) -> None:
        self._args = (target, host_store, ring_order)
        self._nursery_cm: Any = None
        self._disk: BlkDisk | None = None

    async def __aenter__(self) -> BlkDisk:
        disk = await _connect(*self._args)
        self._nursery_cm = trio.open_nursery()
        self._nursery = nursery = await self._nursery_cm.__aenter__()
        nursery.start_soon(disk._pump)
        self._disk = disk
        return disk

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._disk is not None
        self._nursery.cancel_scope.cancel()  # stop the response pump first
        try:
            return bool(await self._nursery_cm.__aexit__(et, e, tb))
        finally:
            await self._disk.aclose()


def open_blk(target: str, *, host_store: HostStore | str | os.PathLike[str] | None = None,
             ring_order: int = DEFAULT_RING_ORDER) -> _OpenBlk:
    """Open ``"service/disk"`` over the blk ring: ``async with open_blk(...) as d:``.

    Args:
        target: ``"storage-node/disk0"``; the service must run on this host.
        host_store: the host store (default: see :mod:`resolver.hoststore.store`).
        ring_order: ring-page-order 0..4 (32..512 requests in flight).

    Raises:
        ServiceNotFound: no live blk service of that name in the host store.
        AuthError: the server refused our uid.
        HandshakeError: unknown disk or a failed handshake.
    """
    if not 0 <= ring_order <= 4:
        raise LocalProtocolError("ring_order must be 0..4")
    return _OpenBlk(target, host_store, ring_order)


async def _connect(target: str, host_store: HostStore | str | os.PathLike[str] | None,
                   order: int) -> BlkDisk:
    service, sep, disk = target.partition("/")
    if not sep or not disk:
        raise LocalProtocolError(f"blk target must be 'service/disk', got {target!r}")
    with resolver_errors():
        store = host_store if isinstance(host_store, HostStore) else HostStore(host_store)
        path = store.socket_path(blk_entry_name(service))
    entries = int(lib.ml_blk_ring_entries(order))
    ring_pages = 1 << order
    pool_pages = entries * (SLOT_PAGES + 1)
    total = (ring_pages + pool_pages) * PAGE
    memfd = os.memfd_create("meshlink-blk", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    peer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ok = False
    mm: mmap.mmap | None = None
    front = None
    try:
        os.ftruncate(memfd, total)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        mm = mmap.mmap(memfd, total)
        out = ffi.new("ml_blk_front **")
        if lib.ml_blk_front_new(ffi.from_buffer(mm), order, out) != 0:
            raise LocalProtocolError("bad ring order")
        front = out[0]
        try:
            await sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ServiceNotFound(_errno.ENOENT,
                                  f"no live blk service {service!r} in {store.path}") from exc
        hello = {"meshlink": "blk", "version": PROTOCOL_VERSION, "disk": disk,
                 "ring_order": order, "pool_pages": pool_pages}
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await sock.sendmsg([encode(hello)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", [memfd, peer, own]))])
            reply = await recv_message(sock, "blk")
        check_reply(reply, f"blk server {service!r} refused {disk!r}")
        size = reply.get("size")
        if not isinstance(size, int) or size < 0:
            raise HandshakeError("blk handshake: bad disk size")
        features = reply.get("features")
        raw = socket.socket(fileno=sock.detach())
        bell = Doorbell(own, peer, raw)
        ok = True
        return BlkDisk(size=size, read_only=bool(reply.get("read_only")),
                       features=features if isinstance(features, dict) else {},
                       mm=mm, front=front, order=order, bell=bell)
    finally:
        os.close(memfd)  # the mapping (ours and the server's) keeps the pages
        sock.close()
        if not ok:
            os.close(own)
            os.close(peer)
            if front is not None:
                lib.ml_blk_front_free(front)
            if mm is not None:
                mm.close()


# --------------------------------------------------------------------------
# backend


class _Conn:
    """One frontend's ring as the server sees it."""

    def __init__(self, backend: Backend, mm: mmap.mmap, order: int, pool_pages: int,
                 bell: Doorbell) -> None:
        self.backend = backend
        self.mm = mm
        self.bell = bell
        sectors = backend.size // SECTOR
        base = ffi.from_buffer(mm)
        self._keep = base
        out = ffi.new("ml_blk_back **")
        rc = lib.ml_blk_back_new(base, order, base + (PAGE << order), 1 << order, pool_pages,
                                 sectors, 1 if backend.read_only else 0, out)
        if rc != 0:
            raise HandshakeError("bad blk ring parameters")
        self.back = out[0]
        self.checked = ffi.new("struct ml_blk_checked *")
        self.notify = ffi.new("int *")
        self.buffer: Any = None
        if isinstance(backend, NullBackend):
            self.buffer = ffi.NULL
        elif isinstance(backend, MmapBackend) and not backend.read_only and backend.size:
            view = getattr(backend, "_view", None)
            if isinstance(view, memoryview) and not view.readonly:
                self.buffer = ffi.from_buffer(view)
        self.blocking = backend.capabilities.blocking
        # The Backend protocol's optional zero-copy extensions (non-blocking
        # backends only: they hand out views of memory the loop copies into).
        self.read_vectored: Any = None if self.blocking else getattr(
            backend, "read_vectored", None)
        self.write_views: Any = None if self.blocking else getattr(
            backend, "write_views", None)

    def close(self) -> None:
        lib.ml_blk_back_free(self.back)
        self.bell.close()
        del self._keep
        self.mm.close()

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self.blocking:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def _serve_one(self, c: Any) -> int:
        op = c.op
        b = self.backend
        offset, length = int(c.offset), int(c.length)
        try:
            if op == lib.ML_BLK_OP_READ:
                if self.read_vectored is not None:
                    return self._read_pieces(c)
                else:
                    data = await self._call(b.read, offset, length)
                    lib.ml_blk_back_scatter(self.back, c, ffi.from_buffer(data))
            elif op in (lib.ML_BLK_OP_WRITE, lib.ML_BLK_OP_WRITE_BARRIER):
                if op == lib.ML_BLK_OP_WRITE_BARRIER:
                    await self._call(b.flush)
                if length and self.write_views is not None:
                    pos = 0
                    for view in self.write_views(offset, length):
                        lib.ml_blk_back_copy_from(self.back, c, pos, ffi.from_buffer(view),
                                                  len(view))
                        pos += len(view)
                elif length:
                    buf = bytearray(length)
                    lib.ml_blk_back_gather(self.back, c, ffi.from_buffer(buf))
                    await self._call(b.write, offset, buf)
                if op == lib.ML_BLK_OP_WRITE_BARRIER:
                    await self._call(b.flush)
            elif op == lib.ML_BLK_OP_FLUSH_DISKCACHE:
                await self._call(b.flush)
            elif op == lib.ML_BLK_OP_DISCARD:
                if not b.capabilities.can_trim:
                    return int(lib.ML_BLK_RSP_EOPNOTSUPP)
                await self._call(b.discard, offset, length)
        except DiskError as exc:
            log.warning("blk request %d failed: %s", op, exc)
            return int(lib.ML_BLK_RSP_ERROR)
        return int(lib.ML_BLK_RSP_OKAY)

    def _read_pieces(self, c: Any) -> int:
        """A READ from a backend's own memory, piece by piece: one copy, no await."""
        try:
            pos = 0
            copy_to = lib.ml_blk_back_copy_to
            for piece in self.read_vectored(int(c.offset), int(c.length)):
                copy_to(self.back, c, pos, ffi.from_buffer(piece), len(piece))
                pos += len(piece)
        except DiskError as exc:
            log.warning("blk read failed: %s", exc)
            return int(lib.ML_BLK_RSP_ERROR)
        return int(lib.ML_BLK_RSP_OKAY)

    async def _serve_available(self) -> int:
        """Serve every request published now; returns how many."""
        if self.buffer is not None:
            n = lib.ml_blk_back_serve_buffer(self.back, self.buffer, self.notify)
            if n < 0:
                raise RingCorruptError("frontend published impossible request indices")
            if self.notify[0]:
                self.bell.ring()
            return int(n)
        served = 0
        c = self.checked
        while True:
            rc = lib.ml_blk_back_get(self.back, c)
            if rc < 0:
                raise RingCorruptError("frontend published impossible request indices")
            if rc == 0:
                break
            status = int(c.status)
            if status == lib.ML_BLK_RSP_OKAY:
                if c.op == lib.ML_BLK_OP_READ and self.read_vectored is not None:
                    status = self._read_pieces(c)  # the hot path, without a coroutine
                else:
                    status = await self._serve_one(c)
            lib.ml_blk_back_put(self.back, c.req.id, c.req.operation, status)
            served += 1
        if served and lib.ml_blk_back_push(self.back):
            self.bell.ring()
        return served

    def _pending(self) -> bool:
        return bool(lib.ml_blk_back_final_check(self.back))

    async def run(self) -> None:
        while True:
            if await self._serve_available():
                continue
            if await spin(self._pending, SPIN_SECONDS):
                continue
            more = lib.ml_blk_back_final_check(self.back)
            if more < 0:
                raise RingCorruptError("frontend published impossible request indices")
            if more:
                continue
            if self.bell.peer_dead:
                return
            await self.bell.wait()


async def _handshake(conn: trio.socket.SocketType, disks: Mapping[str, Backend],
                     allow_uids: frozenset[int]) -> _Conn:
    uid = peer_credentials(conn).uid
    try:
        hello, fds = await recv_message_with_fds(conn, 3, "blk")
    except HandshakeError as exc:
        await send_refusal(conn, str(exc), "refused")
        raise

    async def refuse(why: str, code: str = "refused") -> None:
        for fd in fds:
            os.close(fd)
        await send_refusal(conn, why, code)
        raise HandshakeError(why)

    if uid not in allow_uids:
        await refuse(f"uid {uid} is not allowed", "auth")
    if hello.get("meshlink") != "blk" or hello.get("version") != PROTOCOL_VERSION:
        await refuse(f"unsupported blk hello (want version {PROTOCOL_VERSION})", "version")
    name = hello.get("disk")
    backend = disks.get(name) if isinstance(name, str) else None
    if backend is None:
        await refuse(f"no disk named {name!r} (have: {', '.join(sorted(disks))})", "nodisk")
        raise AssertionError  # unreachable: refuse raised
    order = hello.get("ring_order")
    pool = hello.get("pool_pages")
    if (not isinstance(order, int) or not 0 <= order <= 4 or not isinstance(pool, int)
            or not 0 <= pool <= 512 * (MAX_INDIRECT_SEGMENTS + 1) or len(fds) != 3):
        await refuse("bad ring parameters")
        raise AssertionError
    memfd, own, peer = fds
    try:
        total = ((1 << order) + pool) * PAGE
        st = os.fstat(memfd)
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
        if st.st_size != total or not seals & fcntl.F_SEAL_SHRINK:
            raise HandshakeError("frontend memory is not a sealed memfd of the announced size")
        mm = mmap.mmap(memfd, total)
    except (OSError, HandshakeError) as exc:
        await refuse(str(exc))
        raise
    finally:
        os.close(memfd)
    features = {"flush": backend.capabilities.can_flush, "barrier": True,
                "discard": backend.capabilities.can_trim,
                "max_indirect_segments": MAX_INDIRECT_SEGMENTS}
    await conn.send(encode({"ok": True, "version": PROTOCOL_VERSION, "size": backend.size,
                             "sector_size": SECTOR, "read_only": backend.read_only,
                             "features": features}))
    bell = Doorbell(own, peer, socket.socket(fileno=conn.detach()))
    return _Conn(backend, mm, order, pool, bell)


async def serve_blk(service: str, disks: Mapping[str, Backend], *,
                    host_store: HostStore | str | os.PathLike[str] | None = None,
                    allow_uids: Collection[int] | None = None,
                    task_status: trio.TaskStatus[HostStore] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``disks`` (name -> backend) over the blk ring until cancelled.

    Publishes ``<service>.blk`` in the host store; clients open
    ``"<service>/<disk>"`` with :func:`open_blk`.  A client that breaks the
    protocol (hostile ring indices, bad handshake) is dropped and logged;
    the others are unaffected.

    Args:
        service: the service name.
        disks: backends by disk name.
        host_store: the host store (default: see :mod:`resolver.hoststore.store`).
        allow_uids: uids allowed to connect (default: our own).
        task_status: ``nursery.start`` reports the host store once listening.

    Raises:
        AddressInUse: a live server already serves ``service`` here.

    Cancellation: withdraws the service and closes every client's ring.
    """
    uids = frozenset(allow_uids) if allow_uids is not None else frozenset({os.getuid()})
    with resolver_errors():
        store = host_store if isinstance(host_store, HostStore) else HostStore(host_store)
        pub = store.claim(blk_entry_name(service))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(pub.socket_path))
        sock.listen(128)
        task_status.started(store)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_serve_client, conn, disks, uids)
    finally:
        sock.close()
        pub.withdraw()


async def _serve_client(conn: trio.socket.SocketType, disks: Mapping[str, Backend],
                        uids: frozenset[int]) -> None:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            c = await _handshake(conn, disks, uids)
    except (HandshakeError, OSError, trio.TooSlowError) as exc:
        log.info("blk client refused: %s", exc)
        conn.close()
        return
    try:
        await c.run()
    except RingCorruptError as exc:
        log.warning("blk client dropped: %s", exc)
    finally:
        c.close()
