"""vchan over ivshmem: the same trio stream, in a region several VMs map.

Theory of operation
-------------------
QEMU's ``ivshmem`` device exposes a host file (or memfd) to a guest as the
PCI BAR2 of a device with vendor 0x1af4, device 0x1110; a guest maps it from
``/sys/bus/pci/devices/<dev>/resource2``, a host process maps the file
itself.  Every party that maps the same region sees the same bytes, which is
all the vchan ring needs (``native/ivshmem.c``, docs/vchan.md section 10):

* the region's creator stamps a header: magic, version, its *host id*, and
  a table of channel slots, each owning a fixed area of ring space;
* a listener claims a free slot under a service name and lays a vchan
  control page and rings out in its area; a client finds the slot by name,
  takes it, validates every offset (read once, checked to lie in that slot's
  own area) and connects, exactly as a local or Xen client does.

*Co-location.*  Seeing the same region is the proof: a client that reaches
a listener through it shares memory with it.  The host id in the header says
which machine's memory that is; :func:`connect_ivshmem` refuses a region
whose host id is not the one the caller expects.

*Events.*  Without ``ivshmem-server`` there are no interrupts or eventfds, so
a signal increments a bell counter in the slot and a waiter polls it: first
a cooperative spin whose budget adapts to recent waits (at most
:data:`MAX_SPIN`), then sleeps from :data:`MIN_POLL` doubling to
:data:`MAX_POLL`.  ``stream.transport_details["notify"]`` says ``"poll"``.

*Liveness.*  A killed guest cannot clear its live byte, so each end bumps a
heartbeat counter every :data:`BEAT_INTERVAL` from a small thread; a peer
whose counter has not moved for :data:`DEAD_AFTER` is gone
(:class:`~meshlink.ConnectionLost`).  A clean close clears the live byte
first, so it still reads as end of stream.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import trio

from ..._native import ffi, lib
from ...errors import (
    LocalProtocolError,
    ProviderUnavailable,
    RingCorruptError,
    ServiceNotFound,
    TransportError,
)
from ..doorbell import Doorbell
from .ring import VchanRing, choose_orders
from .stream import DEFAULT_RING_SIZE, VchanStream

__all__ = [
    "BEAT_INTERVAL",
    "DEAD_AFTER",
    "IvshmemListener",
    "IvshmemRegion",
    "IvshmemStream",
    "connect_ivshmem",
    "find_ivshmem_device",
    "local_region",
    "local_region_host_id",
    "open_ivshmem_listener",
]

#: How often an end bumps its heartbeat counter.
BEAT_INTERVAL = 0.1
#: A peer whose heartbeat has not moved for this long is gone.
DEAD_AFTER = 0.6
#: Bounds of the adaptive spin before sleeping (see PollBell.wait).
MIN_SPIN = 50e-6
MAX_SPIN = 2e-3
#: Bounds of the sleeping backoff after the spin (trio sleeps in whole ms).
MIN_POLL = 1e-3
MAX_POLL = 4e-3
#: QEMU's ivshmem PCI ids (the same for ivshmem-plain and ivshmem-doorbell).
IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
#: Default region geometry for :meth:`IvshmemRegion.create`.
DEFAULT_REGION_SIZE = 16 << 20
DEFAULT_SLOTS = 8


def _check(rc: int, what: str) -> int:
    if rc >= 0:
        return rc
    if rc == lib.ML_ECORRUPT:
        raise RingCorruptError(f"ivshmem {what}: the region's header or slot is not valid")
    if rc == lib.ML_EINVAL:
        raise LocalProtocolError(f"ivshmem {what}: invalid argument")
    if rc == lib.ML_ENOMEM:
        raise MemoryError(f"ivshmem {what}")
    err = ffi.errno
    if err == errno.ENOENT and what.startswith("connect"):
        raise ServiceNotFound(err, f"ivshmem {what}: no listener of that name in the region")
    raise TransportError(f"ivshmem {what}: {os.strerror(err)}")


def _ascii(text: str, what: str) -> bytes:
    """``text`` as the printable ASCII the region's header and slots hold."""
    if not text or not text.isascii() or not text.isprintable() or " " in text:
        raise LocalProtocolError(f"ivshmem {what} must be printable ASCII without spaces: "
                                 f"{text!r}")
    return text.encode("ascii")


