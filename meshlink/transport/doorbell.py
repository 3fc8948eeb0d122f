"""Waiting for a shared-memory peer: its event channel, or its death.

Theory of operation
-------------------
The ring code in C never blocks; to wait, a task arms the notify bits in
shared memory, re-checks the ring, and only then sleeps here.  A
:class:`Doorbell` puts the end's event file descriptor (an eventfd, or a Xen
event channel's fd) and, when there is one, the rendezvous socket that doubles
as a crash detector (EOF = the peer process is gone) into one epoll set, and
trio waits for that set to become readable: one wait covers both.

Several tasks may need to wait at once (a stream's reader and writer share
one event channel, as in Xen).  trio allows one waiter per fd, so the first
task sleeps on the epoll fd and the others park; every wakeup releases them
all to re-check their own condition (a signal carries no meaning beyond
"look again").

Before sleeping it usually pays to poll for a few tens of microseconds:
waking a sleeping process costs more than that.  :func:`spin` polls
cooperatively, yielding to trio on every turn, so other tasks keep running.

A thread that owns a doorbell alone (the blocking client,
:mod:`meshlink.blocking`) waits with :meth:`Doorbell.wait_blocking`, or in C
on :attr:`Doorbell.wait_fd`, instead; trio is imported only by the async
calls.
"""

from __future__ import annotations

import math
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

__all__ = ["Doorbell", "spin"]

_ONE = (1).to_bytes(8, "little")


