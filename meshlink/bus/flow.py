"""Flow control of the bus: credit windows, and the wakeup a waiting side parks on.

Everything that queues at a receiver is credit-based, counted in wire bytes:
notifications (per connection), block-policy subscriptions and message
streams (each its own window).  The receiver announces a window; the sender
keeps the bytes it sent and that were not credited back (:class:`CreditOut`)
and waits while the next frame would overrun the window; the receiver counts
what arrived and what the application consumed (:class:`CreditIn`) and gives
credit back in chunks of a quarter window, or at once when its queue runs dry.

Both ends count the same bytes (the frame's size on the wire), so a peer that
overruns a window broke the protocol and is told so.

The other half of backpressure, the bound on the outgoing buffer, belongs to
the writer (:mod:`.writer`).
"""

from __future__ import annotations

from typing import Any

import trio

from ..errors import RemoteProtocolError

__all__ = ["CreditIn", "CreditOut", "Wakeup"]


class Wakeup:
    """Wake one parked task; the waiter re-checks its condition (no lost wakeups:
    trio is single-threaded, so nothing runs between the check and the park)."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        if self._task is not None:
            raise trio.BusyResourceError("another task is already waiting here")
        self._task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def set(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)


class CreditOut:
    """Send side of one credit window (the peer's buffer)."""

    __slots__ = ("closed", "lot", "outstanding", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.outstanding = 0
        self.closed = False  # the receiver went away: drop instead of waiting
        self.lot = trio.lowlevel.ParkingLot()

    def close(self) -> None:
        self.closed = True
        if self.lot:
            self.lot.unpark_all()

    def allows(self, size: int) -> bool:
        # A frame bigger than the whole window may go alone (outstanding == 0).
        return self.outstanding == 0 or self.outstanding + size <= self.window

    def refill(self, amount: int) -> None:
        if amount > self.outstanding:
            raise RemoteProtocolError(
                f"peer returned {amount} bytes of credit, only {self.outstanding} outstanding"
            )
        self.outstanding -= amount
        if self.lot:
            self.lot.unpark_all()


class CreditIn:
    """Receive side of one credit window (our buffer)."""

    __slots__ = ("pending", "unacked", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.unacked = 0  # received and not yet credited back
        self.pending = 0  # consumed and not yet credited back

    def receive(self, size: int, what: str) -> None:
        if self.unacked and self.unacked + size > self.window:
            raise RemoteProtocolError(f"peer overran the {what} window of {self.window} bytes")
        self.unacked += size

    def consume(self, size: int, queue_empty: bool) -> int:
        """Account for ``size`` consumed bytes; return the credit to send now (or 0)."""
        self.pending += size
        if self.pending >= self.window // 4 or (queue_empty and self.pending):
            amount = self.pending
            self.pending = 0
            self.unacked -= amount
            return amount
        return 0
