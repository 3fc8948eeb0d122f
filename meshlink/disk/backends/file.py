"""``file``: a regular file or block device, through pread/pwrite.

FUA uses ``pwritev(..., RWF_DSYNC)`` so only that write is synchronous; flush
is ``fsync``.  Discard and zeroing punch holes (``fallocate``) and fall back
to writing zero buffers where the filesystem cannot; a FAST_ZERO request that
would need the fallback fails with ENOTSUP at once, touching nothing.  Every
connection shares one file description, and the page cache is shared by all,
so multi-conn is safe.
"""

from __future__ import annotations

import errno
import os

from ...errors import DiskError
from ._base import Buffer, Capabilities, Extent, Geometry
from ._fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    disk_error,
    fallocate,
    file_extents,
    open_image,
    write_zero_buffers,
)


class FileBackend(Geometry):
    """A disk stored in the file (or block device) at ``path``.

    Args:
        path: file to open.
        read_only: open O_RDONLY and refuse writes.
        size: create the file if missing and grow it to ``size`` (sparse); a
            whole number of 512-byte sectors.  Not with ``read_only``.  For a
            block device it must equal the device's size.
        shrink: allow ``size`` to be smaller than the existing file, cutting
            off its end (never done otherwise).

    Raises:
        LocalProtocolError: a bad ``size``, or an argument combination that
            would be ignored or would shrink the file without ``shrink``.
        DiskError: the file cannot be opened (errno from the OS, mapped to
            NBD), or, with no ``size``, its size is not whole sectors.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 size: int | None = None, shrink: bool = False) -> None:
        self._fd, self._size, self._regular = open_image(path, read_only=read_only,
                                                         size=size, shrink=shrink)
        self._read_only = read_only
        self._closed = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(can_cache=True, can_extents=self._regular, blocking=True)

    def fileno(self) -> int:
        """The open file descriptor (owned by this object)."""
        return self._fd

    def read(self, offset: int, length: int) -> Buffer:
        try:
            data = os.pread(self._fd, length, offset)
            if len(data) == length:
                return data
            # Short read: keep going; a file that ends early is an I/O error.
            out = bytearray(data)
            while len(out) < length:
                more = os.pread(self._fd, length - len(out), offset + len(out))
                if not more:
                    raise DiskError(f"short read at {offset + len(out)}: file shrank",
                                    errno.EIO)
                out += more
            return out
        except OSError as exc:
            raise disk_error("read", exc) from exc

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        flags = os.RWF_DSYNC if fua else 0
        try:
            while view:
                n = os.pwritev(self._fd, [view], offset, flags)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise disk_error("write", exc) from exc

    def flush(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise disk_error("flush", exc) from exc

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        if not fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            write_zero_buffers(self._fd, offset, length)
        if fua:
            self.flush()

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        if may_trim:
            done = fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             offset, length)
        else:
            done = False
        if not done:
            done = fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                             offset, length)
        if not done:
            if fast:
                raise DiskError("zeroing here means writing zero buffers", errno.ENOTSUP)
            write_zero_buffers(self._fd, offset, length)
        if fua:
            self.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._regular:
            return [(min(length, self._size - offset), 0)]
        return file_extents(self._fd, offset, length, self._size)

    def cache(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            raise disk_error("cache", exc) from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
