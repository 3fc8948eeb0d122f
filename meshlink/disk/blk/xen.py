"""The blk ring between two Xen domains: grants, event channels and the vbd handshake.

Theory of operation
-------------------
Same ring as between processes (``native/blkring.c``), other pages and
wakeups (``native/xen_blk.c``) and the handshake Xen's blkfront and blkback
run in XenStore (:mod:`.xenbus`):

* the **frontend** (:func:`open_xen_blk`, the disk's user) shares the ring
  and its data pages with the backend's domain (one share: the refs are
  consecutive, ``first_ref + page``), binds an unbound event channel,
  publishes ``ring-ref``/``ring-ref<i>`` and ``event-channel`` and waits for
  Connected; the disk is then a :class:`~.front.BlkDisk` like any other;
* the **backend** (:func:`serve_xen_blk`) answers the handshake, maps only
  the ring pages, binds to the port, and serves requests in ring order: each
  is copied out and validated in C, then its segments' grants are mapped for
  the copy and unmapped (Xen checks each ref), so the frontend's grants are
  the only memory it can reach.  Direct requests only (11 segments).

The toolstack (dom0) creates the device's two XenStore directories first
(:func:`.xenbus.create_vbd`, as ``xl block-attach`` would).  Liveness: the
frontend's Closing ends the backend's loop; a domain that dies without
closing: both ends watch the other's domain (``@releaseDomain``, as the
vchan streams do) and end with :class:`~meshlink.ConnectionLost`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..._native import ffi, lib
from ...errors import ConnectionLost, DiskError, HandshakeError, LocalProtocolError
from ...transport.doorbell import Doorbell
from ...transport.vchan.xen import own_domid, require_xen
from ...transport.xenstore import DomainWatch
from ..backends import Backend
from .front import SEGMENTS, BlkDisk
from .ring import (
    OP_DISCARD,
    OP_FLUSH_DISKCACHE,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    PAGE,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    SECTOR,
    FrontRing,
    _corrupt,
    ring_entries,
)
from .xenbus import FrontendRing, VbdPaths, vbd_backend, vbd_frontend

__all__ = ["open_xen_blk", "serve_xen_blk"]

log = logging.getLogger("meshlink.disk.blk")
_BAD_REQUESTS = "frontend published impossible request indices"


def _why() -> str:
    return str(ffi.string(lib.ml_xen_error()).decode(errors="replace"))


class _XenBell(Doorbell):
    """The Doorbell over a Xen event channel: ring() notifies the port; the
    peer's domain is watched (``@releaseDomain``) and its death sets
    ``peer_dead``, which both ends' loops turn into ConnectionLost."""

    def __init__(self, x: Any, peer_domid: int) -> None:
        self._x = x
        super().__init__(int(lib.ml_xen_blk_event_fd(x)), -1, None, on_event=self._ack,
                         owns_fds=False)
        self._watch: DomainWatch | None = DomainWatch(peer_domid)
        self.also_wake_on(self._watch.fileno)

    def _ack(self) -> None:
        if lib.ml_xen_blk_ack(self._x) < 0:
            raise HandshakeError(f"blk event channel failed: {_why()}")
        if self._watch is not None and self._watch.poll():
            self.peer_dead = True

    def ring(self) -> None:
        lib.ml_xen_blk_notify(self._x)

    def close(self) -> None:
        super().close()
        if self._watch is not None:
            self._watch.close()
            self._watch = None


class _XenFrontRing(FrontRing):
    """:class:`FrontRing` over pages granted to the backend's domain."""

    def __init__(self, backend_domid: int, order: int, data_pages: int) -> None:
        self.entries = n = ring_entries(order)
        out = ffi.new("ml_xen_blk **")
        rc = lib.ml_xen_blk_front_open(backend_domid, order, data_pages, out)
        if rc < 0:
            raise HandshakeError(f"cannot share the blk ring with domain {backend_domid}: "
                                 f"{_why()}")
        self.x = out[0]
        self._base = lib.ml_xen_blk_memory(self.x)
        self.ref_base = int(lib.ml_xen_blk_first_ref(self.x))
        front = ffi.new("ml_blk_front **")
        if lib.ml_blk_front_new(self._base, order, front) != 0:
            lib.ml_xen_blk_free(self.x)
            raise LocalProtocolError("bad ring order")
        self.ptr = front[0]
        npages = (1 << order) + data_pages
        self.memory = memoryview(ffi.buffer(self._base, npages * PAGE))
        self.ids = ffi.new("uint64_t[]", n)
        self.statuses = ffi.new("int16_t[]", n)
        self.order = order

    def ring_refs(self) -> list[int]:
        return [self.ref_base + i for i in range(1 << self.order)]

    def submit(self, req: Any, ident: int, op: int, sector: int, nbytes: int,
               first_gref: int, indirect_gref: int, indirect: bool) -> bool:
        # A page's grant ref is first_ref + its index in the shared memory.
        return super().submit(req, ident, op, sector, nbytes, first_gref + self.ref_base,
                              indirect_gref + self.ref_base, indirect)

    def close(self) -> None:
        if self.ptr is None:
            return
        self.memory.release()
        lib.ml_blk_front_free(self.ptr)
        self.ptr = None
        lib.ml_xen_blk_free(self.x)


