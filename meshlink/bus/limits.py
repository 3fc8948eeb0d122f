"""What one peer may cost a bus server: connections, incomplete frames, time.

A server's other limits are per connection and announced or checked by the
core (:mod:`.proto`, :mod:`.flow`).  Two resources are shared by every
connection of a server, so no per-connection limit can protect them:

* the number of open connections (``BusConfig.max_connections``): one more is
  closed as soon as it is accepted;
* the bytes of *incomplete* frames buffered (``BusConfig.max_partial_bytes``):
  a frame may announce up to ``max_frame_size`` (16 MiB) and then trickle, so
  without a shared budget N connections could pin N x 16 MiB.  A connection
  whose incomplete frame would take the total over the budget is closed (it is
  the one asking; the others keep what they hold).

And one per-connection clock, ``BusConfig.frame_timeout``: a frame that stays
incomplete that long ends the connection (a slow trickle keeps the heartbeat
happy, since any byte proves liveness, so the heartbeat cannot catch it).

Everything here is a counter updated once per received chunk, never per
message.
"""

from __future__ import annotations

import logging

from ..errors import RemoteProtocolError
from ..ratelog import RateLimitedLog

__all__ = ["FrameWatch", "ServerLimits"]

logger = logging.getLogger("meshlink.bus")

class ServerLimits:
    """The resources shared by every connection of one server.

    Args:
        max_connections: connections open at once; one more is refused.
        max_partial_bytes: bytes of incomplete frames buffered at once.

    Attributes:
        connections: connections open now.
        partial_bytes: bytes of incomplete frames buffered now.
        log: the rate-limited warnings of this server.
    """

    __slots__ = ("connections", "log", "max_connections", "max_partial_bytes", "partial_bytes")

    def __init__(self, max_connections: int, max_partial_bytes: int) -> None:
        if max_connections < 1 or max_partial_bytes < 1:
            raise ValueError("max_connections and max_partial_bytes must be >= 1")
        self.max_connections = max_connections
        self.max_partial_bytes = max_partial_bytes
        self.connections = 0
        self.partial_bytes = 0
        self.log = RateLimitedLog(logger)

    def admit(self) -> bool:
        """Count one more connection, or return False (and warn) at the limit."""
        if self.connections >= self.max_connections:
            self.log.warning(
                "connections",
                "bus server refused a connection: %d open, the limit (max_connections)",
                self.connections,
            )
            return False
        self.connections += 1
        return True

    def release(self) -> None:
        """A connection admitted by :meth:`admit` ended."""
        self.connections -= 1


class FrameWatch:
    """The incomplete frame of one connection: its size (against the server's
    budget) and since when it has been waiting (against ``frame_timeout``).

    Args:
        limits: the server's shared budget, or ``None`` (no shared budget).

    Attributes:
        held: bytes of an incomplete frame counted in ``limits`` now.
        since: ``trio.current_time()`` when the current incomplete frame began
            to arrive; meaningless while ``start < 0``.
        start: the core's position where that frame begins, -1 when none.
    """

    __slots__ = ("held", "limits", "since", "start")

    def __init__(self, limits: ServerLimits | None) -> None:
        self.limits = limits
        self.held = 0
        self.since = 0.0
        self.start = -1

    def update(self, start: int, partial: int, now: float) -> None:
        """Record the core's state after it parsed every complete frame.

        Args:
            start: where the incomplete frame begins (the core's position).
            partial: its bytes buffered so far (0: none).
            now: when its last chunk arrived.

        Raises:
            RemoteProtocolError: the server's budget for incomplete frames
                cannot hold this one (the connection must end).
        """
        if not partial:
            self.start = -1
        elif start != self.start:  # another frame than last time: its clock starts
            self.start = start
            self.since = now
        limits = self.limits
        if limits is None or partial == self.held:
            return
        total = limits.partial_bytes - self.held + partial
        if partial > self.held and total > limits.max_partial_bytes:
            limits.log.warning(
                "partial",
                "bus server closed a connection: its incomplete frame of %d bytes would take "
                "the server's incomplete frames to %d bytes, over the budget of %d "
                "(max_partial_bytes)",
                partial,
                total,
                limits.max_partial_bytes,
            )
            self.release()
            raise RemoteProtocolError(
                f"incomplete frame of {partial} bytes refused: the server's budget of "
                f"{limits.max_partial_bytes} bytes for incomplete frames is used up"
            )
        limits.partial_bytes = total
        self.held = partial

    def release(self) -> None:
        """Give back what this connection holds in the budget (it ended)."""
        if self.limits is not None:
            self.limits.partial_bytes -= self.held
        self.held = 0

    def deadline(self, timeout: float, now: float) -> float:
        """When the current incomplete frame times out; ``now + timeout`` if none."""
        return self.since + timeout if self.start >= 0 else now + timeout
