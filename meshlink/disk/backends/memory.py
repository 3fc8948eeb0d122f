"""``memory``: a sparse RAM disk; only written 64 KiB chunks take memory.

Two layouts, one behaviour:

* **mapped** (Linux, disks up to 16 TiB): the whole disk is one private
  anonymous mapping made with ``MAP_NORESERVE``, so the kernel allocates a
  page only when it is first written (unwritten pages read as the shared zero
  page).  A second such mapping, one byte per chunk, records which chunks
  were written; extents and :attr:`MemoryBackend.allocated_bytes` come from
  it.  Because the disk is one contiguous buffer, front ends can serve it
  without Python on the request path: the blk ring's native loop copies to
  and from it and marks the chunk map (``ml_blk_back_set_write_map``), and
  the NBD server reads and receives whole requests as one view.
* **chunked** (larger disks, other systems, or when the mapping is refused):
  a dict of 64 KiB bytearrays allocated on first write.

Either way chunks never move once allocated, so :meth:`MemoryBackend.read`
can return a view (zero-copy) and writes to different parts of one chunk
from different threads cannot lose each other's bytes.  A discard or zeroing
that covers a whole chunk frees it (``MADV_DONTNEED`` when mapped); a
partial one zeroes in place.

Nothing here is volatile in the NBD sense (there is no disk behind the RAM),
so flush and FUA are deliberate no-ops and multi-conn is safe: every
connection shares this one object.
"""

from __future__ import annotations

import mmap
import sys

from ._base import (
    STATE_HOLE,
    STATE_ZERO,
    Buffer,
    Capabilities,
    Extent,
    Geometry,
    check_size,
    coalesce,
)

CHUNK = 1 << 16
CHUNK_SHIFT = 16
#: Largest disk given the mapped layout: 16 TiB of address space (of 128 TiB
#: on x86-64) leaves room for several such disks and everything else.
MAP_MAX = 1 << 44
# Not exported by Python's mmap module before 3.13; the value is Linux's on
# every architecture it runs on.  Without it, a mapping larger than RAM plus
# swap would be refused by the kernel's overcommit heuristic.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _anonymous(size: int) -> mmap.mmap | None:
    """A private, lazily allocated, unreserved zero mapping, or None if refused."""
    if not sys.platform.startswith("linux") or not 0 < size <= MAP_MAX:
        return None
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError, ValueError):
        return None


