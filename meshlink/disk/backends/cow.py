"""``cow``: a copy-on-write filter over a read-only lower disk (a "gold image").

Theory of operation
-------------------
The export is cut into blocks of ``block_size`` bytes (the last one may be
short).  Each block is in one of three states, kept in one dict:

* absent  - reads come from the lower backend, which is never written;
* ZEROED  - the block reads as zeroes (after discard / write_zeroes);
* DATA    - the block's bytes live in the overlay: in RAM (a bytearray) or,
  with ``overlay_path``, at the same offset of a sparse overlay file.

A write covering a whole block stores it directly; a partial write reads the
block's current contents (overlay, zeroes or lower), patches it and stores it
(read-modify-write).  One lock serialises modifying calls, because two
partial writes to different halves of one block would otherwise both start
from the old block and one would lose the other's bytes.  Reads take no lock.

The overlay is scratch space: it lives as long as this object and is not
meant to be reopened (which blocks it holds is known only in RAM).  Flush
therefore only fsyncs the overlay file when there is one; it never touches
the lower layer.

The overlay file is checked before anything is written to it: it must be a
regular file, must not be the gold image (or any file under it) by another
name -- a symlink or hard link reaching the same inode -- and an existing,
non-empty one is never truncated unless ``reset=True`` asks for it, because
it may be somebody's data.
"""

from __future__ import annotations

import os
import stat
import threading

from ...errors import LocalProtocolError
from ._base import (
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    Buffer,
    Capabilities,
    Extent,
    check_size,
    coalesce,
)
from ._fileops import disk_error

_ZEROED = 0  # state marker: the block reads as zeroes
_IN_FILE = 1  # state marker: the block's data is in the overlay file