@asynccontextmanager
async def open_xen_blk(backend_domid: int, devid: int, *,
                       ring_order: int = 0) -> AsyncIterator[BlkDisk]:
    """Attach vbd ``devid`` served by domain ``backend_domid`` (run in the frontend's domain).

    ``async with open_xen_blk(3, 51712) as disk:`` -- the device must exist
    (the toolstack's :func:`.xenbus.create_vbd`) and its backend be serving.

    Args:
        backend_domid: the backend's domain.
        devid: the device id.
        ring_order: the most ring pages to use, 2^0..2^4 (32..512 requests
            in flight), further bounded by the backend's
            ``max-ring-page-order``.

    Raises:
        ProviderUnavailable: no Xen here.
        HandshakeError: the handshake failed or timed out.
        LocalProtocolError: a ring order outside 0..4.
    """
    if not 0 <= ring_order <= 4:
        raise LocalProtocolError("ring_order must be 0..4")
    require_xen()
    me = await trio.to_thread.run_sync(own_domid)
    paths = VbdPaths(backend_domid, me, devid)
    made: list[_XenFrontRing] = []

    def share(order: int) -> tuple[list[int], int]:
        # Called with the order the handshake settled on: the ring is
        # granted then (each slot owns a direct request's pages).
        ring = _XenFrontRing(backend_domid, order, ring_entries(order) * SEGMENTS)
        made.append(ring)
        return ring.ring_refs(), int(lib.ml_xen_blk_port(ring.x))

    fe = vbd_frontend(paths, share, max_order=ring_order)
    bell: _XenBell | None = None
    try:
        async with fe:
            info = await fe.connect()
            ring = made[0]
            bell = await trio.to_thread.run_sync(_XenBell, ring.x, backend_domid)
            disk = BlkDisk(size=info.sectors * info.sector_size, read_only=info.read_only,
                           features={"flush": info.flush, "discard": info.discard,
                                     "barrier": info.barrier},
                           ring=ring, order=ring.order, bell=bell, slot_pages=SEGMENTS)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(disk._pump)
                    try:
                        yield disk
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                await disk.aclose()
                if not bell.peer_dead:  # a dead backend domain answers nothing
                    with trio.CancelScope(shield=True):
                        await fe.close()
    finally:
        if bell is not None:
            bell.close()
        for r in made:
            r.close()