class Doorbell:
    """One end's event channel, plus an optional liveness socket.

    Args:
        own_fd: the fd the peer signals (readable when signalled).
        peer_fd: the fd :meth:`ring` signals (local provider: an eventfd).
        liveness: a connected socket whose EOF means the peer process died,
            or ``None`` when the provider reports death another way.
        on_event: acknowledges a wakeup instead of reading ``own_fd`` (a Xen
            event channel must be read for its port and unmasked).
        owns_fds: whether :meth:`close` closes ``own_fd`` and ``peer_fd``.

    Attributes:
        peer_dead: set once the liveness socket reported EOF.
    """

    def __init__(self, own_fd: int, peer_fd: int, liveness: socket.socket | None, *,
                 on_event: Callable[[], None] | None = None, owns_fds: bool = True) -> None:
        self.own_fd = own_fd
        self.peer_fd = peer_fd
        self.peer_dead = False
        self._sock = liveness
        self._on_event = on_event
        self._owns_fds = owns_fds
        self._epoll = select.epoll()
        self._epoll_fd = self._epoll.fileno()
        self._epoll.register(own_fd, select.EPOLLIN)
        if liveness is not None:
            liveness.setblocking(False)
            self._epoll.register(liveness.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self._polling = False
        self._lot: trio.lowlevel.ParkingLot | None = None  # made by the first async wait
        self._parked = 0  # tasks parked in _lot (a count: unpark_all costs a Python call)
        # trio's wait_readable, kept by the first async wait: no import and no
        # attribute lookups on the later ones.
        self._wait_readable: Callable[[int], Awaitable[None]] | None = None
        self.closed = False

    @property
    def wait_fd(self) -> int:
        """The fd that turns readable when the peer signals or dies (for a
        thread that waits in C, as :meth:`wait_blocking` does in Python)."""
        return self._epoll.fileno()

    @property
    def live_fd(self) -> int:
        """The liveness socket's fd (EOF: the peer died), or -1 when there is none."""
        return -1 if self._sock is None else self._sock.fileno()

    @property
    def ack_fd(self) -> int:
        """The eventfd to read to acknowledge a signal, or -1 when the
        provider acknowledges another way (``on_event``)."""
        return self.own_fd if self._on_event is None else -1

    def also_wake_on(self, fd: int) -> None:
        """Wake :meth:`wait` when ``fd`` is readable too (a provider's own
        death detector, such as a XenStore watch); ``on_event`` must consume
        what made it readable.  The caller keeps ownership of ``fd``."""
        self._epoll.register(fd, select.EPOLLIN)

    def ring(self) -> None:
        """Signal the peer through ``peer_fd`` (an eventfd)."""
        os.write(self.peer_fd, _ONE)

    def _acknowledge(self) -> None:
        if self._on_event is not None:
            self._on_event()
        else:
            try:
                os.read(self.own_fd, 8)
                # A signal woke us: the liveness socket can wait.  If it
                # reports EOF too, the epoll set stays readable and the next
                # wait comes straight back here, finding no signal (one
                # system call less per wake-up, on every vchan wait).
                return
            except BlockingIOError:
                pass
        self.look_for_death()

    def look_for_death(self) -> bool:
        """Look, without waiting, whether the liveness socket reports the peer
        gone (EOF); sets and returns :attr:`peer_dead`.  Without a liveness
        socket it only returns what is known."""
        if self._sock is not None and not self.peer_dead:
            try:
                self.peer_dead = self._sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                pass
            except OSError:
                self.peer_dead = True
        return self.peer_dead

    async def wait(self) -> None:
        """Sleep until the peer signals or dies (callers armed and re-checked first).

        Raises:
            trio.ClosedResourceError: the doorbell was closed meanwhile.

        Cancellation: safe; nothing is consumed.

        One task polls; the others park until it wakes.  The poller alone
        acknowledges, before it wakes the others.  A waiter that
        acknowledged after it woke could consume a signal that the peer
        sent later, for another waiter that had meanwhile re-armed and gone
        back to sleep (a task woken here may run after that one did): a
        lost wakeup.  With the poller acknowledging, a signal sent after
        that leaves the fd readable for the next sleep, and every woken
        waiter re-checks the ring.
        """
        wait_readable = self._wait_readable
        if wait_readable is None or self._lot is None:
            import trio  # here: wait_blocking's users never load it

            self._lot = trio.lowlevel.ParkingLot()
            wait_readable = self._wait_readable = trio.lowlevel.wait_readable
        if self._polling:
            self._parked += 1
            try:
                await self._lot.park()
            finally:
                self._parked -= 1
        else:
            self._polling = True
            try:
                await wait_readable(self._epoll_fd)
                if not self.closed:
                    self._acknowledge()
            finally:
                self._polling = False
                if self._parked:
                    self._lot.unpark_all()
        if self.closed:
            import trio

            raise trio.ClosedResourceError("closed while waiting for the peer")

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """:meth:`wait` for a thread of its own: block until the peer signals or
        dies, or ``timeout`` seconds pass.  One waiting thread per doorbell,
        and no async waiter meanwhile.

        Returns:
            False when the timeout ended it (nothing consumed), else True.
        """
        poller = select.poll()  # not select(): descriptors may be above FD_SETSIZE
        poller.register(self._epoll.fileno(), select.POLLIN)
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        if not poller.poll(ms):
            return False
        self._acknowledge()
        return True

    def close(self) -> None:
        """Wake every waiter with ClosedResourceError and release the fds.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._lot is not None:  # an async waiter may exist: wake it
            import trio

            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._lot.unpark_all()
        self._epoll.close()
        if self._sock is not None:
            self._sock.close()
        if self._owns_fds:
            os.close(self.own_fd)
            os.close(self.peer_fd)


async def spin(ready: Callable[[], bool], budget: float,
               check: Callable[[], None] | None = None) -> bool:
    """Poll ``ready()`` for up to ``budget`` seconds, yielding to trio each turn.

    It always yields at least once, before its first look (a caller may count
    the spin as its schedule point).

    Args:
        ready: the condition.
        budget: how long to poll.
        check: called after every yield (to raise if the caller's resource closed).

    Returns:
        True if ``ready()`` came true.
    """
    import trio

    deadline = time.perf_counter() + budget
    while True:
        await trio.lowlevel.checkpoint()
        if check is not None:
            check()
        if ready():
            return True
        if time.perf_counter() >= deadline:
            return False