def find_ivshmem_device(sysfs: str = "/sys/bus/pci/devices") -> str:
    """The ``resource2`` path of the first ivshmem PCI device (inside a guest).

    Raises:
        ProviderUnavailable: no ivshmem device is present.
    """
    root = Path(sysfs)
    for dev in sorted(root.glob("*")) if root.is_dir() else []:
        try:
            vendor = int((dev / "vendor").read_text(), 16)
            device = int((dev / "device").read_text(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, device) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE) and (dev / "resource2").exists():
            return str(dev / "resource2")
    raise ProviderUnavailable(f"no ivshmem PCI device (1af4:1110) under {sysfs}")


#: Names the region this end maps: a host file, a resource2 path, or "auto".
REGION_ENV = "MESHLINK_IVSHMEM"


def local_region() -> IvshmemRegion:
    """The region this end maps: ``$MESHLINK_IVSHMEM`` (a path), else the guest's device.

    Raises:
        ProviderUnavailable: no path set and no ivshmem device present.
        RingCorruptError: the region's header is not valid.
        TransportError: it cannot be opened or mapped.
    """
    path = os.environ.get(REGION_ENV, "auto")
    return IvshmemRegion.open(None if path == "auto" else path)


def local_region_host_id() -> str | None:
    """The host id in the header of :func:`local_region`, or None if there is none.

    What :class:`resolver.Resolver` takes as ``ivshmem_host_id``: two parties
    that map regions stamped with the same host id are co-located on one KVM
    host.  A region that cannot be opened or whose header is invalid counts
    as none.
    """
    try:
        with local_region() as region:
            return region.host_id
    except (TransportError, RingCorruptError):
        return None


class IvshmemRegion:
    """One mapping of an ivshmem region (a host file or a guest's BAR2).

    Use :meth:`create` (the host that owns the region) or :meth:`open`.

    Attributes:
        path: what was mapped.
        host_id: the creator's host id (validated copy of the header's).
        size: bytes mapped.
        nslots: channel slots in the table.
        max_ring: the largest ring a slot holds, per direction.
    """

    def __init__(self, ptr: Any, path: str) -> None:
        self._r = ptr
        self.path = path
        self.host_id: str = ffi.string(lib.ml_ivshmem_host_id(ptr)).decode("ascii")
        self.size = int(lib.ml_ivshmem_size(ptr))
        self.nslots = int(lib.ml_ivshmem_nslots(ptr))
        self.max_ring = int(lib.ml_ivshmem_max_ring(ptr))

    @classmethod
    def create(cls, path: str | os.PathLike[str], host_id: str, *,
               size: int = DEFAULT_REGION_SIZE, nslots: int = DEFAULT_SLOTS) -> IvshmemRegion:
        """Create (or re-initialise) a host file as a region stamped with ``host_id``.

        Any channel in an existing region at ``path`` is wiped.

        Raises:
            LocalProtocolError: bad size, slot count or host id.
            TransportError: the file cannot be created or mapped.
        """
        out = ffi.new("ml_ivshmem_region **")
        _check(lib.ml_ivshmem_open(os.fsencode(path), 1, size, _ascii(host_id, "host id"),
                                   nslots, out), "create")
        return cls(out[0], os.fspath(path))

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> IvshmemRegion:
        """Map an existing region and validate its header.

        Args:
            path: a host file or a PCI ``resource2`` file; default: the first
                ivshmem device of this (guest) machine.

        Raises:
            RingCorruptError: the header is not a valid region header.
            ProviderUnavailable: no path given and no ivshmem device present.
            TransportError: the file cannot be opened or mapped.
        """
        p = os.fspath(path) if path is not None else find_ivshmem_device()
        out = ffi.new("ml_ivshmem_region **")
        _check(lib.ml_ivshmem_open(os.fsencode(p), 0, 0, ffi.NULL, 0, out), "open")
        return cls(out[0], p)

    def slot_state(self, i: int) -> int:
        """The state word of slot ``i`` (``lib.ML_IVSHMEM_*``), for diagnostics."""
        self._require_open()
        return _check(lib.ml_ivshmem_slot_state(self._r, i), "slot_state")

    def _require_open(self) -> Any:
        if self._r is None:
            raise trio.ClosedResourceError("this ivshmem region was closed")
        return self._r

    def close(self) -> None:
        """Drop this mapping; open channels keep the region mapped.  Idempotent."""
        if self._r is not None:
            lib.ml_ivshmem_close(self._r)
            self._r = None

    def __enter__(self) -> IvshmemRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _party() -> int:
    return int.from_bytes(os.urandom(4), "little") or 1


