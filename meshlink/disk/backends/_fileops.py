"""File helpers shared by the ``file``, ``mmap`` and ``cow`` backends.

fallocate(2) is not in :mod:`os` with its mode flags, so it is called through
ctypes; SEEK_DATA/SEEK_HOLE come from :mod:`os`.  Errors become
:class:`meshlink.DiskError` with an NBD errno (ENOSPC for EDQUOT/EFBIG, as the
NBD document asks).
"""

from __future__ import annotations

import ctypes
import errno
import os

from ...errors import DiskError
from ._base import STATE_HOLE, STATE_ZERO, Extent, coalesce

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_LIBC = ctypes.CDLL(None, use_errno=True)
_FALLOCATE = _LIBC.fallocate
_FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOCATE.restype = ctypes.c_int

#: Errnos NBD defines; anything else travels as EIO.
_NBD_ERRNOS = {errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
               errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN}


def nbd_errno(err: int | None) -> int:
    """Map a POSIX errno to the closest one NBD defines."""
    if err in (errno.EDQUOT, errno.EFBIG):
        return errno.ENOSPC
    if err == errno.EROFS or err == errno.EACCES:
        return errno.EPERM
    if err == errno.EOPNOTSUPP:
        return errno.ENOTSUP
    return err if err in _NBD_ERRNOS else errno.EIO


def disk_error(what: str, exc: OSError) -> DiskError:
    """Wrap an OSError as a DiskError carrying the NBD errno."""
    err = DiskError(f"{what}: {exc.strerror or exc}", nbd_errno(exc.errno))
    err.__cause__ = exc
    return err


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Call fallocate(2).

    Returns:
        True on success, False when the filesystem does not support ``mode``.

    Raises:
        DiskError: any other failure.
    """
    if _FALLOCATE(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise disk_error("fallocate", OSError(err, os.strerror(err)))


def write_zero_buffers(fd: int, offset: int, length: int) -> None:
    """Write literal zeroes (the slow fallback), 1 MiB at a time.

    Raises:
        DiskError: the write failed.
    """
    zero = bytes(min(length, 1 << 20))
    pos = 0
    try:
        while pos < length:
            n = min(len(zero), length - pos)
            pos += os.pwrite(fd, zero[:n], offset + pos)
    except OSError as exc:
        raise disk_error("write zeroes", exc) from exc


def file_extents(fd: int, offset: int, length: int, size: int) -> list[Extent]:
    """Allocation of ``offset..offset+length`` via SEEK_DATA/SEEK_HOLE.

    Holes are reported HOLE|ZERO; data as 0.  Falls back to one data extent
    when the filesystem cannot tell.
    """
    end = min(size, offset + length)
    out: list[Extent] = []
    pos = offset
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: hole to EOF
                    data = size
                else:
                    raise
            if data > pos:
                out.append((min(data, end) - pos, STATE_HOLE | STATE_ZERO))
                pos = data
                if pos >= end:
                    break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            hole = min(hole, size)
            out.append((min(hole, end) - pos, 0))
            pos = hole
    except OSError:
        return [(end - offset, 0)]
    return coalesce(out)
