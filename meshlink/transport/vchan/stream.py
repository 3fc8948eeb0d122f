"""vchan as a trio stream: shared-memory rings between processes on one host.

Theory of operation
-------------------
The bytes move through two rings in shared memory laid out exactly as Xen's
libxenvchan lays them out (``native/``, docs/vchan.md).  This module
adds what a trio stream needs on top:

*Rendezvous.*  A server claims its service name in the host store
(:mod:`resolver.hoststore`) and listens on a Unix socket there.  A client
connects and sends a small JSON hello with the ring sizes it wants; the server
checks the client's credentials (``SO_PEERCRED``) against its allow list --
the local analogue of a grant table naming the one domain that may map a
page -- picks the ring orders, and answers with the orders and, by
``SCM_RIGHTS``, the sealed memfd holding the pages and the two eventfds.  The
client validates and maps the pages itself (a hostile server cannot make it
map more than it checked).

*Liveness.*  The Unix socket stays open for the life of the channel and
carries nothing more: EOF on it means the peer process is gone.  This is how
a peer killed with SIGKILL is noticed (Xen uses unmap-notify for the same).
A peer that closes cleanly clears its live byte first, so "live byte 0" is a
clean EOF and "socket gone, live byte still 1" is a crash
(:class:`~meshlink.ConnectionLost`).

*Waiting.*  C never blocks.  To wait, a task arms the notify bit in the
peer's byte, re-checks the ring, and only then sleeps on the doorbell
(:mod:`meshlink.transport.doorbell`: our eventfd and the liveness socket in one epoll
set, one sleeper, the other waiters parked).  Before arming, it polls
cooperatively (each turn yields to trio), because waking a sleeping process
costs tens of microseconds: a writer for 50 us, a reader for about twice its
recent wait, up to 250 us for message-sized traffic (see
:meth:`VchanStream._read_spin_budget`); this is what makes small round trips
fast.

*Half-close.*  ``send_eof`` clears our live byte; the peer drains what we
wrote and then reads EOF, while the other direction keeps working.  Unlike
libxenvchan, everything written before a close is delivered.
"""

from __future__ import annotations

import operator
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import trio

from ...errors import (
    ConnectionLost,
)
from ..doorbell import Doorbell, spin
from ..rendezvous import (
    PeerCredentials,
)
from .ring import VchanRing

_R = TypeVar("_R", bytes, int)

__all__ = [
    "DEFAULT_RING_SIZE",
    "MAX_RING_SIZE",
    "VchanStream",
]

#: Default size of each ring (bytes).  bench/bench_vchan.py with 64 KiB writes:
#: 64 KiB rings run lock-step (~0.7 GB/s), 256 KiB rings reach most of the
#: bulk rate of 1 MiB ones (~8 vs ~8.6 GB/s here) at a quarter of the memory.
DEFAULT_RING_SIZE = 1 << 18
MAX_RING_SIZE = 1 << 20
#: How long a writer polls cooperatively for space before arming and sleeping.
SPIN_SECONDS = 50e-6
#: Bounds of a reader's adaptive spin (see VchanStream._read_spin_budget).
MIN_READ_SPIN = 5e-6
MAX_READ_SPIN = 250e-6
#: A reader spins this many times the recent average wait.  With 2, about 2 %
#: of closed-loop bus calls outlasted the spin, slept, and paid a wake-up (on
#: these VMs 150-250 us, an idle vCPU must be woken): p99 was 4-5x p50.  Over
#: 15 runs of 5,000 calls each (docs/performance.md), p99/p50 was 1.9-4.0x
#: with 4 (5 runs above 3x, one of them 16.5x) and 1.9-3.4x with 8 (one above
#: 3x).  The spin is still bounded by MAX_READ_SPIN, and there is none for a
#: peer that is usually slower than that (see _read_spin_budget).
READ_SPIN_FACTOR = 8
#: Reads at least this large count as bulk traffic for the spin heuristic.
BULK_READ = 16384