class _Heart(threading.Thread):
    """Bumps one end's heartbeat every BEAT_INTERVAL until stopped.

    A thread, not a trio task: the heartbeat must go on while the owner's
    event loop is busy or idle, since silence means "dead" to the peer.
    """

    def __init__(self, ptr: Any) -> None:
        super().__init__(name="meshlink-ivshmem-beat", daemon=True)
        self._ptr = ptr
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(BEAT_INTERVAL):
            lib.ml_ivshmem_beat(self._ptr)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class PollBell(Doorbell):
    """A doorbell without fds: polls the bell counter, watches the heartbeat.

    Replaces :class:`~meshlink.transport.doorbell.Doorbell` for
    :class:`~meshlink.transport.vchan.stream.VchanStream`: :meth:`wait`
    returns when the peer rang (its counter moved) or is dead, after an
    adaptive spin and then sleeps from MIN_POLL doubling to MAX_POLL.
    """

    def __init__(self, ptr: Any) -> None:  # noqa: D107 - no fds, no epoll: the base is not set up
        self._ptr = ptr
        self._seen = int(lib.ml_ivshmem_bell(ptr))
        self._beat = int(lib.ml_ivshmem_peer_beat(ptr))
        self._beat_at = time.monotonic()
        self._dead = False
        self._wait_avg = MIN_SPIN
        self.closed = False
        self.own_fd = -1
        self.peer_fd = -1

    @property
    def peer_dead(self) -> bool:
        """True once the peer's heartbeat stopped for DEAD_AFTER seconds (sticky)."""
        if self._dead or self.closed:
            return self._dead
        beat = int(lib.ml_ivshmem_peer_beat(self._ptr))
        now = time.monotonic()
        if beat != self._beat:
            self._beat, self._beat_at = beat, now
        elif now - self._beat_at > DEAD_AFTER:
            self._dead = True
        return self._dead

    @peer_dead.setter
    def peer_dead(self, value: bool) -> None:
        self._dead = value

    def ring(self) -> None:
        """Signal the peer (bump its bell counter)."""
        lib.ml_vchan_notify(self._ptr)

    async def wait(self) -> None:
        """Wait until the peer rings or dies (callers armed and re-checked first).

        First a cooperative spin (every turn yields to trio) whose budget
        follows recent waits, as the stream's read spin does: twice their
        moving average within [MIN_SPIN, MAX_SPIN], or barely at all when
        the peer usually takes longer (an idle peer).  Then sleeps from
        MIN_POLL doubling to MAX_POLL: trio's sleeps have millisecond
        granularity, so a shorter wait can only be had by spinning.

        Raises:
            trio.ClosedResourceError: the bell was closed meanwhile.

        Cancellation: safe; nothing is consumed.
        """
        started = time.perf_counter()
        avg = self._wait_avg
        budget = MIN_SPIN if avg > MAX_SPIN else max(MIN_SPIN, min(MAX_SPIN, 2 * avg))
        delay = MIN_POLL
        spin_until = started + budget
        while True:
            if self.closed:
                raise trio.ClosedResourceError("closed while waiting for the peer")
            bell = int(lib.ml_ivshmem_bell(self._ptr))
            if bell != self._seen:
                self._seen = bell
                sample = min(time.perf_counter() - started, 2 * MAX_SPIN)
                self._wait_avg += (sample - self._wait_avg) / 4
                return
            if self.peer_dead:
                return
            if time.perf_counter() < spin_until:
                await trio.lowlevel.checkpoint()
                continue
            await trio.sleep(delay)
            delay = min(2 * delay, MAX_POLL)

    def close(self) -> None:
        """Make every waiter raise ClosedResourceError.  Idempotent."""
        self.closed = True


