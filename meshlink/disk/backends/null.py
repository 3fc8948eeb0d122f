"""``null``: reads return zeroes, writes are accepted and dropped.

Useful as a sink (``nbdcopy src nbd://.../null``) and to measure the front end
alone.  Every operation is a deliberate no-op; nothing is ever stored.
"""

from __future__ import annotations

from ._base import STATE_HOLE, STATE_ZERO, Buffer, Capabilities, Extent, Geometry, check_size

_ZERO_PAGE = bytes(1 << 20)


class NullBackend(Geometry):
    """A disk of ``size`` bytes that stores nothing.

    Args:
        size: advertised size in bytes.
        read_only: refuse writes at the front end.

    Raises:
        LocalProtocolError: ``size`` is not a whole number of 512-byte sectors
            in ``0..2**63-1``.
    """

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        self._size = check_size(size)
        self._read_only = read_only
        self._zero = memoryview(_ZERO_PAGE)

    @property
    def capabilities(self) -> Capabilities:
        # Nothing is volatile, so flush/FUA are honest no-ops; zeroing is free.
        # stores_nothing: a front end may answer every request without us.
        return Capabilities(can_cache=True, stores_nothing=True)

    def read(self, offset: int, length: int) -> Buffer:
        if length <= len(self._zero):
            return self._zero[:length]  # read-only view of one shared zero page
        return bytes(length)

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        pass  # deliberate: data is dropped

    def flush(self) -> None:
        pass  # deliberate: nothing to persist

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        pass  # deliberate: already reads as zeroes

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        pass  # deliberate: already reads as zeroes (and that is fast)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [(self._size - offset, STATE_HOLE | STATE_ZERO)]

    def cache(self, offset: int, length: int) -> None:
        pass  # deliberate: nothing to prefetch

    def close(self) -> None:
        pass
