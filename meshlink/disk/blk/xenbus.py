"""The vbd XenStore handshake of Xen's block devices, as Linux's blkfront and blkback run it.

Theory of operation
-------------------
A virtual block device ``DEVID`` of frontend domain ``F`` served by backend
domain ``B`` is two XenStore directories that the toolstack (dom0) creates:

* backend ``/local/domain/B/backend/vbd/F/DEVID`` (owner ``B``, ``F`` reads);
* frontend ``/local/domain/F/device/vbd/DEVID`` (owner ``F``, ``B`` reads);

each with ``state`` = Initialising (1) and pointers to the other end.  Then
each end moves its own ``state`` (XenbusState: Initialising 1, InitWait 2,
Initialised 3, Connected 4, Closing 5, Closed 6) and watches the other's:

1. backend (probe): ``max-ring-page-order`` (no
   ``feature-max-indirect-segments``: direct requests only), then state InitWait;
2. frontend, on backend InitWait: reads ``max-ring-page-order``, and in one
   transaction writes ``ring-page-order`` (only when more than one page),
   ``ring-ref`` (one page) or ``ring-ref0`` .. ``ring-ref<N-1>``,
   ``event-channel``, ``protocol`` (``x86_64-abi``), ``feature-persistent``;
   then state Initialised;
3. backend, on frontend Initialised (or Connected): reads and checks those
   nodes once (:class:`FrontendRing`), then in one transaction writes
   ``feature-flush-cache``, ``feature-discard``, ``feature-barrier``,
   ``feature-persistent``, ``sectors``, ``info``, ``sector-size``,
   ``physical-sector-size``; then state Connected;
4. frontend, on backend Connected: reads the disk's size and features, then
   state Connected;
5. closing: the frontend goes Closing; the backend answers Closing; the
   frontend goes Closed; the backend answers Closed.

Both ends here are driven by watches on the other end's ``state`` node
(:mod:`meshlink.transport.xenstore`); every XenStore call is a round trip,
so each step runs in a worker thread.  Every value read from the other end
is checked before use (:class:`~meshlink.HandshakeError` otherwise).

This module is the handshake only; :mod:`.xen` runs the ring over the
granted pages it exchanges (docs/blkif.md section 8).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from ...errors import HandshakeError
from ...transport.xenstore import NativeXenStore
from .ring import SECTOR

__all__ = [
    "MAX_RING_PAGE_ORDER",
    "PROTOCOL",
    "BackendConnected",
    "FrontendRing",
    "VbdPaths",
    "XenbusState",
    "vbd_backend",
    "vbd_frontend",
    "create_vbd",
]

T = TypeVar("T")
#: The most ring pages we accept: 2^4 (the blk ring's own limit).
MAX_RING_PAGE_ORDER = 4
#: XEN_IO_PROTO_ABI_X86_64, the only ABI the blk ring speaks.
PROTOCOL = "x86_64-abi"
_READ_ONLY_INFO = 4  # VDISK_READONLY in the "info" node
#: Bound on how long one end waits for the other to move.
STEP_TIMEOUT = 30.0


class XenbusState(enum.IntEnum):
    """xen/io/xenbus.h's XenbusState."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6


@dataclass(frozen=True)
class VbdPaths:
    """Where one virtual block device lives in XenStore."""

    backend_domid: int
    frontend_domid: int
    devid: int

    @property
    def backend(self) -> str:
        return f"/local/domain/{self.backend_domid}/backend/vbd/{self.frontend_domid}/{self.devid}"

    @property
    def frontend(self) -> str:
        return f"/local/domain/{self.frontend_domid}/device/vbd/{self.devid}"


@dataclass(frozen=True)
class FrontendRing:
    """What the frontend published, read once and checked by the backend.

    Attributes:
        order: ring-page-order (0 when the node is absent).
        ring_refs: the grant refs of the ring's 2^order pages.
        event_channel: the frontend's unbound event channel port.
        protocol: the ABI (always ``x86_64-abi`` once accepted).
        persistent: whether the frontend asked for persistent grants.
    """

    order: int
    ring_refs: tuple[int, ...]
    event_channel: int
    protocol: str
    persistent: bool