class VchanStream(trio.abc.HalfCloseableStream):
    """One end of a vchan connection, as a trio stream.

    Made by :func:`connect_vchan` or :meth:`VchanListener.accept`; do not
    construct directly.

    Attributes:
        peer: credentials of the peer process.
        read_size: size in bytes of the ring we read from.
        write_size: size in bytes of the ring we write to.
    """

    def __init__(
        self,
        ring: VchanRing,
        own_evfd: int,
        peer_evfd: int,
        liveness: socket.socket | None,
        peer: PeerCredentials | None,
        *,
        on_event: Callable[[], None] | None = None,
        owns_fds: bool = True,
        bell: Doorbell | None = None,
    ) -> None:
        # Other providers (meshlink.transport.vchan.xen): no liveness socket (the ring's
        # live bytes carry death), an event fd that ``on_event`` acknowledges
        # instead of reading it, and fds owned by the ring (owns_fds=False).
        self._ring = ring
        # ``bell``: a provider without event fds (ivshmem polling) brings its own.
        self._bell = bell or Doorbell(own_evfd, peer_evfd, liveness, on_event=on_event,
                                      owns_fds=owns_fds)
        self.peer = peer
        self.read_size = ring.read_size
        self.write_size = ring.write_size
        self._closed = False
        self._eof_sent = False
        self._sending = False
        self._receiving = False
        self._read_wait_avg = SPIN_SECONDS
        self._last_read = 0

    # -- waiting -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this vchan stream was closed")

    async def _sleep(self) -> None:
        """Sleep until the peer signals (or dies).  Callers armed and re-checked."""
        await self._bell.wait()
        self._check_open()

    def _read_spin_budget(self) -> float:
        """How long a reader should poll before sleeping.

        Spinning pays when data usually comes sooner than a wakeup would cost
        (a woken idle vCPU: 150-250 us on the VMs we measure on), so the
        budget follows a moving average of how long recent reads waited:
        :data:`READ_SPIN_FACTOR` times that, within
        [MIN_READ_SPIN, MAX_READ_SPIN]; when the peer usually takes longer
        than MAX_READ_SPIN (an idle or slow peer) spinning is pointless and
        we do not spin at all (0): the reader arms and sleeps at once, and
        its sleep is the call's one schedule point.  After a large read
        (bulk transfer) the cap is the writer's SPIN_SECONDS: there the peer
        is busy producing, and on a loaded machine a long spin takes the
        CPU it needs.
        """
        avg = self._read_wait_avg
        cap = MAX_READ_SPIN if self._last_read < BULK_READ else SPIN_SECONDS
        if avg > cap:
            return 0.0
        return max(MIN_READ_SPIN, min(cap, READ_SPIN_FACTOR * avg))

    def _note_read_wait(self, started: float) -> None:
        # Samples are capped so one long idle gap is forgotten within a few
        # quick exchanges.
        sample = min(time.perf_counter() - started, 2 * MAX_READ_SPIN)
        self._read_wait_avg += (sample - self._read_wait_avg) / 4

    async def _spin(self, ready: Callable[[], bool], budget: float = SPIN_SECONDS) -> bool:
        """Poll cooperatively for ``budget`` seconds; True if ``ready()`` came true."""
        return await spin(ready, budget, self._check_open)

    # -- receiving -----------------------------------------------------------

    def _readable_now(self) -> bool:
        return self._ring.data_ready() > 0 or self._ring.peer_live() != 1

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive at least one byte, or ``b""`` at end of stream.

        Args:
            max_bytes: upper bound on the bytes returned (default: one ring).

        Returns:
            The bytes, or ``b""`` once the peer sent EOF and
            everything it wrote has been read.

        Raises:
            trio.BusyResourceError: another task is already receiving.
            trio.ClosedResourceError: this stream was closed.
            ConnectionLost: the peer process died without closing.
            RingCorruptError: the peer corrupted the shared page.

        Cancellation: safe; no data is lost when a waiting receive is cancelled.
        """
        if max_bytes is None:
            max_bytes = self.read_size
        max_bytes = operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        ring = self._ring
        return await self._receive(lambda: ring.read_bytes(max_bytes), b"")

    def bind_receive(self, max_bytes: int | None = None) -> Callable[[], Awaitable[bytes]]:
        """:meth:`receive_some` with ``max_bytes`` bound: the same call, minus
        its argument checks and one Python frame on every resumption, for a
        caller that always reads with one size (the session layer).

        Raises:
            ValueError: ``max_bytes`` is less than 1.
        """
        max_bytes = self.read_size if max_bytes is None else operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        return partial(self._receive, partial(self._ring.read_bytes, max_bytes), b"")

    async def receive_into(self, buf: bytearray | memoryview) -> int:
        """Receive into ``buf``; returns the byte count, 0 at end of stream.

        The zero-copy-friendly form of :meth:`receive_some` (one copy, from
        the ring into ``buf``).  Same errors and cancellation behaviour.
        """
        if len(buf) < 1:
            raise ValueError("buffer must not be empty")
        ring = self._ring
        return await self._receive(lambda: ring.read_into(buf), 0)

    async def _receive(self, read: Callable[[], _R], eof: _R) -> _R:
        """Run ``read`` until it returns something (a non-empty result) or EOF.

        One schedule point per call, as trio's sockets do it: a cancel check
        first; then, if data is already there, a shielded yield after taking
        it (nothing taken can be lost to a cancel); if not, the wait is the
        yield.  Yielding before the first look cost every wake-up one more
        trip through the run loop: 3 scheduler passes per bus call under
        load instead of 2, as over TCP.
        """
        self._begin_receive()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                self._check_open()
                got = read()
                if got:
                    self._last_read = got if isinstance(got, int) else len(got)
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return got
                if await self._wait_readable():
                    return eof
                waited = True
        finally:
            self._receiving = False

    def _begin_receive(self) -> None:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True

    async def _wait_readable(self) -> bool:
        """Wait until the ring has data; True means end of stream instead.

        Called with the ring found empty.  It passes through the scheduler at
        least once (a spin, a sleep, or a shielded yield when it finds the
        answer at once): it is the schedule point of the receive that waits.
        """
        ring = self._ring
        started = time.perf_counter()
        yielded = False
        while True:
            if ring.peer_live() == 0:
                # Clean EOF, but only after everything written before it:
                # the live byte was read (acquire) after the ring was seen
                # empty, so one more look sees data published before the close.
                ended = ring.data_ready() == 0
                break
            if self._bell.peer_dead:
                if ring.data_ready():
                    ended = False
                    break
                raise ConnectionLost("vchan peer process died without closing")
            budget = self._read_spin_budget()
            if budget:
                yielded = True  # spin yields before its first look
                if await self._spin(self._readable_now, budget):
                    self._note_read_wait(started)
                    return False
            if ring.arm_read() or ring.peer_live() != 1:
                ended = False
                break
            await self._sleep()
            yielded = True
            self._check_open()
            if ring.data_ready():
                self._note_read_wait(started)
                return False
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return ended

    # -- sending -------------------------------------------------------------

    def _check_can_send(self) -> None:
        self._check_open()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this vchan stream")
        if self._bell.peer_dead:
            raise ConnectionLost("vchan peer process is gone")

    def _writable_now(self) -> bool:
        return self._ring.buffer_space() > 0 or self._bell.peer_dead

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` into the ring, waiting for space as needed.

        Raises:
            trio.BusyResourceError: another task is already sending.
            trio.ClosedResourceError: this stream was closed, or send_eof() called.
            ConnectionLost: the peer process is gone.
            RingCorruptError: the peer corrupted the shared page.

        Cancellation: if cancelled, some prefix of ``data`` may have been sent
        and the stream is still usable, as with any trio stream.

        Backpressure: waits while the ring (``write_size`` bytes) is full.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            # As trio's own sockets do: honour a pending cancel first, write,
            # and yield afterwards only if we never had to wait; yielding
            # before the write would hold the bytes back a scheduler pass.
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            ring = self._ring
            with memoryview(data) as mv, mv.cast("B") as view:
                while True:
                    self._check_can_send()
                    if not view:
                        break
                    n = ring.write(view)
                    view = view[n:]
                    if not n:
                        await self._wait_space()
                        waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what fits of ``data`` into the ring now, without waiting.

        The synchronous form of :meth:`send_all` for callers that have a
        queue of their own for the rest (the bus writes a small frame from
        the task that made it, with no trip through the scheduler).  Only
        one sender at a time, as for :meth:`send_all`.

        Returns:
            The bytes written: ``len(data)``, fewer, or 0 when the ring is full.

        Raises:
            trio.BusyResourceError: a :meth:`send_all` is in progress.
            trio.ClosedResourceError, ConnectionLost, RingCorruptError: as
                :meth:`send_all`.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._check_can_send()
        return self._ring.write(data)

    def try_send_whole(self, data: bytes) -> int:
        """Write all of ``data`` into the ring now, or nothing.

        For a caller whose unit must not be cut (a session record): one C
        call instead of :meth:`send_space` then :meth:`try_send`.

        Returns:
            ``len(data)``, or 0 when it does not fit now.

        Raises:
            As :meth:`try_send`.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed or self._eof_sent or self._bell.peer_dead:
            self._check_can_send()
        return self._ring.send_whole(data)

    def send_space(self) -> int:
        """Bytes :meth:`try_send` would take now (the free space of our ring)."""
        self._check_can_send()
        return self._ring.buffer_space()

    async def _wait_space(self) -> None:
        if await self._spin(self._writable_now):
            return
        if self._ring.arm_write() > 0:
            return
        await self._sleep()

    async def wait_send_all_might_not_block(self) -> None:
        """Return when the ring has room (or the stream is broken or closed).

        Cancellation: safe.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                self._check_open()
                if self._bell.peer_dead or self._ring.buffer_space() > 0:
                    return
                await self._wait_space()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Tell the peer we will send nothing more; it reads EOF after our data.

        Idempotent.  The other direction keeps working.

        Raises:
            trio.BusyResourceError: a send_all is in progress.
            trio.ClosedResourceError: this stream was closed.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint()
        self._check_open()
        if not self._eof_sent:
            self._eof_sent = True
            self._ring.close()

    def detach(self) -> tuple[VchanRing, Doorbell]:
        """Hand the ring and the doorbell over to code that drives them without
        trio (:mod:`meshlink.blocking`: it waits in C, or in
        :meth:`Doorbell.wait_blocking`); this stream is closed, and the new
        owner must ``close()`` the ring and the doorbell, then ``free()`` the ring.

        Raises:
            trio.BusyResourceError: a send or receive is in progress.
            trio.ClosedResourceError: this stream was closed (or detached).
        """
        if self._sending or self._receiving:
            raise trio.BusyResourceError("a send or receive is in progress on this stream")
        self._check_open()
        self._closed = True
        return self._ring, self._bell

    async def aclose(self) -> None:
        """Close both directions and release the shared memory.

        The peer still receives everything we wrote, then EOF.  Tasks blocked
        in this stream's methods get :class:`trio.ClosedResourceError`.
        """
        if not self._closed:
            self._closed = True
            self._ring.close()  # clears our live byte and signals: fds still open
            self._bell.close()
            self._ring.free()
        await trio.lowlevel.checkpoint()
