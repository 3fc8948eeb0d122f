"""Publish/subscribe on a bus connection: subscriptions both ways, and their routing.

Either end may subscribe to the other's topics.  A subscription we hold is a
:class:`Subscription`: it sends a subscribe frame with an id we choose, waits
for the peer's ack, and queues what the peer publishes to that id.  A
subscription the peer holds on us is a :class:`RemoteSub`: a topic prefix and,
for the ``"block"`` policy, the credit window of the subscriber's queue.
:class:`PubSub` keeps both tables for one connection and takes the
subscription frames the reader dispatches.

Publishing walks :attr:`PubSub.remote` and sends the message to every
subscription whose prefix starts the topic; ``Connection.publish`` does that
walk inline, since one more coroutine call per message is not free.

Two overflow policies: ``"block"`` is credit-based (the publisher waits while
the subscriber's window is full); ``"drop_oldest"`` takes no credit, its queue
has a fixed length and drops the oldest message (counted) when full.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType
from typing import Any

import trio

from ..errors import RemoteProtocolError
from .events import Channel, Credit, Subscribe, Subscribed, Unsubscribe
from .flow import CreditIn, CreditOut, Wakeup
from .link import Link

__all__ = ["PubSub", "RemoteSub", "Subscription"]


class RemoteSub:
    """A subscription the peer holds on us: we publish to it the topics under ``prefix``."""

    __slots__ = ("closed", "credit", "id", "prefix")

    def __init__(self, id: int, prefix: str, window: int) -> None:
        self.id = id
        self.prefix = prefix
        self.credit = CreditOut(window) if window else None
        self.closed = False


class PubSub:
    """The subscriptions of one connection, ours and the peer's.

    Args:
        link: what the subscriptions may ask of the connection.
        max_remote: subscriptions the peer may hold on us at once.

    Attributes:
        subs: our active subscriptions, by id.
        next_id: the id our next subscription gets (ids only grow).
        remote: the peer's subscriptions on us, by id.
        last_remote_id: the highest id the peer subscribed with.
    """

    __slots__ = ("_link", "_max_remote", "last_remote_id", "next_id", "remote", "subs")

    def __init__(self, link: Link, max_remote: int = 1024) -> None:
        self._link = link
        self._max_remote = max_remote
        self.subs: dict[int, Subscription] = {}
        self.next_id = 0
        self.remote: dict[int, RemoteSub] = {}
        self.last_remote_id = -1

    def subscription(
        self, prefix: str, drop_oldest: bool, queue_size: int, window: int
    ) -> Subscription:
        """A new, not yet active subscription to the peer's topics under ``prefix``."""
        return Subscription(self._link, self, prefix, drop_oldest, queue_size, window)

    def wake_all(self) -> None:
        """Wake every task waiting on a subscription: the connection ended."""
        for rsub in self.remote.values():
            if rsub.credit is not None:
                rsub.credit.lot.unpark_all()
        for sub in list(self.subs.values()):
            sub._wakeup.set()

    # The reader's frame handlers.  None of them waits.

    def on_publish(self, id: int, topic: str, data: Any, size: int) -> None:
        sub = self.subs.get(id)
        if sub is not None:
            sub._deliver(topic, data, size)
        elif id >= self.next_id:
            raise RemoteProtocolError(f"publish to unknown subscription {id}")
        # else: deliberate no-op, we unsubscribed and the message crossed it

    def on_subscribe(self, event: Subscribe) -> None:
        """Register the peer's subscription (the caller acks it)."""
        if event.id <= self.last_remote_id:
            raise RemoteProtocolError(f"subscription id {event.id} reused")
        self.last_remote_id = event.id
        if len(self.remote) >= self._max_remote:
            # The wire has no refusal for a subscription: ending the connection
            # is the one answer that keeps the table bounded.
            raise RemoteProtocolError(
                f"peer exceeded the subscription limit of {self._max_remote}"
            )
        self.remote[event.id] = RemoteSub(event.id, event.prefix, event.window)

    def on_subscribed(self, event: Subscribed) -> None:
        sub = self.subs.get(event.id)
        if sub is not None:
            sub._acked = True
            sub._wakeup.set()
        elif event.id >= self.next_id:
            raise RemoteProtocolError(f"ack of unknown subscription {event.id}")

    def on_unsubscribe(self, event: Unsubscribe) -> None:
        rsub = self.remote.pop(event.id, None)
        if rsub is None:
            raise RemoteProtocolError(f"unsubscribe of unknown subscription {event.id}")
        rsub.closed = True
        if rsub.credit is not None:
            rsub.credit.close()

    def on_credit(self, event: Credit) -> None:
        rsub = self.remote.get(event.id)
        if rsub is not None and rsub.credit is not None:
            rsub.credit.refill(event.amount)
        elif event.id > self.last_remote_id:
            raise RemoteProtocolError(f"credit for unknown subscription {event.id}")


