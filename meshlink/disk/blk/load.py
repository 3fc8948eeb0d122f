"""A native load generator for an open blk disk: fio's role, for the blk ring.

Owns :func:`run_load`, which hands an open :class:`~.front.BlkDisk`'s ring
to the C loop in ``native/blkring_drive.c`` for a fixed time: it keeps
``queue_depth`` READ or WRITE requests in flight and copies each request's
data between the ring's pages and a private buffer, as a disk's user would.

Why: the blk benchmark compares the ring against nbdkit driven by fio, a C
client.  Driven from Python (:meth:`BlkDisk.read` in trio tasks), the
client's own cost per request is larger than the server's, so 4 KiB figures
measured the client; with this loop they measure the ring and the server.
The server does exactly what it does for any frontend.

It is a measuring tool, not an I/O path: it blocks the calling thread (the
disk's trio thread, so nothing else can use the disk meanwhile) for the
run's duration, and needs every ring slot free.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os

from ..._native import ffi, lib
from ...errors import ConnectionLost, LocalProtocolError, RingCorruptError
from .front import SLOT_PAGES, BlkDisk
from .ring import PAGE

__all__ = ["LoadResult", "run_load"]

#: Poll the ring this long before sleeping, as the Python pump does (handshake.SPIN_SECONDS).
_SPIN_NS = 50_000
#: No response for this long: the server is stuck; fail rather than hang.
_STALL_NS = 5_000_000_000


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What one :func:`run_load` did.

    Attributes:
        requests: requests answered OKAY.
        errors: requests answered with an error status.
        seconds: from the first request to the last response.
        block_size: bytes per request.
        sleeps: times the client slept on its doorbell (it polls first).
    """

    requests: int
    errors: int
    seconds: float
    block_size: int
    sleeps: int

    @property
    def iops(self) -> float:
        """Requests answered OKAY per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mib_per_s(self) -> float:
        """Data moved by the requests answered OKAY, MiB per second."""
        return self.iops * self.block_size / (1 << 20)


def run_load(disk: BlkDisk, *, write: bool, block_size: int, queue_depth: int,
             seconds: float, random_offsets: bool, span: int | None = None,
             seed: int = 1, buffer: bytearray | None = None) -> LoadResult:
    """Keep ``queue_depth`` requests in flight on ``disk`` for ``seconds``.

    Args:
        disk: an open disk with no request in flight.
        write: WRITEs of a random pattern (else READs, copied out of the ring).
        block_size: bytes per request, a multiple of 512, at most one ring
            slot's data (1 MiB with indirect requests, else 44 KiB).
        queue_depth: requests in flight, at most ``disk.ring_entries``.
        seconds: how long to keep submitting; the call returns once the last
            requests are answered.
        random_offsets: uniformly random block-aligned offsets (else sequential,
            wrapping at the end of the span).
        span: bytes of the disk covered from offset 0 (default: the whole disk).
        seed: for random offsets.
        buffer: the client's memory, ``queue_depth * block_size`` bytes, the
            ``block_size`` bytes at ``i * block_size`` belonging to ring id
            ``i``: what writes send, where reads land (default: a fresh
            buffer of random bytes).  Sequential runs hand out offsets in
            ring-id order first, so ``seconds=0`` with a span of
            ``queue_depth`` blocks moves ``buffer`` to or from the span's start.

    Returns:
        The counts and the elapsed time (:class:`LoadResult`).

    Raises:
        LocalProtocolError: bad parameters, a read-only disk for writes, or
            requests already in flight on ``disk``.
        ConnectionLost: the server died or stopped answering (the disk is
            unusable afterwards).
        RingCorruptError: the server published impossible responses (likewise).
        trio.ClosedResourceError: the disk is closed.

    Blocks the calling thread for about ``seconds`` (no cancellation), so
    the server must run in another thread or process: with ``seconds=0`` it
    still sends one request per ring id in flight.
    """
    disk._check()
    span = disk.size if span is None else span
    if write and disk.read_only:
        raise LocalProtocolError("disk is read-only")
    if not 0 < block_size <= disk._chunk or block_size % 512 or not block_size <= span <= disk.size:
        raise LocalProtocolError(f"bad block size {block_size} or span {span}")
    if not 0 < queue_depth <= disk.ring_entries or not seconds >= 0:
        raise LocalProtocolError(f"bad queue depth {queue_depth} or duration {seconds}")
    if disk._inflight or len(disk._free) != disk.ring_entries:
        raise LocalProtocolError("run_load needs a disk with no request in flight")
    ring = disk._ring
    bell = disk._bell
    live = bell._sock.fileno() if bell._sock is not None else -1
    if buffer is None:
        buffer = bytearray(os.urandom(queue_depth * block_size))  # touched: no faults in the run
    elif len(buffer) < queue_depth * block_size:
        raise LocalProtocolError("run_load: buffer smaller than queue_depth * block_size")
    buf = buffer
    d = ffi.new("struct ml_blk_drive *")
    d.op = lib.ML_BLK_OP_WRITE if write else lib.ML_BLK_OP_READ
    d.random = 1 if random_offsets else 0
    d.block = block_size
    d.qd = queue_depth
    d.span = span
    d.seed = seed
    d.duration_ns = int(seconds * 1e9)
    d.spin_ns = _SPIN_NS
    d.stall_ns = _STALL_NS
    memory = ring.memory
    rc = lib.ml_blk_front_drive(
        ring.ptr, ffi.from_buffer(memory), len(memory), disk._pool // PAGE, disk._slot_pages,
        SLOT_PAGES if disk._indirect else 0, bell.own_fd, bell.peer_fd, live,
        ffi.from_buffer(buf), len(buf), d)
    # The disk's response pump sleeps on this eventfd, with the response event
    # it armed before the run, which the loop has since moved past: wake it,
    # so it re-arms the event before the disk's next request needs it.
    os.eventfd_write(bell.own_fd, 1)
    if rc == lib.ML_EINVAL:
        raise LocalProtocolError("run_load: parameters the ring cannot carry")
    if rc != lib.ML_OK:
        # Requests may still be in flight that the disk's own state does not
        # know about: the disk cannot be used any more.
        exc: Exception
        if rc == lib.ML_ECORRUPT:
            exc = RingCorruptError("blk server answered a request that was not in flight")
        else:
            err = ffi.errno
            why = "went away" if err == _errno.EPIPE else f"stopped answering ({os.strerror(err)})"
            exc = ConnectionLost(f"blk disk server {why}")
        disk._broken = exc
        raise exc
    return LoadResult(int(d.requests), int(d.errors), d.elapsed_ns / 1e9, block_size,
                      int(d.sleeps))
