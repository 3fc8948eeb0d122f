"""Thin, typed wrapper over the native vchan ring (``native/vchan_ring.c``).

Turns the C error codes into exceptions and owns the lifetime of the native
object.  No waiting happens here: every method returns at once.
"""

from __future__ import annotations

import os
from typing import Any

from ..._native import ffi, lib
from ...errors import LocalProtocolError, RingCorruptError, TransportError

__all__ = ["VchanRing", "choose_orders"]

# Buffers passed to C: anything supporting the buffer protocol.
Buffer = bytes | bytearray | memoryview


def _check(rc: int, what: str) -> int:
    if rc >= 0:
        return rc
    if rc == lib.ML_ECORRUPT:
        raise RingCorruptError(f"vchan {what}: peer corrupted the shared ring")
    if rc == lib.ML_ETOOBIG:
        raise LocalProtocolError(f"vchan {what}: packet larger than the ring")
    if rc == lib.ML_EINVAL:
        raise LocalProtocolError(f"vchan {what}: invalid argument")
    if rc == lib.ML_ECLOSED:
        raise TransportError(f"vchan {what}: channel already closed")
    if rc == lib.ML_ENOMEM:
        raise MemoryError(f"vchan {what}")
    err = ffi.errno
    raise TransportError(f"vchan {what}: {os.strerror(err)}")


def choose_orders(read_min: int, write_min: int) -> tuple[int, int]:
    """The server's (left, right) ring orders for requested minimum sizes.

    Same rule as libxenvchan's server: the smallest order that fits, moving
    rings of <= 1 KiB / 2 KiB into the control page when that saves pages.

    Raises:
        LocalProtocolError: a minimum above 1 MiB.
    """
    lo = ffi.new("int *")
    ro = ffi.new("int *")
    _check(lib.ml_vchan_choose_orders(read_min, write_min, lo, ro), "choose_orders")
    return int(lo[0]), int(ro[0])


