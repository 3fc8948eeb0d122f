"""The blk ring's backend: serving disks to frontends on this host.

:func:`serve_blk` publishes ``<service>.blk`` and serves each frontend on its
own task.  The client's uid is checked before anything is read from it; at
most ``MAX_PENDING`` handshakes run at once, each within the handshake
timeout, and a malformed hello closes that connection only.  The handshake
then checks the hello, maps
the frontend's pages through the local grant provider (which checks the
memfd's seals and size, see :mod:`.ring`) and answers with the disk's size
and features.

Requests are served in ring order.  Each is copied out of the ring once and
validated in C (``native/blkring.c``) before Python sees it; only then are
its pages read or written.  A backend that declares it stores nothing, or
that hands out its whole disk as one buffer (:mod:`..backends`'s declared
capabilities), is served entirely by the native loop; others by a Python
loop that calls the backend.  FLUSH_DISKCACHE flushes the backend;
WRITE_BARRIER is served after everything before it (the loop is sequential),
flushed before and after.  A frontend's liveness is its rendezvous socket.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

import outcome
import trio

from resolver import HostStore, blk_entry_name

from ...errors import DiskError, HandshakeError, RingCorruptError, resolver_errors
from ...transport.doorbell import Doorbell, spin
from ...transport.rendezvous import (
    MAX_PENDING,
    encode,
    peer_credentials,
    receive_hello,
    refuse_now,
)
from ..backends import Backend
from ..backends._base import direct_buffer
from ..backends.memory import CHUNK_SHIFT
from ..counters import DiskCounters, DiskStats
from .handshake import (
    HANDSHAKE_TIMEOUT,
    MAX_INDIRECT_SEGMENTS,
    PROTOCOL_VERSION,
    SPIN_SECONDS,
)
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

__all__ = ["serve_blk"]

log = logging.getLogger("meshlink.disk.blk")
#: accept() errors that mean "not now" (resources), not "stop serving".
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Conn:
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
        ring = self.ring
        counts = self.counters
        if self.native:
            # The C loop counts everything, the batch's time included.
            n, notify = ring.serve_direct()
            if notify:
                self.bell.ring()
            return n
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

    async def run(self) -> None:
        if self.native and self.live is not None and _NATIVE_THREADS.available_tokens >= 1:
            await self._run_native()
            return
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


    async def _run_native(self) -> None:
        """The native loop in a thread of its own (``ml_blk_back_run``) until the
        frontend dies or we are cancelled.

        Raises:
            RingCorruptError: the frontend published impossible indices.

        Cancellation: sets the loop's stop flag and wakes it; returns (then
        raises Cancelled) once the thread has left the ring, so the ring is
        never freed under it.
        """
        assert self.live is not None
        live_fd = self.live.fileno()
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        result: list[outcome.Outcome[None]] = []

        def run() -> None:
            self.ring.run_native(self.bell.own_fd, self.bell.peer_fd, live_fd, stop_fd,
                                 SPIN_SECONDS)

        async def serve() -> None:
            # Not abandoned on cancel: the thread uses the ring's memory.
            result.append(await outcome.acapture(
                functools.partial(trio.to_thread.run_sync, run, limiter=_NATIVE_THREADS)))

        try:
            async with trio.open_nursery() as nursery:

                async def stop_on_cancel() -> None:
                    try:
                        await trio.sleep_forever()
                    finally:
                        self.ring.stop_native(stop_fd)

                nursery.start_soon(stop_on_cancel)
                await serve()
                nursery.cancel_scope.cancel()
        finally:
            os.close(stop_fd)
        # Raised here, outside the nursery, so callers see RingCorruptError
        # itself rather than an exception group.
        result[0].unwrap()


#: Rings served by the native loop in threads of their own at once; more are
#: served by the Python loop (same answers, slower wake-ups), so that a crowd
#: of clients costs at most this many threads.
_NATIVE_THREADS = trio.CapacityLimiter(64)


async def _handshake(conn: socket.socket, disks: Mapping[str, Backend],
                     stats: DiskStats) -> _Conn:
    """Read and check a frontend's hello (its uid is already checked); map its ring."""
    try:
        hello, fds = await receive_hello(conn, "blk", 3)
    except HandshakeError as exc:
        refuse_now(conn, str(exc), "refused")
        raise

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
            own: int, peer: int, stats: DiskStats, name: str) -> _Conn:
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
    return _Conn(backend, ring, bell, stats, name, conn)


async def serve_blk(service: str, disks: Mapping[str, Backend], *,
                    host_store: HostStore | str | os.PathLike[str] | None = None,
                    allow_uids: Collection[int] | None = None,
                    stats: DiskStats | None = None,
                    task_status: trio.TaskStatus[HostStore] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``disks`` (name -> backend) over the blk ring until cancelled.

    Publishes ``<service>.blk`` in the host store; clients open
    ``"<service>/<disk>"`` with :func:`open_blk`.  A client that breaks the
    protocol (hostile ring indices, bad handshake) is dropped and logged;
    the others are unaffected.

    Args:
        service: the service name.
        disks: backends by disk name.
        host_store: the host store (default: see :mod:`resolver.hoststore`).
        allow_uids: uids allowed to connect (default: our own).
        stats: counts each disk's requests under ``"blk"`` (see
            :mod:`meshlink.disk.counters`; default: counted, not reported).
        task_status: ``nursery.start`` reports the host store once listening.

    Raises:
        AddressInUse: a live server already serves ``service`` here.

    Cancellation: withdraws the service and closes every client's ring.
    """
    uids = frozenset(allow_uids) if allow_uids is not None else frozenset({os.getuid()})
    stats = stats if stats is not None else DiskStats()
    with resolver_errors():
        store = HostStore.of(host_store)
        pub = store.claim(blk_entry_name(service))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pending = [0]  # handshakes under way (a list: the tasks update it)
    try:
        await sock.bind(pub.bind_path)
        pub.bound()
        sock.listen(128)
        task_status.started(store)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    tconn, _ = await sock.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RETRY:
                        raise
                    log.warning("blk accept failed, retrying: %s", exc)
                    await trio.sleep(0.1)  # out of descriptors: back off, keep serving
                    continue
                conn = socket.socket(fileno=tconn.detach())
                conn.setblocking(False)
                if _admit(conn, uids, pending[0]):
                    pending[0] += 1
                    nursery.start_soon(_serve_client, conn, disks, pending, stats)
    finally:
        sock.close()
        pub.withdraw()


def _admit(conn: socket.socket, uids: frozenset[int], pending: int) -> bool:
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


async def _serve_client(conn: socket.socket, disks: Mapping[str, Backend],
                        pending: list[int], stats: DiskStats) -> None:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            c = await _handshake(conn, disks, stats)
    except (HandshakeError, OSError, trio.TooSlowError) as exc:
        log.info("blk client refused: %s", exc)
        conn.close()
        return
    finally:
        pending[0] -= 1
    try:
        await c.run()
    except RingCorruptError as exc:
        log.warning("blk client dropped: %s", exc)
    finally:
        c.close()
