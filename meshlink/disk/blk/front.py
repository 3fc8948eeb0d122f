"""The blk ring's frontend: a served disk as the disk's user sees it.

:func:`open_blk` connects to ``<service>.blk``, shares the ring's pages with
the server (see :mod:`.ring`) and returns a :class:`BlkDisk`.  As in Xen's
blkfront, the frontend owns the memory: 2^order ring pages followed by
``SLOT_PAGES + 1`` data pages per ring slot (the slot's data, then its
indirect page), so every request in flight has its own pages and no
allocator is needed.  A response pump task delivers responses to the waiting
requests; cancelled requests' slots are reclaimed when their responses arrive.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
from collections import deque
from types import TracebackType
from typing import Any

import outcome
import trio

from resolver import HostStore, blk_entry_name

from ...errors import (
    ConnectionLost,
    DiskError,
    HandshakeError,
    LocalProtocolError,
    RingCorruptError,
    ServiceNotFound,
    resolver_errors,
)
from ...transport.doorbell import Doorbell, spin
from ...transport.rendezvous import check_reply, recv_message, send_hello
from .handshake import HANDSHAKE_TIMEOUT, PROTOCOL_VERSION, SPIN_SECONDS
from .ring import (
    OP_DISCARD,
    OP_FLUSH_DISKCACHE,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    PAGE,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    SECTOR,
    FrontRing,
    ring_entries,
)

__all__ = ["DEFAULT_RING_ORDER", "BlkDisk", "open_blk"]

SEGMENTS = 11  # segments of a direct request
#: Data pages per ring slot: the largest request, sent as one INDIRECT request
#: (its segment list in the slot's extra indirect page) when the server
#: accepts indirect requests, else split into direct 11-segment requests.
SLOT_PAGES = 256
DEFAULT_RING_ORDER = 1
_FREE, _INFLIGHT, _ORPHAN, _DONE = range(4)
_STATUS_ERRNO = {RSP_ERROR: _errno.EIO, RSP_EOPNOTSUPP: _errno.ENOTSUP}



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
                 ring: FrontRing, order: int, bell: Doorbell,
                 slot_pages: int = SLOT_PAGES + 1) -> None:
        self.size = size
        self.read_only = read_only
        self.features = features
        self._ring = ring
        # The shared pages (released on close, so late use raises, never
        # touches unmapped memory) and the raw ring, which the tests use to
        # hand-craft hostile requests.
        self._mm = ring.memory
        self._front = ring.ptr
        self._pool = PAGE << order
        self.ring_entries = n = ring.entries
        indirect = features.get("max_indirect_segments")
        # Pages each slot owns: 256 of data and an indirect page, or (a ring
        # without INDIRECT, over Xen) just a direct request's 11.
        self._slot_pages = slot_pages
        self._indirect = (isinstance(indirect, int) and indirect >= SLOT_PAGES
                          and slot_pages >= SLOT_PAGES + 1)
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
        self._reqs = [ring.new_request() for _ in range(n)]
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
        ring = self._ring
        n = ring.get_many()
        ids, statuses = ring.ids, ring.statuses
        for i in range(n):
            slot = int(ids[i])
            if (slot >= self.ring_entries or self._state[slot] in (_FREE, _DONE)
                    or self._result[slot] is not None):
                raise RingCorruptError(f"blk server answered request id {slot}, "
                                       "which is not in flight")
            self._inflight -= 1
            status = int(statuses[i])
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
        return n

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
                if self._ring.final_check():
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
        return self._pool + slot * self._slot_pages * PAGE

    def _submit(self, slot: int, op: int, sector: int, nbytes: int) -> None:
        first = self._slot_data(slot)
        signal = self._ring.submit(self._reqs[slot], slot, op, sector, nbytes, first // PAGE,
                                   first // PAGE + SLOT_PAGES, self._indirect)
        self._state[slot] = _INFLIGHT
        self._result[slot] = None
        self._inflight += 1
        if signal:
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
        if status != RSP_OKAY:
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
                self._submit(slot, OP_READ, first // SECTOR, end - first)
                status = await self._wait(slot)
                self._raise_status(status, "read")
                at = self._slot_data(slot) + (offset - first)
                data = bytes(self._mm[at : at + length])
            except BaseException:
                self._orphan(slot)
                raise
            self._release(slot)
            return data
        # Each chunk is copied once out of its slot, then joined: cheaper than
        # filling one big zeroed bytearray (which page-faults on every call).
        chunks: list[bytes] = []
        await self._transfer(OP_READ, first, end - first, chunks)
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
        await self._transfer(OP_READ, offset, len(view), view)

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
        await self._transfer(OP_WRITE, offset, len(mv), mv)

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
            if status == RSP_OKAY and op == OP_READ:
                n = min(self._chunk, total - pos)
                at = self._slot_data(slot)
                if isinstance(data, list):
                    data.append(bytes(self._mm[at : at + n]))
                else:
                    data[pos : pos + n] = self._mm[at : at + n]
            elif status != RSP_OKAY:
                failure.append(status)
            self._release(slot)

        try:
            pos = 0
            while pos < total:
                n = min(self._chunk, total - pos)
                slot = await self._take_slot(mine, collect)
                if op == OP_WRITE:
                    assert isinstance(data, memoryview)
                    at = self._slot_data(slot)
                    self._mm[at : at + n] = data[pos : pos + n]
                self._submit(slot, op, (offset + pos) // SECTOR, n)
                mine.append((slot, pos))
                pos += n
            while mine:
                await collect(*mine.popleft())
        finally:
            while mine:  # cancelled or failed midway: reclaim the rest later
                self._orphan(mine.popleft()[0])
        if failure:
            self._raise_status(failure[0], "read" if op == OP_READ else "write")

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
        await self._simple(OP_FLUSH_DISKCACHE, 0, 0, "flush")

    async def barrier(self) -> None:
        """WRITE_BARRIER with no data: orders and flushes all earlier writes.

        Raises:
            DiskError: read-only disk or a server error.
        """
        if self.read_only:
            raise DiskError("disk is read-only", _errno.EPERM)
        await self._simple(OP_WRITE_BARRIER, 0, 0, "barrier")

    async def discard(self, offset: int, length: int) -> None:
        """DISCARD: the range reads as zeroes afterwards (sector-aligned).

        Raises:
            LocalProtocolError: unaligned range.
            DiskError: out of range, read-only, or unsupported by the backend.
        """
        self._check()
        self._check_range(offset, length, write=True)
        await self._simple(OP_DISCARD, offset // SECTOR, length, "discard")

    async def aclose(self) -> None:
        """Close the disk; requests in flight fail with ClosedResourceError."""
        if not self._closed:
            self._closed = True
            self._fail_waiters(trio.ClosedResourceError("disk closed"))
            self._slot_freed.unpark_all()
            self._bell.close()
            self._ring.close()
            self._front = None
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
        store = HostStore.of(host_store)
        path = store.socket_path(blk_entry_name(service))
    pool_pages = ring_entries(order) * (SLOT_PAGES + 1)
    # The pages come from the local grant provider: a sealed memfd we pass on.
    ring = FrontRing(order, pool_pages)
    own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    peer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ok = False
    try:
        try:
            await sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ServiceNotFound(_errno.ENOENT,
                                  f"no live blk service {service!r} in {store.path}") from exc
        hello = {"meshlink": "blk", "version": PROTOCOL_VERSION, "disk": disk,
                 "ring_order": order, "pool_pages": pool_pages}
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await send_hello(sock, hello, [ring.memfd, peer, own])
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
                       ring=ring, order=order, bell=bell)
    finally:
        ring.drop_memfd()  # the mappings (ours and the server's) keep the pages
        sock.close()
        if not ok:
            os.close(own)
            os.close(peer)
            ring.close()


