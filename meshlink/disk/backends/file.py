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
import stat

from ...errors import DiskError
from ._base import Buffer, Capabilities, Extent
from ._fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    disk_error,
    fallocate,
    file_extents,
    write_zero_buffers,
)


class FileBackend:
    """A disk stored in the file (or block device) at ``path``.

    Args:
        path: file to open.
        read_only: open O_RDONLY and refuse writes.
        size: if given and the file is a regular file, create it if missing
            and set its length to ``size`` (sparse).

    Raises:
        DiskError: the file cannot be opened (errno from the OS, mapped to NBD).
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 size: int | None = None) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if size is not None and not read_only:
            flags |= os.O_CREAT
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise disk_error(f"open {os.fspath(path)!r}", exc) from exc
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                if size is not None and not read_only and st.st_size != size:
                    os.ftruncate(self._fd, size)
                self._size = size if size is not None and not read_only else st.st_size
            else:
                self._size = os.lseek(self._fd, 0, os.SEEK_END)
            self._regular = stat.S_ISREG(st.st_mode)
        except OSError as exc:
            os.close(self._fd)
            raise disk_error(f"open {os.fspath(path)!r}", exc) from exc
        self._read_only = read_only
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def sector_size(self) -> int:
        return 512

    @property
    def read_only(self) -> bool:
        return self._read_only

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