class CowBackend:
    """Copy-on-write over ``lower``, which is only ever read.

    Args:
        lower: the gold image (any backend; it is not written, flushed or trimmed).
        overlay_path: optional file to hold written blocks instead of RAM; it is
            created if missing.  An existing empty file is used as is.
        block_size: overlay granularity (power of two, 512..1 MiB).
        read_only: refuse writes at the front end too (not with ``overlay_path``,
            which would then never be written).
        reset: allow an existing, non-empty ``overlay_path`` to be truncated
            (its contents are lost); it is refused otherwise.

    Raises:
        LocalProtocolError: bad block size; ``lower`` has an invalid size;
            ``overlay_path`` is the gold image (or a link to it), not a regular
            file, or an existing non-empty file without ``reset``; ``reset`` or
            ``read_only`` given with no use.
        DiskError: the overlay file cannot be opened or sized.
    """

    def __init__(self, lower: Backend, *, overlay_path: str | os.PathLike[str] | None = None,
                 block_size: int = 4096, read_only: bool = False, reset: bool = False) -> None:
        if block_size < 512 or block_size > (1 << 20) or block_size & (block_size - 1):
            raise LocalProtocolError("block_size must be a power of two in 512..1 MiB")
        if overlay_path is None and reset:
            raise LocalProtocolError("reset only applies to an overlay file")
        if overlay_path is not None and read_only:
            raise LocalProtocolError("a read-only cow disk never writes its overlay file: "
                                     "give no overlay, or drop read-only")
        self._lower = lower
        self._bs = block_size
        self._size = check_size(lower.size, "the gold image's size")
        self._read_only = read_only
        self._blocks: dict[int, bytearray | int] = {}
        self._lock = threading.Lock()
        self._fd = -1
        if overlay_path is not None:
            self._fd = self._open_overlay(overlay_path, reset)

    def _open_overlay(self, path: str | os.PathLike[str], reset: bool) -> int:
        """Open, check, then size the overlay file; nothing is changed before the checks."""
        name = repr(os.fspath(path))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise disk_error(f"overlay {name}", exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LocalProtocolError(f"overlay {name} is not a regular file")
            for lower_fd in _lower_fds(self._lower):
                gold = os.fstat(lower_fd)
                if (gold.st_dev, gold.st_ino) == (st.st_dev, st.st_ino):
                    raise LocalProtocolError(
                        f"overlay {name} is the gold image itself (same file by another "
                        f"name or link); writes would change the image")
            if st.st_size and not reset:
                what = ("is not the gold image's size" if st.st_size != self._size
                        else "already holds data")
                raise LocalProtocolError(
                    f"overlay {name} {what} ({st.st_size} bytes; the image has "
                    f"{self._size}); its blocks cannot be reused, so pass reset=True / "
                    f"--overlay-reset to discard them, or choose another file")
            if st.st_size:
                os.ftruncate(fd, 0)  # reset: drop the old blocks, not just the length
            os.ftruncate(fd, self._size)
        except OSError as exc:
            os.close(fd)
            raise disk_error(f"overlay {name}", exc) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def size(self) -> int:
        return self._size

    @property
    def sector_size(self) -> int:
        return max(512, self._lower.sector_size)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def capabilities(self) -> Capabilities:
        # Zeroing only marks blocks (partial edges aside), so FAST_ZERO is honest.
        return Capabilities(can_cache=False, can_multi_conn=True, blocking=True)

    @property
    def lower(self) -> Backend:
        """The wrapped read-only backend."""
        return self._lower

    # --- block helpers -------------------------------------------------------

    def _block_len(self, index: int) -> int:
        return min(self._bs, self._size - index * self._bs)

    def _read_block(self, index: int) -> bytes | bytearray | memoryview:
        """Current contents of one whole block (may alias storage)."""
        state = self._blocks.get(index)
        n = self._block_len(index)
        if state is None:
            return self._lower.read(index * self._bs, n)
        if isinstance(state, bytearray):
            return state
        if state == _ZEROED:
            return bytes(n)
        try:
            return os.pread(self._fd, n, index * self._bs)
        except OSError as exc:
            raise disk_error("overlay read", exc) from exc

    def _store(self, index: int, data: Buffer) -> None:
        if self._fd >= 0:
            try:
                os.pwrite(self._fd, data, index * self._bs)
            except OSError as exc:
                raise disk_error("overlay write", exc) from exc
            self._blocks[index] = _IN_FILE
        else:
            self._blocks[index] = bytearray(data)

    # --- Backend -------------------------------------------------------------

    def read(self, offset: int, length: int) -> Buffer:
        bs = self._bs
        out = bytearray(length)
        view = memoryview(out)
        pos = 0
        while pos < length:
            index, start = divmod(offset + pos, bs)
            state = self._blocks.get(index)
            if state is None:
                # Gather the whole run of lower blocks into one lower read.
                run_end = index + 1
                limit = (offset + length - 1) // bs
                while run_end <= limit and run_end not in self._blocks:
                    run_end += 1
                n = min(run_end * bs, offset + length) - (offset + pos)
                view[pos : pos + n] = memoryview(self._lower.read(offset + pos, n)).cast("B")
            else:
                n = min(bs - start, length - pos)
                if isinstance(state, bytearray) or state == _IN_FILE:
                    block = memoryview(self._read_block(index)).cast("B")
                    view[pos : pos + n] = block[start : start + n]
                # _ZEROED: out is already zero there
            pos += n
        return out

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        src = memoryview(data).cast("B")
        with self._lock:
            self._apply(offset, len(src), src)
        if fua:
            self.flush()

    def _apply(self, offset: int, length: int, src: memoryview | None) -> None:
        """Write ``src`` (or zeroes when None) over the range; caller holds the lock."""
        bs = self._bs
        pos = 0
        while pos < length:
            index, start = divmod(offset + pos, bs)
            blen = self._block_len(index)
            n = min(blen - start, length - pos)
            if start == 0 and n == blen:
                if src is None:
                    self._blocks[index] = _ZEROED
                else:
                    self._store(index, src[pos : pos + n])
            else:
                block = bytearray(self._read_block(index))
                block[start : start + n] = bytes(n) if src is None else src[pos : pos + n]
                self._store(index, block)
            pos += n

    def flush(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise disk_error("overlay flush", exc) from exc
        # deliberate: the lower layer is never flushed, it is never written

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        self.write_zeroes(offset, length, fua=fua)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        # Whole blocks become ZEROED markers; partial edges are read-modify-write,
        # which is still cheaper than the client sending the zeroes.
        with self._lock:
            self._apply(offset, length, None)
        if fua:
            self.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        bs = self._bs
        end = min(self._size, offset + length)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            index = pos // bs
            state = self._blocks.get(index)
            if state is None:
                run_end = index + 1
                limit = (end - 1) // bs
                while run_end <= limit and run_end not in self._blocks:
                    run_end += 1
                stop = min(run_end * bs, end)
                covered = pos
                for elen, flags in self._lower.extents(pos, stop - pos):
                    elen = min(elen, stop - covered)
                    if elen <= 0:
                        break
                    out.append((elen, flags))
                    covered += elen
                if covered < stop:  # lower reported less: say "data" for the rest
                    out.append((stop - covered, 0))
            else:
                stop = min((index + 1) * bs, end)
                out.append((stop - pos, 0 if isinstance(state, bytearray) or state == _IN_FILE
                            else STATE_HOLE | STATE_ZERO))
            pos = stop
        return coalesce(out)

    def cache(self, offset: int, length: int) -> None:
        pass  # deliberate: nothing to prefetch in the overlay

    def close(self) -> None:
        self._blocks.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _lower_fds(backend: Backend) -> list[int]:
    """The open files under ``backend`` (through stacked cow layers), to compare inodes."""
    out: list[int] = []
    while True:
        fileno = getattr(backend, "fileno", None)
        if callable(fileno):
            out.append(fileno())
        if not isinstance(backend, CowBackend):
            return out
        if backend._fd >= 0:
            out.append(backend._fd)
        backend = backend.lower