@dataclass(frozen=True)
class BackendConnected:
    """What the backend published when it connected, read by the frontend."""

    sectors: int
    sector_size: int
    read_only: bool
    flush: bool
    discard: bool
    barrier: bool


def _u32(raw: str, what: str, *, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    """A strictly decimal number from the other end, in [lo, hi]."""
    if not raw.isdigit() or len(raw) > 20 or not lo <= int(raw) <= hi:
        raise HandshakeError(f"vbd: bad {what} {raw[:40]!r}")
    return int(raw)


def create_vbd(xs: NativeXenStore, paths: VbdPaths) -> None:
    """The toolstack's part (dom0): both directories, pointers, state Initialising.

    Raises:
        OSError: XenStore refused (not dom0).
    """
    b, f = paths.backend_domid, paths.frontend_domid
    t = xs.transaction_start()
    try:
        for d, owner, other, peer_path, peer_id, peer_key in (
            (paths.backend, b, f, paths.frontend, f, "frontend"),
            (paths.frontend, f, b, paths.backend, b, "backend"),
        ):
            xs.write(t, d, "")
            xs.set_permissions(t, d, [(owner, 0), (other, 1)])
            xs.write(t, f"{d}/{peer_key}", peer_path)
            xs.write(t, f"{d}/{peer_key}-id", str(peer_id))
            xs.write(t, f"{d}/state", str(int(XenbusState.INITIALISING)))
            for key in (peer_key, f"{peer_key}-id", "state"):
                xs.set_permissions(t, f"{d}/{key}", [(owner, 0), (other, 1)])
        xs.write(t, f"{paths.frontend}/virtual-device", str(paths.devid))
        xs.set_permissions(t, f"{paths.frontend}/virtual-device", [(f, 0), (b, 1)])
    except BaseException:
        xs.transaction_end(t, True)
        raise
    xs.transaction_end(t, False)


class _End:
    """One end of the handshake: our directory, the other's, a watch on its state."""

    def __init__(self, ours: str, theirs: str) -> None:
        self.ours, self.theirs = ours, theirs
        self.xs = NativeXenStore()
        self._token = f"meshlink-vbd-{id(self):x}"
        self.xs.watch(f"{theirs}/state", self._token)
        self.fd = self.xs.fileno()

    def read(self, key: str, default: str | None = None) -> str:
        try:
            return self.xs.read(0, f"{self.theirs}/{key}")
        except OSError as exc:
            if default is not None and exc.errno == errno.ENOENT:
                return default
            raise HandshakeError(f"vbd: cannot read {self.theirs}/{key}: {exc}") from exc

    def their_state(self) -> XenbusState:
        raw = self.read("state", "0")
        value = _u32(raw, "state", hi=6)
        return XenbusState(value)

    def set_state(self, state: XenbusState) -> None:
        self.xs.write(0, f"{self.ours}/state", str(int(state)))

    def write_all(self, nodes: list[tuple[str, str]]) -> None:
        """Write ``nodes`` under our directory in one transaction (retried on conflict)."""
        for _ in range(100):
            t = self.xs.transaction_start()
            try:
                for key, value in nodes:
                    self.xs.write(t, f"{self.ours}/{key}", value)
            except BaseException:
                self.xs.transaction_end(t, True)
                raise
            if self.xs.transaction_end(t, False):
                return
        raise HandshakeError("vbd: XenStore transaction kept conflicting")

    async def wait_for(self, want: Callable[[XenbusState], bool]) -> XenbusState:
        """Wait (watch events) until the other end's state satisfies ``want``."""
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                while self.xs.check_watch() is not None:
                    pass
                state = await trio.to_thread.run_sync(self.their_state)
                if want(state):
                    return state
                await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        self.xs.close()


async def _run(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


class vbd_backend:  # noqa: N801 -- used as ``async with vbd_backend(...)``
    """The backend's side: ``async with vbd_backend(paths, ...) as b: await b.connected()``.

    Args:
        paths: the device.
        sectors: the disk's size in 512-byte sectors.
        read_only: advertise a read-only disk.
        flush, discard: advertise FLUSH_DISKCACHE / DISCARD.
    """

    def __init__(self, paths: VbdPaths, *, sectors: int, read_only: bool = False,
                 flush: bool = True, discard: bool = False) -> None:
        self.paths = paths
        self._info = (sectors, read_only, flush, discard)
        self._end: _End | None = None
        self.ring: FrontendRing | None = None

    async def __aenter__(self) -> vbd_backend:
        self._end = end = await _run(lambda: _End(self.paths.backend, self.paths.frontend))
        # No feature-max-indirect-segments: over Xen each request's grants
        # are mapped one request at a time (native/xen_blk.c), direct only.
        await _run(lambda: end.write_all([
            ("max-ring-page-order", str(MAX_RING_PAGE_ORDER)),
        ]))
        await _run(lambda: end.set_state(XenbusState.INIT_WAIT))
        return self

    def _connect_ring(self) -> FrontendRing:
        """Read what the frontend published, once, and check it (as connect_ring)."""
        assert self._end is not None
        end = self._end
        order = _u32(end.read("ring-page-order", "0"), "ring-page-order",
                     hi=MAX_RING_PAGE_ORDER)
        refs: tuple[int, ...]
        if order == 0:
            refs = (_u32(end.read("ring-ref"), "ring-ref"),)
        else:
            refs = tuple(_u32(end.read(f"ring-ref{i}"), f"ring-ref{i}")
                         for i in range(1 << order))
        evtchn = _u32(end.read("event-channel"), "event-channel", lo=1)
        protocol = end.read("protocol", PROTOCOL)
        if protocol != PROTOCOL:
            raise HandshakeError(f"vbd: unsupported protocol {protocol[:40]!r} (want {PROTOCOL})")
        persistent = _u32(end.read("feature-persistent", "0"), "feature-persistent", hi=1)
        return FrontendRing(order, refs, evtchn, protocol, bool(persistent))

    async def connected(self, attach: Callable[[FrontendRing], object] | None = None
                        ) -> FrontendRing:
        """Wait for the frontend's rings, answer with the disk; return what it published.

        Args:
            attach: called (in a thread) with what the frontend published,
                before the backend says Connected: map the ring, bind the port.

        Raises:
            HandshakeError: the frontend published something unusable, or
                ``attach`` failed (the backend then goes Closing), or the
                frontend did not move in time.
        """
        assert self._end is not None
        end = self._end
        await end.wait_for(lambda s: s in (XenbusState.INITIALISED, XenbusState.CONNECTED))
        try:
            ring = await _run(self._connect_ring)
            if attach is not None:
                await _run(lambda: attach(ring))
        except HandshakeError:
            await _run(lambda: end.set_state(XenbusState.CLOSING))
            raise
        sectors, read_only, flush, discard = self._info
        await _run(lambda: end.write_all([
            ("feature-flush-cache", "1" if flush else "0"),
            ("feature-discard", "1" if discard else "0"),
            ("feature-barrier", "1"),
            ("feature-persistent", "0"),
            ("sectors", str(sectors)),
            ("info", str(_READ_ONLY_INFO if read_only else 0)),
            ("sector-size", str(SECTOR)),
            ("physical-sector-size", str(SECTOR)),
        ]))
        await _run(lambda: end.set_state(XenbusState.CONNECTED))
        self.ring = ring
        return ring

    async def closed(self) -> None:
        """Follow the frontend through Closing and Closed (as frontend_changed)."""
        assert self._end is not None
        end = self._end
        await end.wait_for(lambda s: s in (XenbusState.CLOSING, XenbusState.CLOSED))
        await _run(lambda: end.set_state(XenbusState.CLOSING))
        await end.wait_for(lambda s: s == XenbusState.CLOSED)
        await _run(lambda: end.set_state(XenbusState.CLOSED))

    async def reinit(self) -> None:
        """After Closed: back to InitWait for the frontend's next attach."""
        assert self._end is not None
        end = self._end
        await _run(lambda: end.set_state(XenbusState.INIT_WAIT))

    async def __aexit__(self, *exc: object) -> None:
        if self._end is not None:
            self._end.close()
            self._end = None


class vbd_frontend:  # noqa: N801 -- used as ``async with vbd_frontend(...)``
    """The frontend's side, publishing already-granted ring pages and a port.

    ``ring_refs(order)`` is called with the negotiated ring-page-order and
    returns the grant refs of the 2^order ring pages and the event channel.
    """

    def __init__(self, paths: VbdPaths, ring_refs: Callable[[int], tuple[list[int], int]], *,
                 max_order: int = MAX_RING_PAGE_ORDER) -> None:
        self.paths = paths
        self._ring_refs = ring_refs
        self._max_order = max_order
        self._end: _End | None = None
        self.disk: BackendConnected | None = None

    async def __aenter__(self) -> vbd_frontend:
        self._end = await _run(lambda: _End(self.paths.frontend, self.paths.backend))
        return self

    async def connect(self) -> BackendConnected:
        """Run the frontend's side to Connected; return the disk the backend announced."""
        assert self._end is not None
        end = self._end
        # As blkfront: act on the backend's InitWait (a Closed left over
        # from a previous attach is not an answer).
        await end.wait_for(lambda s: s == XenbusState.INIT_WAIT)
        most = _u32(await _run(lambda: end.read("max-ring-page-order", "0")),
                    "max-ring-page-order", hi=32)
        order = min(most, self._max_order)
        refs, evtchn = self._ring_refs(order)
        nodes = [("ring-page-order", str(order))] if order else []
        if order == 0:
            nodes.append(("ring-ref", str(refs[0])))
        else:
            nodes += [(f"ring-ref{i}", str(r)) for i, r in enumerate(refs)]
        nodes += [("event-channel", str(evtchn)), ("protocol", PROTOCOL),
                  ("feature-persistent", "0")]
        await _run(lambda: end.write_all(nodes))
        await _run(lambda: end.set_state(XenbusState.INITIALISED))
        state = await end.wait_for(lambda s: s >= XenbusState.CONNECTED)
        if state != XenbusState.CONNECTED:
            raise HandshakeError(f"vbd: backend went {state.name} instead of connecting")

        def flag(key: str) -> bool:
            return _u32(end.read(key, "0"), key, hi=1) == 1

        def read_disk() -> BackendConnected:
            return BackendConnected(
                sectors=_u32(end.read("sectors"), "sectors", hi=1 << 55),
                sector_size=_u32(end.read("sector-size"), "sector-size", lo=512, hi=1 << 16),
                read_only=bool(_u32(end.read("info", "0"), "info") & _READ_ONLY_INFO),
                flush=flag("feature-flush-cache"), discard=flag("feature-discard"),
                barrier=flag("feature-barrier"))

        self.disk = await _run(read_disk)
        await _run(lambda: end.set_state(XenbusState.CONNECTED))
        return self.disk

    async def close(self) -> None:
        """Closing, wait for the backend to follow, Closed."""
        assert self._end is not None
        end = self._end
        await _run(lambda: end.set_state(XenbusState.CLOSING))
        await end.wait_for(lambda s: s >= XenbusState.CLOSING)
        await _run(lambda: end.set_state(XenbusState.CLOSED))
        # A backend that serves the device again is back in InitWait already.
        await end.wait_for(lambda s: s in (XenbusState.CLOSED, XenbusState.INIT_WAIT))

    async def __aexit__(self, *exc: object) -> None:
        if self._end is not None:
            self._end.close()
            self._end = None
