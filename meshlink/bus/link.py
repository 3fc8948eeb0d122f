"""What a subscription or a message stream may ask of the connection it lives on.

A :class:`~.pubsub.Subscription` and a :class:`~.streams.MessageStream` send
frames, wait for room and credit, and must learn when the connection is gone;
nothing else.  The connection hands each of them a :class:`Link` holding just
those operations, so they never read its private state, and the import graph
stays one way: connection -> pubsub, streams -> link -> flow.

Each field is a bound method of the connection, its writer or its protocol
core, stored as is: calling ``link.send_flow(...)`` costs what calling the
connection's own method did, which matters on the per-message paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .events import Credit, Event, StreamEnd, StreamReset, Unsubscribe
from .flow import CreditOut

__all__ = ["Link"]


class Link:
    """The connection's operations available to the objects living on it.

    Attributes:
        check_usable: raises ``ConnectionLost`` or ``trio.ClosedResourceError``
            once the connection has ended.
        check_readable: the same, except that after a clean close by the peer
            it raises ``trio.EndOfChannel`` (queued data was all consumed).
        pack: the bytes of a (rare) event, as the protocol core packs it.
        pack_stream_data: the bytes of one stream message (the hot kind).
        send_control: queue a control frame, skipping the buffer limit; does
            nothing once the connection has ended.
        send_flow: queue an application frame once its credit window (if any)
            and the outgoing buffer allow; False if the credit was closed.
        schedule_point: a checkpoint now and then (``Writer.schedule_point``).
    """

    __slots__ = (
        "check_readable",
        "check_usable",
        "pack",
        "pack_stream_data",
        "schedule_point",
        "send_control",
        "send_flow",
    )

    def __init__(
        self,
        *,
        check_usable: Callable[[], None],
        check_readable: Callable[[], None],
        pack: Callable[[Event], bytes],
        pack_stream_data: Callable[[int, bool, Any], bytes],
        send_control: Callable[[Credit | StreamEnd | StreamReset | Unsubscribe], None],
        send_flow: Callable[[bytes, CreditOut | None], Awaitable[bool]],
        schedule_point: Callable[[], Awaitable[None]],
    ) -> None:
        self.check_usable = check_usable
        self.check_readable = check_readable
        self.pack = pack
        self.pack_stream_data = pack_stream_data
        self.send_control = send_control
        self.send_flow = send_flow
        self.schedule_point = schedule_point
