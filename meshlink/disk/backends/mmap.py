"""``mmap``: a file mapped MAP_SHARED; reads and writes are memory copies.

Reads return views into the mapping (zero-copy); flush is ``msync`` then
``fsync``; FUA msyncs just the written pages.  Discard and zeroing punch holes
in the file, which the shared mapping sees at once, falling back to storing
zeroes.  All connections share one mapping, so multi-conn is safe.
"""

from __future__ import annotations

import errno
import mmap
import os

from ...errors import DiskError
from ._base import Buffer, Capabilities, Extent, Geometry
from ._fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    disk_error,
    fallocate,
    file_extents,
    open_image,
)


class MmapBackend(Geometry):
    """A disk stored in the regular file at ``path``, accessed through a shared mapping.

    Args:
        path: file to map.
        read_only: map PROT_READ and refuse writes.
        size: create the file if missing and grow it to ``size``; a whole
            number of 512-byte sectors.  Not with ``read_only``.
        shrink: allow ``size`` to be smaller than the existing file, cutting
            off its end (never done otherwise).

    Raises:
        LocalProtocolError: a bad ``size``, or an argument combination that
            would be ignored or would shrink the file without ``shrink``.
        DiskError: the file cannot be opened or mapped, or, with no ``size``,
            its size is not whole sectors.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 size: int | None = None, shrink: bool = False) -> None:
        self._fd, self._size, _ = open_image(path, read_only=read_only, size=size,
                                             shrink=shrink)
        try:
            self._map: mmap.mmap | None = None
            if self._size:
                prot = mmap.PROT_READ | (0 if read_only else mmap.PROT_WRITE)
                self._map = mmap.mmap(self._fd, self._size, mmap.MAP_SHARED, prot)
        except (OSError, ValueError, OverflowError) as exc:
            os.close(self._fd)
            if isinstance(exc, OSError):
                raise disk_error(f"map {os.fspath(path)!r}", exc) from exc
            raise DiskError(f"map {os.fspath(path)!r}: {exc}", errno.EINVAL) from exc
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._read_only = read_only
        self._closed = False

    def fileno(self) -> int:
        """The open file descriptor (owned by this object)."""
        return self._fd

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(can_cache=True, blocking=True, direct_memory=True)

    def direct_buffer(self) -> memoryview | None:
        """The writable mapping itself (None when read-only or empty): a front
        end copying into it writes the file, as :meth:`write` does."""
        if self._read_only or not self._size or self._view.readonly:
            return None
        return self._view

    def read(self, offset: int, length: int) -> Buffer:
        return self._view[offset : offset + length]

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        src = memoryview(data).cast("B")
        self._view[offset : offset + len(src)] = src
        if fua:
            self._sync(offset, len(src))

    def _sync(self, offset: int, length: int) -> None:
        assert self._map is not None
        start = offset - offset % mmap.PAGESIZE
        try:
            self._map.flush(start, offset + length - start)
        except OSError as exc:
            raise disk_error("msync", exc) from exc

    def flush(self) -> None:
        if self._map is None:
            return
        try:
            self._map.flush()
            os.fsync(self._fd)
        except OSError as exc:
            raise disk_error("flush", exc) from exc

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self.write_zeroes(offset, length, fua=fua)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        # Dirty pages of the mapping in this range are dropped by the punch, and
        # the range reads back as zeroes through the mapping; that is what we want.
        if may_trim and fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  offset, length):
            return
        if fast and not may_trim:
            # NO_HOLE + FAST_ZERO: storing zeroes is a memset, no faster than a write.
            raise DiskError("provisioned zeroing is a plain memset here", errno.ENOTSUP)
        if fast and may_trim:
            raise DiskError("cannot punch holes on this filesystem", errno.ENOTSUP)
        zero = memoryview(bytes(min(length, 1 << 20)))
        pos = 0
        while pos < length:
            n = min(len(zero), length - pos)
            self._view[offset + pos : offset + pos + n] = zero[:n]
            pos += n
        if fua:
            self._sync(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return file_extents(self._fd, offset, length, self._size)

    def cache(self, offset: int, length: int) -> None:
        if self._map is None:
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_WILLNEED, start, offset + length - start)
        except OSError as exc:
            raise disk_error("cache", exc) from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a reader still holds a view; the mapping goes with the last one
        os.close(self._fd)
