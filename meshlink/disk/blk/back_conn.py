"""One blk ring client as the server sees it: admission, the hello, the service loops.

Shared by the two blk servers: :func:`~.back.serve_blk` (trio) and the
trio-free :mod:`meshlink.disk.syncserve`.  The checks are the ones described
in :mod:`.back`: the uid before a byte is read (:func:`admit`), then the
hello and the ring's pages (:func:`check_hello`).  :class:`Conn` serves the
ring: natively when the backend allows (:meth:`Conn.serve_native`, a plain
call), else by a Python loop over the backend (async, on trio).  trio is
imported only by the async methods.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from ...errors import DiskError, HandshakeError
from ...transport.doorbell import Doorbell, spin
from ...transport.rendezvous import MAX_PENDING, encode, peer_credentials, refuse_now
from ..backends import Backend
from ..backends._base import direct_buffer
from ..backends.memory import CHUNK_SHIFT
from ..counters import DiskCounters, DiskStats
from .handshake import MAX_INDIRECT_SEGMENTS, PROTOCOL_VERSION, SPIN_SECONDS
from .ring import (
    OP_DISCARD,
    OP_FLUSH_DISKCACHE,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    SECTOR,
    BackRing,
)

__all__ = ["ACCEPT_RETRY", "Conn", "admit", "blk_native", "check_hello"]

log = logging.getLogger("meshlink.disk.blk")
#: accept() errors that mean "not now" (resources), not "stop serving".
ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def blk_native(backend: Backend) -> bool:
    """Whether :class:`Conn` will serve ``backend`` natively (the rule in its
    ``__init__``: it stores nothing, or lends its whole disk as one buffer)."""
    return backend.capabilities.stores_nothing or direct_buffer(backend) is not None


class Conn:
    """One frontend's ring as the server sees it."""

    def __init__(self, backend: Backend, ring: BackRing, bell: Doorbell,
                 stats: DiskStats, name: str, live: socket.socket | None = None) -> None:
        self.backend = backend
        self.ring = ring
        self.bell = bell
        self.live = live  # the rendezvous socket (the bell watches it too)
        self.stats = stats
        self.counters: DiskCounters = stats.open(name, "blk")
        self.checked = ring.new_checked()
        caps = backend.capabilities
        # The native loop serves the whole ring when the backend says it may:
        # it stores nothing (null), or it lends its whole disk as one buffer.
        self.native = False
        if caps.stores_nothing:
            ring.serve_natively(None)
            self.native = True
        else:
            disk = direct_buffer(backend)
            if disk is not None:
                ring.serve_natively(disk)
                # A sparse backend (memory) learns from this map which chunks
                # the C loop wrote; see MemoryBackend.write_map.
                write_map = getattr(backend, "write_map", None)
                chunk_map = write_map() if write_map is not None else None
                if chunk_map is not None:
                    ring.set_write_map(chunk_map, CHUNK_SHIFT)
                self.native = True
        if self.native:
            self.counters.native = ring  # the C loop counts kinds, bytes, errors
            # Large responses are signalled as soon as each is served, so the
            # client copies one while the loop copies the next.
            ring.set_notify_fd(bell.peer_fd)
        self.blocking = caps.blocking
        # The Backend protocol's optional zero-copy extensions (non-blocking
        # backends only: they hand out views of memory the loop copies into).
        self.read_vectored: Any = None if self.blocking else getattr(
            backend, "read_vectored", None)
        self.write_views: Any = None if self.blocking else getattr(
            backend, "write_views", None)

    def close(self) -> None:
        self.stats.close(self.counters)  # before the ring's C counters are freed
        self.ring.close()
        self.bell.close()

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self.blocking:
            import trio  # the native loop, all a trio-free server runs, never gets here

            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def _serve_one(self, c: Any) -> int:
        op = c.op
        b = self.backend
        offset, length = int(c.offset), int(c.length)
        try:
            if op == OP_READ:
                if self.read_vectored is not None:
                    return self._read_pieces(c)
                else:
                    data = await self._call(b.read, offset, length)
                    self.ring.scatter(c, data)
            elif op in (OP_WRITE, OP_WRITE_BARRIER):
                if op == OP_WRITE_BARRIER:
                    await self._call(b.flush)
                if length and self.write_views is not None:
                    pos = 0
                    for view in self.write_views(offset, length):
                        self.ring.copy_from(c, pos, view)
                        pos += len(view)
                elif length:
                    buf = bytearray(length)
                    self.ring.gather(c, buf)
                    await self._call(b.write, offset, buf)
                if op == OP_WRITE_BARRIER:
                    await self._call(b.flush)
            elif op == OP_FLUSH_DISKCACHE:
                await self._call(b.flush)
            elif op == OP_DISCARD:
                if not b.capabilities.can_trim:
                    return RSP_EOPNOTSUPP
                await self._call(b.discard, offset, length)
        except DiskError as exc:
            log.warning("blk request %d failed: %s", op, exc)
            return RSP_ERROR
        return RSP_OKAY

    def _read_pieces(self, c: Any) -> int:
        """A READ from a backend's own memory, piece by piece: one copy, no await."""
        try:
            pos = 0
            copy_to = self.ring.copy_to
            for piece in self.read_vectored(int(c.offset), int(c.length)):
                copy_to(c, pos, piece)
                pos += len(piece)
        except DiskError as exc:
            log.warning("blk read failed: %s", exc)
            return RSP_ERROR
        return RSP_OKAY

    async def _serve_available(self) -> int:
        """Serve every request published now; returns how many."""
        if self.native:
            return self.serve_native()
        ring = self.ring
        counts = self.counters
        served = 0
        c = self.checked
        while ring.get(c):
            t0 = time.monotonic_ns()
            status = int(c.status)
            op = c.op
            if status == RSP_OKAY:
                if op == OP_READ and self.read_vectored is not None:
                    status = self._read_pieces(c)  # the hot path, without a coroutine
                else:
                    status = await self._serve_one(c)
            ring.put(c, status)
            served += 1
            # Plain increments, as the C loop counts (kinds always, bytes when served).
            if op == OP_READ:
                counts.reads += 1
                if status == RSP_OKAY:
                    counts.bytes_read += int(c.length)
            elif op == OP_WRITE or op == OP_WRITE_BARRIER:
                counts.writes += 1
                if status == RSP_OKAY:
                    counts.bytes_written += int(c.length)
            elif op == OP_FLUSH_DISKCACHE:
                counts.flushes += 1
            elif op == OP_DISCARD:
                counts.discards += 1
            else:
                counts.other += 1
            if status != RSP_OKAY:
                counts.errors += 1
            counts.latency_ns_sum += time.monotonic_ns() - t0
            counts.latency_count += 1
        if served and ring.push():
            self.bell.ring()
        return served

    def serve_native(self) -> int:
        """Serve every request published now in C (only when :attr:`native`); how many.

        Raises:
            RingCorruptError: the frontend broke the ring's indices.
        """
        # The C loop counts everything, the batch's time included.
        n, notify = self.ring.serve_direct()
        if notify:
            self.bell.ring()
        return int(n)

    async def run(self) -> None:
        """Serve until the frontend goes away (trio: spins cooperatively, then sleeps)."""
        while True:
            if await self._serve_available():
                continue
            if await spin(self.ring.pending, SPIN_SECONDS):
                continue
            if self.ring.final_check():
                continue
            if self.bell.peer_dead:
                return
            await self.bell.wait()

    def run_native_blocking(self, stop_fd: int) -> None:
        """The whole service loop in C (``ml_blk_back_run``: serve, spin, arm
        and re-check, sleep in ``poll``), for a thread of its own, native rings
        with a rendezvous socket only; until the frontend goes away (its
        socket hangs up) or ``stop_fd`` is readable.

        Raises:
            RingCorruptError: the frontend broke the ring's indices.
        """
        assert self.native and self.live is not None, "the Python loop runs on trio"
        self.ring.run_native(self.bell.own_fd, self.bell.peer_fd, self.live.fileno(),
                             stop_fd, SPIN_SECONDS)


