"""The one interface every disk backend implements, and the few helpers they share.

Theory of operation
-------------------
A backend is a plain synchronous object: a byte range of fixed ``size`` with
``read``/``write``/``flush``/``discard``/``write_zeroes``/``extents``/``cache``.
Front ends (the NBD server, later the blk ring) translate wire requests into
these calls and advertise *only* what :attr:`Backend.capabilities` declares, so
a backend may assume that a flag it never declared never reaches it (for
example ``fua=True`` on a backend with ``can_fua=False``).

Front ends validate ranges before calling: ``0 <= offset`` and
``offset + length <= size`` hold on every call, and writes never reach a
read-only backend.  Backends still raise :class:`meshlink.DiskError` (carrying
an errno that becomes the wire error) when the medium fails.

Threading: the NBD server runs each connection's transmission loop in its own
worker thread, so a backend must tolerate calls from several threads at once
for *non-overlapping* ranges.  Overlapping concurrent requests have no defined
result in NBD either, so backends need not order them.

Aliasing: :meth:`Backend.read` may return a view of the backend's own memory
(zero-copy).  Such a view is valid until the next modifying call on that range;
callers that queue replies must send them before issuing the next write.

Optional extension: a backend may also define
``read_vectored(offset, length) -> list[Buffer]`` returning views whose
concatenation is the data (same aliasing rule).  Front ends use it, when
present, for large reads so the bytes go from backend memory to the socket
with one kernel copy.  Likewise ``write_views(offset, length) -> list[memoryview]``
returns writable views of the storage itself; a front end receives large
WRITE payloads straight into them (then calls ``flush`` if FUA was asked).

Sizes: every backend's size is a whole number of 512-byte sectors and at
most ``2**63 - 1`` bytes (the largest ``off_t``; NBD's 64-bit size and the blk
ring's sector count both hold it).  :func:`check_size` refuses anything else a
caller passes (:class:`meshlink.LocalProtocolError`) and
:func:`check_image_size` anything else found on disk (:class:`meshlink.DiskError`),
so no front end ever sees a partial last sector or a size that overflows.

Declared capabilities for native front ends: a front end that can serve a
disk without calling Python per request (the blk ring's native loop) asks the
backend, through :class:`Capabilities`, whether it may.  ``stores_nothing``
says reads are zeroes and writes vanish (the null disk), so nothing need be
called at all; ``direct_memory`` says the backend implements
:class:`DirectMemory` and its ``direct_buffer()`` may hand out the disk as one
writable buffer.  A sparse such backend may also define ``write_map() ->
memoryview | None``: one byte per 64 KiB of disk, which a front end that
stores into the direct buffer sets to 1 for every chunk it writes (the
``memory`` disk's extents come from it).  Front ends never look at a
backend's class or private fields.
"""

from __future__ import annotations

import errno
from typing import NamedTuple, Protocol, TypeAlias, runtime_checkable

from ...errors import DiskError, LocalProtocolError

#: Every disk size is a whole number of these.
SECTOR = 512
#: The largest disk size: the largest ``off_t`` (pread/pwrite offsets are signed 64-bit).
MAX_SIZE = (1 << 63) - 1

#: What ``read`` returns and ``write`` accepts (``collections.abc.Buffer`` needs 3.12).
Buffer: TypeAlias = bytes | bytearray | memoryview

#: ``extents`` flag: the range is not allocated (NBD ``NBD_STATE_HOLE``).
STATE_HOLE = 1
#: ``extents`` flag: the range reads as zeroes (NBD ``NBD_STATE_ZERO``).
STATE_ZERO = 2

#: One extent: ``(length, flags)`` with flags from :data:`STATE_HOLE` / :data:`STATE_ZERO`.
Extent = tuple[int, int]


class Capabilities(NamedTuple):
    """What a backend can do; the front end advertises exactly this and nothing more.

    Attributes:
        can_flush: ``flush`` persists data (otherwise it is a deliberate no-op).
        can_fua: writes honour ``fua=True`` (persisted before returning).
        can_trim: ``discard`` may free space.
        can_zero: ``write_zeroes`` is implemented better than writing a buffer.
        can_fast_zero: ``write_zeroes(fast=True)`` either succeeds quickly or
            raises ``DiskError(errno=ENOTSUP)`` without touching data.
        can_multi_conn: several connections sharing this object see each
            other's flushed writes (true when all share one process's object).
        can_cache: ``cache`` does something (prefetch); otherwise a no-op.
        can_extents: ``extents`` reports real allocation (otherwise one data extent).
        blocking: calls may block on I/O (disk, page faults); an async front
            end should run them in a worker thread rather than inline.
        stores_nothing: reads return zeroes and writes, discards and flushes
            change nothing, so a front end may answer every request itself
            without calling the backend.
        direct_memory: the backend implements :class:`DirectMemory`; its
            ``direct_buffer()`` may return the whole disk as one writable buffer.
    """

    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_multi_conn: bool = True
    can_cache: bool = False
    can_extents: bool = True
    blocking: bool = False
    stores_nothing: bool = False
    direct_memory: bool = False