class _XenBack:
    """The backend's ring over the frontend's grants."""

    def __init__(self, paths: VbdPaths, backend: Backend) -> None:
        self.paths = paths
        self.backend = backend
        self.x: Any = None
        self.ptr: Any = None
        self.bell: _XenBell | None = None
        self.checked = ffi.new("struct ml_blk_checked *")

    def attach(self, fr: FrontendRing) -> None:
        refs = ffi.new("uint32_t[]", list(fr.ring_refs))
        out = ffi.new("ml_xen_blk **")
        if lib.ml_xen_blk_back_open(self.paths.frontend_domid, refs, fr.order,
                                    fr.event_channel, out) < 0:
            raise HandshakeError(f"cannot map the frontend's ring: {_why()}")
        self.x = out[0]
        back = ffi.new("ml_blk_back **")
        if lib.ml_blk_back_new_granted(lib.ml_xen_blk_memory(self.x), fr.order,
                                       self.backend.size // SECTOR,
                                       1 if self.backend.read_only else 0, back) != 0:
            raise HandshakeError("bad blk ring parameters")
        self.ptr = back[0]
        self.bell = _XenBell(self.x, self.paths.frontend_domid)

    async def _serve_one(self, c: Any) -> int:
        b = self.backend
        op, offset, length = int(c.op), int(c.offset), int(c.length)
        call = trio.to_thread.run_sync if b.capabilities.blocking else _direct
        try:
            if op == OP_READ:
                data = bytearray(await call(b.read, offset, length))
                if lib.ml_xen_blk_copy(self.x, c, ffi.from_buffer(data), 1) < 0:
                    log.warning("xen blk read: %s", _why())
                    return RSP_ERROR
            elif op in (OP_WRITE, OP_WRITE_BARRIER):
                if op == OP_WRITE_BARRIER:
                    await call(b.flush)
                if length:
                    buf = bytearray(length)
                    if lib.ml_xen_blk_copy(self.x, c, ffi.from_buffer(buf), 0) < 0:
                        log.warning("xen blk write: %s", _why())
                        return RSP_ERROR
                    await call(b.write, offset, buf)
                if op == OP_WRITE_BARRIER:
                    await call(b.flush)
            elif op == OP_FLUSH_DISKCACHE:
                await call(b.flush)
            elif op == OP_DISCARD:
                if not b.capabilities.can_trim:
                    return RSP_EOPNOTSUPP
                await call(b.discard, offset, length)
        except DiskError as exc:
            log.warning("xen blk request %d failed: %s", op, exc)
            return RSP_ERROR
        return RSP_OKAY

    async def run(self) -> None:
        assert self.bell is not None
        c = self.checked
        while True:
            served = 0
            while _corrupt(lib.ml_blk_back_get(self.ptr, c), _BAD_REQUESTS):
                status = int(c.status)
                if status == RSP_OKAY:
                    status = await self._serve_one(c)
                lib.ml_blk_back_put(self.ptr, c.req.id, c.req.operation, status)
                served += 1
            if served and lib.ml_blk_back_push(self.ptr):
                self.bell.ring()
            if served or _corrupt(lib.ml_blk_back_final_check(self.ptr), _BAD_REQUESTS):
                continue
            if self.bell.peer_dead:
                raise ConnectionLost(f"frontend domain {self.paths.frontend_domid} is gone")
            await self.bell.wait()

    def close(self) -> None:
        if self.bell is not None:
            self.bell.close()
            self.bell = None
        if self.ptr is not None:
            lib.ml_blk_back_free(self.ptr)
            self.ptr = None
        if self.x is not None:
            lib.ml_xen_blk_free(self.x)
            self.x = None


async def _direct(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def serve_xen_blk(backend: Backend, frontend_domid: int, devid: int, *,
                        reattach: bool = False,
                        task_status: trio.TaskStatus[VbdPaths] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Serve ``backend`` as vbd ``devid`` of domain ``frontend_domid`` until it closes.

    Run in the backend's domain once the toolstack created the device.
    Answers the handshake (state InitWait, then Connected with the disk's
    size and features), serves the ring, and follows the frontend through
    Closing and Closed.  With ``reattach``, goes back to InitWait after
    Closed for the frontend's next attach (as blkback does for a device
    still online), until cancelled.

    Raises:
        ProviderUnavailable: no Xen here.
        HandshakeError: the frontend published something unusable, or a
            step timed out.
        RingCorruptError: the frontend broke the ring's indices.
    """
    require_xen()
    me = await trio.to_thread.run_sync(own_domid)
    paths = VbdPaths(me, frontend_domid, devid)
    caps = backend.capabilities
    async with vbd_backend(paths, sectors=backend.size // SECTOR,
                           read_only=backend.read_only, flush=caps.can_flush,
                           discard=caps.can_trim) as vb:
        task_status.started(paths)
        while True:
            conn = _XenBack(paths, backend)
            lost: list[ConnectionLost] = []
            try:
                await vb.connected(conn.attach)
                async with trio.open_nursery() as nursery:

                    async def until_closed(scope: trio.CancelScope = nursery.cancel_scope
                                           ) -> None:
                        await vb.closed()
                        scope.cancel()

                    async def serve(scope: trio.CancelScope = nursery.cancel_scope,
                                    c: _XenBack = conn,
                                    out: list[ConnectionLost] = lost) -> None:
                        try:
                            await c.run()
                        except ConnectionLost as exc:
                            out.append(exc)
                            scope.cancel()

                    nursery.start_soon(until_closed)
                    nursery.start_soon(serve)
            finally:
                conn.close()
            if lost:
                raise lost[0]
            if not reattach:
                return
            await vb.reinit()
