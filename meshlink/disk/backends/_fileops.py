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
import stat

from ...errors import DiskError, LocalProtocolError
from ._base import STATE_HOLE, STATE_ZERO, Extent, check_image_size, check_size, coalesce

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


def open_image(path: str | os.PathLike[str], *, read_only: bool, size: int | None,
               shrink: bool) -> tuple[int, int, bool]:
    """Open the image of a ``file``/``mmap`` disk, creating or resizing it as asked.

    Every argument is checked before the file is touched, so a refusal leaves
    it exactly as it was.  A regular file is created when missing (``size``
    given), grown to ``size``, and shrunk to it only with ``shrink``; a block
    device's size is fixed, so ``size`` must equal it.  With no ``size`` the
    file's own size is used and must be whole sectors.

    Returns:
        ``(fd, size, regular)``: the open descriptor (the caller owns it), the
        disk size, and whether it is a regular file.

    Raises:
        LocalProtocolError: ``size`` is not a valid disk size, is given with
            ``read_only`` (it would be ignored), is smaller than the file
            without ``shrink``, or ``shrink`` is given without ``size``.
        DiskError: the file cannot be opened or resized, or its own size is
            not whole sectors or too big.
    """
    name = repr(os.fspath(path))
    if size is not None:
        check_size(size)
        if read_only:
            raise LocalProtocolError("a size creates or resizes the image, which a read-only "
                                     "disk never does: give one or the other")
    elif shrink:
        raise LocalProtocolError("shrink only applies together with a (smaller) size")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if size is not None:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise disk_error(f"open {name}", exc) from exc
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        current = st.st_size if regular else os.lseek(fd, 0, os.SEEK_END)
        if size is None:
            return fd, check_image_size(current, f"image {name}"), regular
        if not regular and size != current:
            raise LocalProtocolError(f"{name} is a device of {current} bytes; its size "
                                     f"cannot be set to {size}")
        if size < current and not shrink:
            raise LocalProtocolError(
                f"{name} holds {current} bytes; a size of {size} would cut off its end "
                f"(pass shrink=True / --shrink to do that on purpose)")
        if size != current:
            os.ftruncate(fd, size)
        return fd, size, regular
    except OSError as exc:
        os.close(fd)
        raise disk_error(f"open {name}", exc) from exc
    except BaseException:
        os.close(fd)
        raise
