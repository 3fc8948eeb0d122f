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
meant to be reopened.  Flush therefore only fsyncs the overlay file when there
is one; it never touches the lower layer.
"""

from __future__ import annotations

import os
import threading

from ._base import STATE_HOLE, STATE_ZERO, Backend, Buffer, Capabilities, Extent, coalesce
from ._fileops import disk_error

_ZEROED = 0  # state marker: the block reads as zeroes
_IN_FILE = 1  # state marker: the block's data is in the overlay file


class CowBackend:
    """Copy-on-write over ``lower``, which is only ever read.

    Args:
        lower: the gold image (any backend; it is not written, flushed or trimmed).
        overlay_path: optional file to hold written blocks instead of RAM; it is
            created or truncated.
        block_size: overlay granularity (power of two, 512..1 MiB).
        read_only: refuse writes at the front end too.

    Raises:
        ValueError: bad block size.
        DiskError: the overlay file cannot be created.
    """

    def __init__(self, lower: Backend, *, overlay_path: str | os.PathLike[str] | None = None,
                 block_size: int = 4096, read_only: bool = False) -> None:
        if block_size < 512 or block_size > (1 << 20) or block_size & (block_size - 1):
            raise ValueError("block_size must be a power of two in 512..1 MiB")
        self._lower = lower
        self._bs = block_size
        self._size = lower.size
        self._read_only = read_only
        self._blocks: dict[int, bytearray | int] = {}
        self._lock = threading.Lock()
        self._fd = -1
        if overlay_path is not None:
            try:
                self._fd = os.open(overlay_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC
                                   | os.O_CLOEXEC, 0o600)
                os.ftruncate(self._fd, self._size)
            except OSError as exc:
                raise disk_error(f"overlay {os.fspath(overlay_path)!r}", exc) from exc

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