class MemoryBackend(Geometry):
    """A sparse in-memory disk of ``size`` bytes; unwritten space reads as zeroes.

    Args:
        size: size in bytes (memory is only used for written chunks).
        read_only: refuse writes at the front end.
        mapped: None picks the layout (mapped where it can, see the module);
            False forces the chunked one.

    Raises:
        LocalProtocolError: ``size`` is not a whole number of 512-byte sectors
            in ``0..2**63-1``.
    """

    def __init__(self, size: int, *, read_only: bool = False,
                 mapped: bool | None = None) -> None:
        self._size = check_size(size)
        self._read_only = read_only
        self._chunks: dict[int, bytearray] = {}
        self._zero = memoryview(bytes(CHUNK))
        self._map = _anonymous(self._size) if mapped is not False else None
        self._used: mmap.mmap | None = None
        if self._map is not None:
            self._used = _anonymous(-(-self._size // CHUNK))
            if self._used is None:
                self._map.close()
                self._map = None
        self._view = memoryview(self._map) if self._map is not None else None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(can_cache=False, direct_memory=self._view is not None)

    @property
    def mapped(self) -> bool:
        """True for the mapped layout (one contiguous buffer; see the module)."""
        return self._view is not None

    @property
    def allocated_bytes(self) -> int:
        """Bytes of RAM currently holding chunks."""
        if self._used is not None:
            return self._used[:].count(1) * CHUNK
        return len(self._chunks) * CHUNK

    def direct_buffer(self) -> memoryview | None:
        """The whole disk as one writable buffer (mapped layout only, else None).

        A front end that stores into it must also mark the chunks it wrote in
        :meth:`write_map`, or extents will report them as holes.
        """
        if self._view is None or self._read_only:
            return None
        return self._view

    def write_map(self) -> memoryview | None:
        """The written-chunk map of the mapped layout: one byte per ``CHUNK``
        bytes of disk, 1 once written (None in the chunked layout)."""
        return memoryview(self._used) if self._used is not None else None

    def _mark(self, offset: int, length: int) -> None:
        assert self._used is not None
        first, last = offset >> CHUNK_SHIFT, (offset + length - 1) >> CHUNK_SHIFT
        if first == last:
            self._used[first] = 1
        else:
            self._used[first : last + 1] = b"\x01" * (last - first + 1)

    def read(self, offset: int, length: int) -> Buffer:
        view = self._view
        if view is not None:
            return view[offset : offset + length]
        index, start = divmod(offset, CHUNK)
        if start + length <= CHUNK:  # the common case: one chunk, no copy
            chunk = self._chunks.get(index)
            if chunk is None:
                return self._zero[:length]
            return memoryview(chunk)[start : start + length]
        out = bytearray(length)
        view = memoryview(out)
        pos = 0
        while pos < length:
            index, start = divmod(offset + pos, CHUNK)
            n = min(CHUNK - start, length - pos)
            chunk = self._chunks.get(index)
            if chunk is not None:
                view[pos : pos + n] = memoryview(chunk)[start : start + n]
            pos += n
        return out

    def read_vectored(self, offset: int, length: int) -> list[Buffer]:
        """Like :meth:`read` but as a list of views, one per chunk (no copy at all).

        The optional zero-copy extension front ends use for large reads (the
        mapped layout answers with one view).
        """
        if self._view is not None:
            return [self._view[offset : offset + length]]
        out: list[Buffer] = []
        pos = 0
        chunks = self._chunks
        zero = self._zero
        while pos < length:
            index, start = divmod(offset + pos, CHUNK)
            n = min(CHUNK - start, length - pos)
            chunk = chunks.get(index)
            out.append(zero[:n] if chunk is None else memoryview(chunk)[start : start + n])
            pos += n
        return out

    def write_views(self, offset: int, length: int) -> list[memoryview]:
        """Writable views of the storage for ``offset..offset+length`` (allocating).

        The optional zero-copy extension: a front end receives a WRITE payload
        straight into these views; bytes stored there *are* the write.
        """
        if self._view is not None:
            if length:
                self._mark(offset, length)
            return [self._view[offset : offset + length]]
        out: list[memoryview] = []
        pos = 0
        chunks = self._chunks
        while pos < length:
            index, start = divmod(offset + pos, CHUNK)
            n = min(CHUNK - start, length - pos)
            chunk = chunks.get(index)
            if chunk is None:
                chunk = chunks.setdefault(index, bytearray(CHUNK))
            out.append(memoryview(chunk)[start : start + n])
            pos += n
        return out

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        # fua: deliberate no-op, RAM is as durable as this disk gets.
        src = memoryview(data).cast("B")
        length = len(src)
        if self._view is not None:
            if length:
                self._mark(offset, length)
                self._view[offset : offset + length] = src
            return
        pos = 0
        chunks = self._chunks
        while pos < length:
            index, start = divmod(offset + pos, CHUNK)
            n = min(CHUNK - start, length - pos)
            chunk = chunks.get(index)
            if chunk is None:
                # setdefault is atomic under the GIL: two writers allocate one chunk.
                chunk = chunks.setdefault(index, bytearray(CHUNK))
            memoryview(chunk)[start : start + n] = src[pos : pos + n]
            pos += n

    def flush(self) -> None:
        pass  # deliberate: nothing volatile to persist

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self._zero_range(offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        # Zeroing frees or clears chunks without writing a buffer, so it is fast.
        # NO_HOLE (may_trim=False) is honoured trivially: RAM has no provisioning.
        self._zero_range(offset, length)

    def _zero_range(self, offset: int, length: int) -> None:
        if self._view is not None:
            self._zero_mapped(offset, length)
            return
        pos = 0
        chunks = self._chunks
        while pos < length:
            index, start = divmod(offset + pos, CHUNK)
            n = min(CHUNK - start, length - pos)
            if n == CHUNK:
                chunks.pop(index, None)
            else:
                chunk = chunks.get(index)
                if chunk is not None:
                    memoryview(chunk)[start : start + n] = self._zero[:n]
            pos += n

    def _zero_mapped(self, offset: int, length: int) -> None:
        """Free the whole chunks of the range, zero the partial ones in place."""
        assert self._map is not None and self._view is not None and self._used is not None
        end = offset + length
        first = -(-offset // CHUNK)  # whole chunks: [first, last)
        last = end // CHUNK if end < self._size else -(-end // CHUNK)
        edges = [(offset, min(end, first * CHUNK)), (max(offset, last * CHUNK), end)]
        if first < last:
            # Clear the map first: a reader that sees 0 there reads zeros anyway.
            self._used[first:last] = bytes(last - first)
            stop = min(last * CHUNK, self._size)
            self._map.madvise(mmap.MADV_DONTNEED, first * CHUNK, stop - first * CHUNK)
        else:
            edges = [(offset, end)]
        for a, b in edges:
            while a < b:
                n = min(b - a, CHUNK - a % CHUNK)
                if self._used[a >> CHUNK_SHIFT]:
                    self._view[a : a + n] = self._zero[:n]
                a += n

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(self._size, offset + length)
        first, last = offset // CHUNK, (end - 1) // CHUNK
        if self._used is not None:
            return self._extents_mapped(offset, end, first, last)
        present = self._chunks
        if last - first > 4 * len(present) + 64:
            # A big range over few chunks: walk the allocated chunks, not the range.
            keys = sorted(k for k in list(present) if first <= k <= last)
        else:
            keys = [k for k in range(first, last + 1) if k in present]
        out: list[Extent] = []
        pos = offset
        for key in keys:
            start = max(offset, key * CHUNK)
            stop = min(end, (key + 1) * CHUNK)
            if start > pos:
                out.append((start - pos, STATE_HOLE | STATE_ZERO))
            out.append((stop - start, 0))
            pos = stop
        if pos < end:
            out.append((end - pos, STATE_HOLE | STATE_ZERO))
        return coalesce(out)

    def _extents_mapped(self, offset: int, end: int, first: int, last: int) -> list[Extent]:
        """Extents from the chunk map: runs found with ``find`` (C speed)."""
        used = self._used
        assert used is not None
        out: list[Extent] = []
        pos = offset
        i = first
        while i <= last:
            j = used.find(b"\x01", i, last + 1)
            if j < 0:
                break
            k = used.find(b"\x00", j, last + 1)
            if k < 0:
                k = last + 1
            start, stop = max(offset, j * CHUNK), min(end, k * CHUNK)
            if start > pos:
                out.append((start - pos, STATE_HOLE | STATE_ZERO))
            out.append((stop - start, 0))
            pos = stop
            i = k
        if pos < end:
            out.append((end - pos, STATE_HOLE | STATE_ZERO))
        return coalesce(out)

    def cache(self, offset: int, length: int) -> None:
        pass  # deliberate: already in RAM

    def close(self) -> None:
        self._chunks.clear()
        if self._map is not None and self._used is not None:
            # Return the memory but keep the mapping: front ends may still
            # hold views (a closed disk then reads as zeroes, as chunked does).
            self._map.madvise(mmap.MADV_DONTNEED, 0, self._size)
            self._used.madvise(mmap.MADV_DONTNEED)