class Subscription:
    """A subscription to the peer's published messages (see :meth:`Connection.subscribe`).

    An async context manager (subscribes on entry, unsubscribes on exit) and an
    async iterator of ``(topic, message)`` pairs.

    Attributes:
        prefix: the topic prefix.
        dropped: messages dropped because the queue was full (``"drop_oldest"``).
    """

    def __init__(
        self,
        link: Link,
        router: PubSub,
        prefix: str,
        drop_oldest: bool,
        queue_size: int,
        window: int,
    ) -> None:
        self._link = link
        self._router = router
        self.prefix = prefix
        self.dropped = 0
        self._drop_oldest = drop_oldest
        self._queue: deque[tuple[str, Any, int]] = deque()  # (topic, message, wire size)
        self._queue_size = queue_size
        self._credit = CreditIn(window)
        self._wakeup = Wakeup()
        self._acked = False
        self._id = -1
        self._active = False
        self._sent = False  # the subscribe frame is queued: the peer will know the id

    @property
    def policy(self) -> str:
        """``"block"`` or ``"drop_oldest"``."""
        return "drop_oldest" if self._drop_oldest else "block"

    @property
    def queued(self) -> int:
        """Messages received and not yet consumed."""
        return len(self._queue)

    async def __aenter__(self) -> Subscription:
        """Subscribe; returns once the peer confirmed (later publishes reach us).

        Raises:
            ConnectionLost, trio.ClosedResourceError: the connection is unusable.

        Cancellation:
            Safe: a cancelled subscribe is withdrawn.
        """
        link = self._link
        router = self._router
        await trio.lowlevel.checkpoint_if_cancelled()
        link.check_usable()
        if self._active:
            raise trio.BusyResourceError("subscription already active")
        self._id = router.next_id
        router.next_id += 1
        window = 0 if self._drop_oldest else self._credit.window
        data = link.pack(Subscribe(self._id, self.prefix, window))
        router.subs[self._id] = self
        self._active = True
        try:
            await link.send_flow(data, None)
            self._sent = True
            while not self._acked:
                link.check_usable()
                await self._wakeup.wait()
        except BaseException:
            await self._unsubscribe()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        if self._active:
            self._active = False
            self._router.subs.pop(self._id, None)
            if self._sent:
                self._link.send_control(Unsubscribe(self._id))
        await trio.lowlevel.checkpoint()

    def _deliver(self, topic: str, data: Any, size: int) -> None:
        if self._drop_oldest:
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.dropped += 1
        else:
            self._credit.receive(size, "subscription")
        self._queue.append((topic, data, size))
        self._wakeup.set()

    async def receive(self) -> tuple[str, Any]:
        """Return the next ``(topic, message)``.

        Raises:
            trio.EndOfChannel: the peer closed the connection cleanly and every
                queued message was consumed.
            ConnectionLost: the connection failed (queued messages come first).
            trio.ClosedResourceError: the subscription or connection was closed here.
            trio.BusyResourceError: another task is receiving on it.

        Cancellation:
            Safe: no message is lost.

        Backpressure:
            Consuming returns credit to the publisher (``"block"`` policy).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            if not self._active:
                raise trio.ClosedResourceError("subscription is not active")
            self._link.check_readable()
            await self._wakeup.wait()
        topic, data, size = self._queue.popleft()
        if not self._drop_oldest:
            amount = self._credit.consume(size, not self._queue)
            if amount:
                self._link.send_control(Credit(Channel.SUBSCRIPTION, amount, self._id))
        return topic, data

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