def check_hello(conn: socket.socket, hello: dict[str, object], fds: list[int],
                disks: Mapping[str, Backend], stats: DiskStats) -> Conn:
    """Check a frontend's hello and its descriptors; map its ring and answer it.

    Raises:
        HandshakeError: refused (the frontend was told why; ``fds`` are closed).
    """
    def refuse(why: str, code: str = "refused") -> NoReturn:
        for fd in fds:
            os.close(fd)
        refuse_now(conn, why, code)
        raise HandshakeError(why)

    if hello.get("meshlink") != "blk" or hello.get("version") != PROTOCOL_VERSION:
        refuse(f"unsupported blk hello (want version {PROTOCOL_VERSION})", "version")
    name = hello.get("disk")
    backend = disks.get(name) if isinstance(name, str) else None
    if backend is None:
        shown = name[:200] if isinstance(name, str) else name
        refuse(f"no disk named {shown!r} (have: {', '.join(sorted(disks))})", "nodisk")
    order = hello.get("ring_order")
    pool = hello.get("pool_pages")
    if (not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= 4
            or not isinstance(pool, int) or isinstance(pool, bool)
            or not 0 <= pool <= 512 * (MAX_INDIRECT_SEGMENTS + 1) or len(fds) != 3):
        refuse("bad ring parameters")
    memfd, own, peer = fds
    try:
        # The local grant provider checks the memfd (sealed, exactly the
        # announced pages) before mapping any of it.
        ring = BackRing(memfd, order, pool, backend.size // SECTOR, backend.read_only)
    except (OSError, HandshakeError) as exc:
        refuse(str(exc))  # closes the memfd with the eventfds
    os.close(memfd)  # the mapping keeps the pages
    try:
        assert isinstance(name, str)  # found in disks
        return _accept(conn, backend, ring, own, peer, stats, name)
    except BaseException:
        ring.close()
        raise


def _accept(conn: socket.socket, backend: Backend, ring: BackRing,
            own: int, peer: int, stats: DiskStats, name: str) -> Conn:
    """Answer a good hello with the disk's size and features; the ring is live."""
    features = {"flush": backend.capabilities.can_flush, "barrier": True,
                "discard": backend.capabilities.can_trim,
                "max_indirect_segments": MAX_INDIRECT_SEGMENTS}
    # A small reply on a socket nobody has written to: it fits, or the
    # frontend is dropped rather than waited for.
    reply = encode({"ok": True, "version": PROTOCOL_VERSION, "size": backend.size,
                    "sector_size": SECTOR, "read_only": backend.read_only,
                    "features": features})
    if conn.send(reply, socket.MSG_DONTWAIT) != len(reply):
        raise HandshakeError("blk handshake: reply did not fit in the socket")
    bell = Doorbell(own, peer, conn)
    return Conn(backend, ring, bell, stats, name, conn)


def admit(conn: socket.socket, uids: frozenset[int], pending: int) -> bool:
    """The uid check, before a byte is read; a refused client is told and closed."""
    try:
        uid = peer_credentials(conn).uid
    except OSError:
        conn.close()
        return False
    if uid not in uids:
        refuse_now(conn, f"uid {uid} is not allowed", "auth")
    elif pending >= MAX_PENDING:
        refuse_now(conn, "busy with other handshakes", "busy")
    else:
        return True
    log.info("blk client refused: uid %d%s", uid, "" if uid not in uids else " (busy)")
    conn.close()
    return False
