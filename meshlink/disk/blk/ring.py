"""Thin, typed wrapper over the native blk ring (``native/blkring.c``) and its pages.

Owns each end's native objects and shared pages, which come from the local
grant provider (``native/grant.h``, the same memfd pages vchan uses): the
frontend shares fresh sealed pages, the backend maps them after the provider
has checked their seals and size.  Turns C error codes into exceptions.  No
waiting happens here: every method returns at once.

The shared memory is laid out as Xen's blkfront does it: the ring's 2^order
pages are grant refs 0.., the data pages follow, and a grant ref is a page
index, so ``gref * PAGE`` is a byte offset into :attr:`FrontRing.memory`.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ... import errors
from ..._native import ffi, lib
from ...errors import HandshakeError, LocalProtocolError

__all__ = [
    "OP_DISCARD",
    "OP_FLUSH_DISKCACHE",
    "OP_READ",
    "OP_WRITE",
    "OP_WRITE_BARRIER",
    "PAGE",
    "RSP_EOPNOTSUPP",
    "RSP_ERROR",
    "RSP_OKAY",
    "SECTOR",
    "BackRing",
    "FrontRing",
    "ring_entries",
]

PAGE = 4096
SECTOR = int(lib.ML_BLK_SECTOR_SIZE)
OP_READ = int(lib.ML_BLK_OP_READ)
OP_WRITE = int(lib.ML_BLK_OP_WRITE)
OP_WRITE_BARRIER = int(lib.ML_BLK_OP_WRITE_BARRIER)
OP_FLUSH_DISKCACHE = int(lib.ML_BLK_OP_FLUSH_DISKCACHE)
OP_DISCARD = int(lib.ML_BLK_OP_DISCARD)
RSP_OKAY = int(lib.ML_BLK_RSP_OKAY)
RSP_ERROR = int(lib.ML_BLK_RSP_ERROR)
RSP_EOPNOTSUPP = int(lib.ML_BLK_RSP_EOPNOTSUPP)

# Buffers passed to C: anything supporting the buffer protocol.
Buffer = bytes | bytearray | memoryview


def ring_entries(order: int) -> int:
    """Requests a ring of 2^order pages holds (0 for an order outside 0..4)."""
    return int(lib.ml_blk_ring_entries(order))


_BAD_RESPONSES = "blk server published impossible response indices"
_BAD_REQUESTS = "frontend published impossible request indices"


def _corrupt(n: int, why: str) -> int:
    """Pass a count through, or raise for ML_ECORRUPT (impossible shared indices)."""
    if n < 0:
        # Looked up here: RingCorruptError is a trio error, and a trio-free
        # server (meshlink.disk.syncserve) loads trio only when a ring breaks.
        raise errors.RingCorruptError(why)
    return n


def _pages_error(rc: int, what: str) -> Exception:
    if rc == lib.ML_ENOMEM:
        return MemoryError(what)
    if rc == lib.ML_ESYS:
        err = ffi.errno
        return OSError(err, f"{what}: {os.strerror(err)}")
    return LocalProtocolError(f"{what}: invalid argument")


class FrontRing:
    """The frontend's end: fresh shared pages (ring, then data) and the C ring state.

    Attributes:
        ptr: the native ``ml_blk_front`` (for tests that hand-craft requests).
        memory: the shared pages, writable; released by :meth:`close`.
        entries: requests the ring holds.
        ids, statuses: where :meth:`get_many` leaves responses.
    """

    def __init__(self, order: int, data_pages: int) -> None:
        self.entries = n = ring_entries(order)
        if not n:
            raise LocalProtocolError("bad ring order")
        npages = (1 << order) + data_pages
        out = ffi.new("ml_grant_pages **")
        rc = lib.ml_local_pages_share(npages, out)
        if rc != 0:
            raise _pages_error(rc, "blk: sharing the ring's pages")
        self._pages = out[0]
        self._base = lib.ml_grant_pages_base(self._pages)
        front = ffi.new("ml_blk_front **")
        if lib.ml_blk_front_new(self._base, order, front) != 0:
            lib.ml_grant_pages_free(self._pages)
            raise LocalProtocolError("bad ring order")
        self.ptr = front[0]
        # After close() the view is released, so a late access raises
        # ValueError instead of touching unmapped memory.
        self.memory = memoryview(ffi.buffer(self._base, npages * PAGE))
        self.ids = ffi.new("uint64_t[]", n)
        self.statuses = ffi.new("int16_t[]", n)

    @property
    def memfd(self) -> int:
        """The pages' memfd, to hand to the backend (until :meth:`drop_memfd`)."""
        return int(lib.ml_grant_pages_fd(self._pages))

    def drop_memfd(self) -> None:
        """Close the memfd once the backend holds it; the mappings keep the pages."""
        lib.ml_grant_pages_drop_fd(self._pages)

    @staticmethod
    def new_request() -> Any:
        """A private request struct for :meth:`submit` to build into."""
        return ffi.new("struct ml_blk_request *")

    def submit(self, req: Any, ident: int, op: int, sector: int, nbytes: int,
               first_gref: int, indirect_gref: int, indirect: bool) -> bool:
        """Build, queue and publish one request; True if the backend must be signalled.

        Data is the consecutive pages from ``first_gref``; with ``indirect``
        a request over 11 segments lists them in page ``indirect_gref``.

        Raises:
            LocalProtocolError: a request that cannot be built.
        """
        page = self._base + indirect_gref * PAGE if indirect else ffi.NULL
        rc = lib.ml_blk_front_submit(self.ptr, req, ident, op, sector, nbytes, first_gref,
                                     page, indirect_gref)
        if rc < 0:
            raise LocalProtocolError(f"blk request op {op} of {nbytes} bytes cannot be built")
        return bool(rc)

    def get_many(self) -> int:
        """Take every response available into :attr:`ids`/:attr:`statuses`; how many."""
        return _corrupt(lib.ml_blk_front_get_many(self.ptr, self.ids, self.statuses,
                                                  self.entries), _BAD_RESPONSES)

    def final_check(self) -> bool:
        """Arm the response event and re-check: True if responses are pending."""
        return bool(_corrupt(lib.ml_blk_front_final_check(self.ptr), _BAD_RESPONSES))

    def close(self) -> None:
        """Release the view, the ring state and the pages.  Idempotent."""
        if self.ptr is None:
            return
        self.memory.release()
        lib.ml_blk_front_free(self.ptr)
        self.ptr = None
        lib.ml_grant_pages_free(self._pages)