@runtime_checkable
class Backend(Protocol):
    """A fixed-size random-access byte store (see the module docstring for the contract)."""

    @property
    def size(self) -> int:
        """Size in bytes; constant for the backend's lifetime."""
        ...

    @property
    def sector_size(self) -> int:
        """Smallest efficient I/O unit (a power of two, 1..65536); advisory."""
        ...

    @property
    def read_only(self) -> bool:
        """True when writes, discards and zeroing are refused."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """The declared capabilities."""
        ...

    def read(self, offset: int, length: int) -> Buffer:
        """Return exactly ``length`` bytes starting at ``offset``.

        The result may alias backend memory (see module docstring).

        Raises:
            DiskError: the medium failed.
        """
        ...

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        """Write all of ``data`` at ``offset``; with ``fua`` persist before returning.

        Raises:
            DiskError: the medium failed (ENOSPC, EIO...).
        """
        ...

    def flush(self) -> None:
        """Persist every write that has returned so far.

        Raises:
            DiskError: the medium failed.
        """
        ...

    def discard(self, offset: int, length: int, fua: bool = False) -> None:
        """Hint that the range is no longer needed; it reads back as zeroes afterwards.

        Raises:
            DiskError: the medium failed.
        """
        ...

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Make the range read as zeroes.

        Args:
            offset: first byte.
            length: number of bytes.
            may_trim: the range may be deallocated (NBD: NO_HOLE was *not* set).
            fast: fail with ENOTSUP unless this is faster than writing zeroes.
            fua: persist before returning.

        Raises:
            DiskError: ENOTSUP for a ``fast`` request that would be slow, or
                the medium failed.
        """
        ...

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Describe allocation from ``offset``: consecutive ``(length, flags)`` pairs.

        The lengths are non-zero and sum to at least 1 byte and at most
        ``size - offset``; they may cover less than ``length`` (the caller asks again).

        Raises:
            DiskError: the medium failed.
        """
        ...

    def cache(self, offset: int, length: int) -> None:
        """Prefetch hint; a no-op unless ``can_cache``."""
        ...

    def close(self) -> None:
        """Release resources.  Idempotent."""
        ...


class Geometry:
    """Size, sector size and read-only flag, kept the way the built-in backends keep them.

    A convenience base for the backends of this package (a backend of your own
    needs only the :class:`Backend` protocol): set ``_size`` and ``_read_only``
    in ``__init__``; sectors are 512 bytes.
    """

    _size: int
    _read_only: bool

    @property
    def size(self) -> int:
        return self._size

    @property
    def sector_size(self) -> int:
        return 512

    @property
    def read_only(self) -> bool:
        return self._read_only


@runtime_checkable
class DirectMemory(Backend, Protocol):
    """A backend whose data is one buffer in this process (declared by ``direct_memory``)."""

    def direct_buffer(self) -> memoryview | None:
        """The whole disk as one writable, contiguous byte buffer, or None.

        Bytes stored into it *are* writes and reading it *is* a read, so a
        front end may copy requests' data to and from it directly.  None when
        the backend cannot offer that now (read-only, empty); the front end
        then calls the ordinary methods.  The view stays valid until ``close``.
        """
        ...


def direct_buffer(backend: Backend) -> memoryview | None:
    """Ask ``backend`` for its memory as one buffer, if it declares it can (else None)."""
    if not backend.capabilities.direct_memory:
        return None
    assert isinstance(backend, DirectMemory), "direct_memory declared without direct_buffer"
    return backend.direct_buffer()


def _size_problem(size: object) -> str | None:
    """Why ``size`` is not a valid disk size, or None when it is."""
    if not isinstance(size, int) or isinstance(size, bool):
        return f"must be an integer number of bytes, not {type(size).__name__}"
    if size < 0:
        return f"must not be negative (got {size})"
    if size > MAX_SIZE:
        return f"{size} bytes is over the largest disk size, 2**63-1 bytes"
    if size % SECTOR:
        return (f"{size} bytes is not a whole number of {SECTOR}-byte sectors "
                f"(round up to {-(-size // SECTOR) * SECTOR})")
    return None


def check_size(size: object, what: str = "size") -> int:
    """Return ``size`` if it is a valid disk size a caller asked for.

    Raises:
        LocalProtocolError: not an int in ``0..2**63-1`` that is a multiple of 512.
    """
    problem = _size_problem(size)
    if problem is not None:
        raise LocalProtocolError(f"{what} {problem}")
    assert isinstance(size, int)
    return size


def check_image_size(size: int, what: str) -> int:
    """Return ``size`` if the image ``what`` found on disk has a valid disk size.

    Raises:
        DiskError: (EINVAL) the file is not a whole number of sectors, or too big.
    """
    problem = _size_problem(size)
    if problem is not None:
        hint = ("; give a size to grow it to whole sectors"
                if 0 < size <= MAX_SIZE and size % SECTOR else "")
        raise DiskError(f"{what}: {problem}{hint}", errno.EINVAL)
    return size


def check_range(size: int, offset: int, length: int) -> None:
    """Assert a front end honoured the range contract (cheap, for backends' own use).

    Raises:
        ValueError: ``offset``/``length`` fall outside ``0..size``.
    """
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} outside 0..{size}")


def coalesce(extents: list[Extent]) -> list[Extent]:
    """Merge neighbouring extents with equal flags (pure helper).

    Returns:
        A new list with no two consecutive entries sharing flags.
    """
    out: list[Extent] = []
    for length, flags in extents:
        if length <= 0:
            continue
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


def is_zero(data: Buffer) -> bool:
    """True when every byte of ``data`` is zero (compared in C, 64 KiB at a time)."""
    mv = memoryview(data).cast("B")
    step = 1 << 16
    zeros = bytes(min(step, len(mv)))
    for start in range(0, len(mv), step):
        part = mv[start : start + step]
        if part != zeros[: len(part)]:
            return False
    return True