class IvshmemStream(VchanStream):
    """A :class:`~meshlink.transport.vchan.stream.VchanStream` in an ivshmem region.

    Attributes:
        transport_details: ``provider`` ("ivshmem"), ``notify`` ("poll"),
            ``host_id`` (of the region), ``region`` (path), ``slot``,
            ``peer_party``.
    """

    def __init__(self, ptr: Any, region: IvshmemRegion) -> None:
        ring = VchanRing(ptr)
        self._ptr = ptr
        self._heart = _Heart(ptr)
        self._heart.start()
        super().__init__(ring, -1, -1, None, None, owns_fds=False, bell=PollBell(ptr))
        self.transport_details: dict[str, str | int] = {
            "provider": "ivshmem",
            "notify": "poll",
            "host_id": region.host_id,
            "region": region.path,
            "slot": int(lib.ml_ivshmem_slot(ptr)),
            "peer_party": int(lib.ml_ivshmem_peer_party(ptr)),
        }

    async def aclose(self) -> None:
        """Close both directions, stop the heartbeat and give the slot back."""
        if not self._closed:
            self._heart.stop()
            if self._bell.peer_dead:
                lib.ml_ivshmem_forget_peer(self._ptr)
        await super().aclose()


class IvshmemListener(trio.abc.Listener[IvshmemStream]):
    """A service name in a region; each :meth:`accept` claims a slot and waits.

    Made by :func:`open_ivshmem_listener`.
    """

    def __init__(self, region: IvshmemRegion, name: str, ring_size: int) -> None:
        self.region = region
        self.name = name
        self.left_order, self.right_order = choose_orders(ring_size, ring_size)
        self._pending: Any = None
        self._closed = False

    def _claim(self) -> Any:
        if self._pending is None:
            out = ffi.new("ml_vchan **")
            _check(lib.ml_ivshmem_listen(self.region._require_open(), _ascii(self.name, "name"),
                                         _party(), self.left_order, self.right_order, out),
                   "listen")
            self._pending = out[0]
        return self._pending

    async def accept(self) -> IvshmemStream:
        """Wait for the next client (polling the slot's live byte with backoff).

        Raises:
            TransportError: no free slot (errno ENOSPC).
            trio.ClosedResourceError: the listener was closed.

        Cancellation: safe; the claimed slot stays listening for the next call.
        """
        delay = MIN_POLL
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this ivshmem listener was closed")
            ptr = self._claim()
            if lib.ml_vchan_peer_live(ptr) != lib.ML_LIVE_WAITING:
                self._pending = None
                stream = IvshmemStream(ptr, self.region)
                # Keep a slot listening, as a socket keeps listening after
                # accept; with the table full, the next accept retries.
                try:
                    self._claim()
                except TransportError:
                    pass
                return stream
            await trio.sleep(delay)
            delay = min(2 * delay, MAX_POLL)

    async def aclose(self) -> None:
        """Stop listening: the claimed slot is freed."""
        self._closed = True
        if self._pending is not None:
            lib.ml_vchan_free(self._pending)
            self._pending = None
        await trio.lowlevel.checkpoint()


async def open_ivshmem_listener(region: IvshmemRegion, name: str, *,
                                ring_size: int = DEFAULT_RING_SIZE) -> IvshmemListener:
    """Listen for ``name`` in ``region``: the first slot is claimed at once.

    Args:
        ring_size: the smallest ring size wanted each way (capped by the slot).

    Raises:
        TransportError: no free slot.
        LocalProtocolError: a bad name.
    """
    listener = IvshmemListener(region, name, min(ring_size, region.max_ring))
    listener._claim()
    await trio.lowlevel.checkpoint()
    return listener


async def connect_ivshmem(region: IvshmemRegion, name: str, *, expect_host_id: str | None = None,
                          wait: float = 0.0) -> IvshmemStream:
    """Connect to the listener of ``name`` in ``region``.

    Args:
        expect_host_id: refuse a region whose creator's host id differs
            (the co-location claim the caller wants proved).
        wait: how long to keep looking for a listener that is not there yet.

    Raises:
        ServiceNotFound: no listener of that name (within ``wait``).
        ProviderUnavailable: the region belongs to another host id.
        RingCorruptError: the listener's slot is not valid.
    """
    if expect_host_id is not None and region.host_id != expect_host_id:
        raise ProviderUnavailable(f"ivshmem region {region.path} belongs to host "
                                  f"{region.host_id!r}, not {expect_host_id!r}")
    deadline = trio.current_time() + wait
    delay = MIN_POLL
    while True:
        out = ffi.new("ml_vchan **")
        try:
            _check(lib.ml_ivshmem_connect(region._require_open(), _ascii(name, "name"),
                                          _party(), out), "connect")
        except ServiceNotFound:
            if trio.current_time() >= deadline:
                raise
            await trio.sleep(delay)
            delay = min(2 * delay, MAX_POLL)
            continue
        await trio.lowlevel.checkpoint()
        return IvshmemStream(out[0], region)