class BackRing:
    """The backend's end: a frontend's pages, mapped, and the C ring state.

    Raises (constructor):
        HandshakeError: the memfd is not sealed or not of the announced size,
            or the ring parameters are impossible.
        OSError: mapping failed.
    """

    def __init__(self, memfd: int, order: int, data_pages: int, disk_sectors: int,
                 read_only: bool) -> None:
        ring_pages = 1 << order
        out = ffi.new("ml_grant_pages **")
        rc = lib.ml_local_pages_map(memfd, ring_pages + data_pages, out)
        if rc == lib.ML_ECORRUPT:
            raise HandshakeError("frontend memory is not a sealed memfd of the announced size")
        if rc != 0:
            raise _pages_error(rc, "blk: mapping the frontend's pages")
        self._pages = out[0]
        base = lib.ml_grant_pages_base(self._pages)
        back = ffi.new("ml_blk_back **")
        rc = lib.ml_blk_back_new(base, order, base + ring_pages * PAGE, ring_pages, data_pages,
                                 disk_sectors, 1 if read_only else 0, back)
        if rc != 0:
            lib.ml_grant_pages_free(self._pages)
            raise HandshakeError("bad blk ring parameters")
        self.ptr = back[0]
        self._notify = ffi.new("int *")
        self._direct: Any = None
        self._write_map: Any = None  # keeps the buffer the C loop marks alive
        self._stop: Any = ffi.new("int *")  # run_native's stop flag, set by stop_native

    @staticmethod
    def new_checked() -> Any:
        """A ``struct ml_blk_checked`` for :meth:`get` to fill."""
        return ffi.new("struct ml_blk_checked *")

    def get(self, c: Any) -> bool:
        """Copy out and validate the next request into ``c``; False if none.

        ``c.status`` is OKAY when the request may be served, else the error
        to answer with.
        """
        return bool(_corrupt(lib.ml_blk_back_get(self.ptr, c), _BAD_REQUESTS))

    def put(self, c: Any, status: int) -> None:
        """Queue the response to ``c`` privately (published by :meth:`push`)."""
        lib.ml_blk_back_put(self.ptr, c.req.id, c.req.operation, status)

    def push(self) -> bool:
        """Publish queued responses; True if the frontend must be signalled."""
        return bool(lib.ml_blk_back_push(self.ptr))

    def final_check(self) -> bool:
        """Arm the request event and re-check: True if requests are pending."""
        return bool(_corrupt(lib.ml_blk_back_final_check(self.ptr), _BAD_REQUESTS))

    def pending(self) -> bool:
        """Requests pending (for spinning; corruption is caught by the next get)."""
        return bool(lib.ml_blk_back_final_check(self.ptr))

    # -- data movement for a checked, servable request ------------------------

    def scatter(self, c: Any, data: Buffer) -> None:
        """Copy a READ's data (``c.length`` bytes) into its pages."""
        lib.ml_blk_back_scatter(self.ptr, c, ffi.from_buffer(data))

    def gather(self, c: Any, into: bytearray) -> None:
        """Copy a WRITE's pages into ``into`` (``c.length`` bytes)."""
        lib.ml_blk_back_gather(self.ptr, c, ffi.from_buffer(into))

    def copy_to(self, c: Any, at: int, piece: Buffer) -> None:
        """Copy ``piece`` into the request's pages from byte ``at`` of its data."""
        lib.ml_blk_back_copy_to(self.ptr, c, at, ffi.from_buffer(piece), len(piece))

    def copy_from(self, c: Any, at: int, piece: memoryview) -> None:
        """Copy the request's data from byte ``at`` into ``piece``."""
        lib.ml_blk_back_copy_from(self.ptr, c, at, ffi.from_buffer(piece), len(piece))

    # -- the native loop ------------------------------------------------------

    def serve_natively(self, disk: memoryview | None) -> None:
        """Let :meth:`serve_direct` answer every request from ``disk``, one
        writable buffer holding the whole disk, or None for the null disk."""
        self._direct = ffi.NULL if disk is None else ffi.from_buffer(disk)

    def set_write_map(self, chunk_map: memoryview, shift: int) -> None:
        """Have :meth:`serve_direct` mark written chunks in ``chunk_map``
        (one byte per ``2**shift`` bytes of disk; see ``ml_blk_back_set_write_map``).

        Raises:
            ValueError: the map does not cover the disk, or ``shift`` is out of range.
        """
        self._write_map = ffi.from_buffer(chunk_map)  # the C side keeps only the pointer
        if lib.ml_blk_back_set_write_map(self.ptr, self._write_map,
                                         len(chunk_map), shift) != 0:
            self._write_map = None
            raise ValueError("write map does not cover the disk")

    def set_notify_fd(self, fd: int) -> None:
        """Let :meth:`serve_direct` signal the frontend's eventfd ``fd`` itself
        in the middle of a batch (see ``ml_blk_back_set_notify_fd``)."""
        if lib.ml_blk_back_set_notify_fd(self.ptr, fd) != 0:
            raise ValueError(f"bad notify fd {fd}")

    def serve_direct(self) -> tuple[int, bool]:
        """Serve every request published now in C: (count, must signal)."""
        n = _corrupt(lib.ml_blk_back_serve_buffer(self.ptr, self._direct, self._notify),
                     _BAD_REQUESTS)
        return n, bool(self._notify[0])

    def run_native(self, own_fd: int, peer_fd: int, live_fd: int, stop_fd: int,
                   spin: float) -> None:
        """Serve in C until :meth:`stop_native` or the frontend's death
        (``ml_blk_back_run``); blocks, so call it in a thread.

        Raises:
            RingCorruptError: hostile ring indices.
            OSError: poll() on the fds failed.
        """
        rc = lib.ml_blk_back_run(self.ptr, self._direct, own_fd, peer_fd, live_fd, stop_fd,
                                 self._stop, int(spin * 1e9))
        if rc == lib.ML_ECORRUPT:
            raise errors.RingCorruptError(_BAD_REQUESTS)
        if rc == lib.ML_ESYS and ffi.errno != errno.EPIPE:  # EPIPE: the frontend died
            raise OSError(ffi.errno, f"blk native loop: {os.strerror(ffi.errno)}")
        if rc == lib.ML_EINVAL:
            raise ValueError("blk native loop: bad arguments")

    def stop_native(self, stop_fd: int) -> None:
        """Make :meth:`run_native` return soon (from any thread)."""
        self._stop[0] = 1
        os.eventfd_write(stop_fd, 1)

    def native_counters(self) -> list[int]:
        """What the native loop served on this ring (see :mod:`meshlink.disk.counters`);
        zeros once closed."""
        if self.ptr is None:
            return [0] * lib.ML_BLK_NCOUNTERS
        out = ffi.new("uint64_t[]", lib.ML_BLK_NCOUNTERS)
        lib.ml_blk_back_counters(self.ptr, out)
        return list(out)

    def close(self) -> None:
        """Free the ring state and unmap the pages.  Idempotent."""
        if self.ptr is None:
            return
        lib.ml_blk_back_free(self.ptr)
        self.ptr = None
        self._direct = None
        self._write_map = None
        lib.ml_grant_pages_free(self._pages)