class VchanRing:
    """One end of a vchan: the control page, two rings, and the peer's event.

    Use :meth:`server` or :meth:`client` to make one.  After :meth:`free` no
    other method may be called.
    """

    def __init__(self, ptr: Any) -> None:
        self._v = ptr
        self.read_size = int(lib.ml_vchan_read_size(ptr))
        self.write_size = int(lib.ml_vchan_write_size(ptr))
        self.left_order = int(lib.ml_vchan_left_order(ptr))
        self.right_order = int(lib.ml_vchan_right_order(ptr))
        self._base = lib.ml_vchan_read_base(ptr)
        self._off = ffi.new("size_t *")

    @classmethod
    def server(cls, left_order: int, right_order: int, own_evfd: int, peer_evfd: int) -> VchanRing:
        """Create a server end over a fresh sealed memfd (local provider)."""
        out = ffi.new("ml_vchan **")
        _check(lib.ml_local_server_new(left_order, right_order, own_evfd, peer_evfd, out),
               "server setup")
        return cls(out[0])

    @classmethod
    def client(cls, memfd: int, ctrl_ref: int, own_evfd: int, peer_evfd: int) -> VchanRing:
        """Map a server's memfd as the client end (validates the control page).

        Raises:
            RingCorruptError: the server's page or memfd is not acceptable.
        """
        out = ffi.new("ml_vchan **")
        _check(lib.ml_local_client_new(memfd, ctrl_ref, own_evfd, peer_evfd, out),
               "client setup")
        return cls(out[0])

    @property
    def memfd(self) -> int:
        """The memfd holding the pages (server end), else -1."""
        return int(lib.ml_local_memfd(self._v))

    # The hot calls test the C result inline and call _check only for an
    # error: a Python call less on every ring operation.

    def read_into(self, buf: bytearray | memoryview) -> int:
        """Copy up to ``len(buf)`` bytes out; 0 means the ring is empty."""
        rc: int = lib.ml_vchan_read(self._v, ffi.from_buffer(buf), len(buf))
        return rc if rc >= 0 else _check(rc, "read")

    def write(self, data: Buffer) -> int:
        """Copy as much of ``data`` in as fits; 0 means the ring is full."""
        rc: int = lib.ml_vchan_write(self._v, ffi.from_buffer(data), len(data))
        return rc if rc >= 0 else _check(rc, "write")

    def read_bytes(self, max_bytes: int) -> bytes:
        """Copy up to ``max_bytes`` contiguous readable bytes out as ``bytes``.

        One copy, no zero-filled buffer; returns ``b""`` if the ring is empty.
        A read that would cross the ring's end stops there (call again).
        """
        avail: int = lib.ml_vchan_peek(self._v, self._off)
        if avail <= 0:
            if avail < 0:
                _check(avail, "peek")  # raises
            return b""
        n = min(avail, max_bytes)
        data: bytes = ffi.buffer(self._base + self._off[0], n)[:]
        rc = lib.ml_vchan_consume(self._v, n)
        if rc < 0:
            _check(rc, "consume")
        return data

    def read_wait(self, buf: Any, n: int, wait_fd: int, ack_fd: int, spin_ns: int,
                  timeout_ms: int) -> int:
        """A reader's whole wait, in C (``ml_vchan_read_wait``): for a thread
        that owns this end alone.

        Args:
            buf: a cffi buffer of at least ``n`` bytes.
            wait_fd: the doorbell's fd to poll; ``ack_fd``: the eventfd it
                reads to acknowledge a signal.
            spin_ns: how long to poll the ring before sleeping.
            timeout_ms: how long to sleep at most (< 0: no limit).

        Returns:
            The bytes copied into ``buf`` (> 0); 0 when there is nothing to
            read but something to look at (the peer's live byte, its
            liveness socket); ``lib.ML_ETIMEDOUT``.
        """
        rc: int = lib.ml_vchan_read_wait(self._v, buf, n, wait_fd, ack_fd, spin_ns, timeout_ms)
        return rc if rc >= 0 or rc == lib.ML_ETIMEDOUT else _check(rc, "read_wait")

    def write_wait(self, data: bytes, buf: Any, n: int, wait_fd: int, ack_fd: int,
                   spin_ns: int, timeout_ms: int) -> int:
        """Write all of ``data`` (a whole message), then :meth:`read_wait`, in
        one C call (``ml_vchan_write_wait``).

        Returns:
            As :meth:`read_wait`, or ``lib.ML_ENOROOM`` when ``data`` did not
            fit in the ring: nothing was written.
        """
        rc: int = lib.ml_vchan_write_wait(self._v, data, len(data), buf, n, wait_fd, ack_fd,
                                          spin_ns, timeout_ms)
        if rc >= 0 or rc == lib.ML_ETIMEDOUT or rc == lib.ML_ENOROOM:
            return rc
        return _check(rc, "write_wait")

    def idle(self, live_fd: int) -> bool:
        """Nothing to read, the peer's live byte 1, and ``live_fd`` (its
        liveness socket, or -1) not at end of stream (``ml_vchan_idle``)."""
        rc: int = lib.ml_vchan_idle(self._v, live_fd)
        return rc == 1 if rc >= 0 else bool(_check(rc, "idle"))

    def send_whole(self, data: bytes) -> int:
        """Write all of ``data`` or nothing: ``len(data)``, or 0 when it does
        not fit now (or ever: more than the ring holds).  ``bytes`` only, so
        that cffi passes it without a buffer object."""
        rc: int = lib.ml_vchan_send(self._v, data, len(data))
        if rc >= 0:
            return rc
        return 0 if rc == lib.ML_ETOOBIG else _check(rc, "send")

    def recv_into(self, buf: bytearray | memoryview) -> int:
        """Packet mode: fill all of ``buf`` or nothing (returns 0)."""
        return _check(lib.ml_vchan_recv(self._v, ffi.from_buffer(buf), len(buf)), "recv")

    def send(self, data: Buffer) -> int:
        """Packet mode: write all of ``data`` or nothing (returns 0)."""
        return _check(lib.ml_vchan_send(self._v, ffi.from_buffer(data), len(data)), "send")

    def data_ready(self) -> int:
        rc: int = lib.ml_vchan_data_ready(self._v)
        return rc if rc >= 0 else _check(rc, "data_ready")

    def buffer_space(self) -> int:
        rc: int = lib.ml_vchan_buffer_space(self._v)
        return rc if rc >= 0 else _check(rc, "buffer_space")

    def arm_read(self) -> int:
        """Ask to be signalled on the peer's next write; returns data_ready."""
        rc: int = lib.ml_vchan_arm_read(self._v)
        return rc if rc >= 0 else _check(rc, "arm_read")

    def arm_write(self) -> int:
        """Ask to be signalled when the peer consumes; returns buffer_space."""
        rc: int = lib.ml_vchan_arm_write(self._v)
        return rc if rc >= 0 else _check(rc, "arm_write")

    def peer_live(self) -> int:
        """The peer's live byte: 0 exited, 1 connected, 2 not yet connected."""
        rc: int = lib.ml_vchan_peer_live(self._v)
        return rc if rc >= 0 else _check(rc, "peer_live")

    def close(self) -> None:
        """Clear our live byte and signal the peer (our write side is done)."""
        lib.ml_vchan_close(self._v)

    def free(self) -> None:
        """Unmap everything.  Idempotent."""
        if self._v is not None:
            lib.ml_vchan_free(self._v)
            self._v = None
