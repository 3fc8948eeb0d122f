"""``memory``: a sparse RAM disk, allocated in 64 KiB chunks on first write.

Chunks never change size once allocated, so :meth:`MemoryBackend.read` can
return a view into one (zero-copy) and writes to different parts of one chunk
from different threads cannot lose each other's bytes.  A discard or zeroing
that covers a whole chunk frees it; a partial one zeroes in place.

Nothing here is volatile in the NBD sense (there is no disk behind the RAM),
so flush and FUA are deliberate no-ops and multi-conn is safe: every
connection shares this one object.
"""

from __future__ import annotations

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


class MemoryBackend(Geometry):
    """A sparse in-memory disk of ``size`` bytes; unwritten space reads as zeroes.

    Args:
        size: size in bytes (memory is only used for written chunks).
        read_only: refuse writes at the front end.

    Raises:
        LocalProtocolError: ``size`` is not a whole number of 512-byte sectors
            in ``0..2**63-1``.
    """

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        self._size = check_size(size)
        self._read_only = read_only
        self._chunks: dict[int, bytearray] = {}
        self._zero = memoryview(bytes(CHUNK))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(can_cache=False)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of RAM currently holding chunks."""
        return len(self._chunks) * CHUNK

    def read(self, offset: int, length: int) -> Buffer:
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

        The optional zero-copy extension front ends use for large reads.
        """
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

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(self._size, offset + length)
        first, last = offset // CHUNK, (end - 1) // CHUNK
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

    def cache(self, offset: int, length: int) -> None:
        pass  # deliberate: already in RAM

    def close(self) -> None:
        self._chunks.clear()
