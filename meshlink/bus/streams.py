"""Message streams: ordered, credit-controlled message channels inside one connection.

Either end opens a stream with an id from its own id space (so the two ends
never collide; each frame says whose space its id is in) and names the peer's
stream handler that serves it.  Each direction has a credit window in bytes,
the receiver's ``stream_window``, so a bulk transfer never queues more than
that at the receiver (see :mod:`.flow`).

A stream ends in one of two ways: an end frame (a normal end of one
direction: the reader gets ``EndOfChannel`` once it has read everything) or a
reset (the sender abandons the stream, with an error or without).  A reset with
an error cancels the peer's handler.

:class:`StreamTable` keeps the streams of one connection, takes the stream
frames the reader dispatches, and runs the handler of each stream the peer
opens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import RemoteProtocolError
from .errors import RemoteError
from .events import Channel, Credit, StreamEnd, StreamOpen, StreamReset
from .flow import CreditIn, CreditOut, Wakeup
from .handlers import StreamHandler
from .link import Link

__all__ = ["MessageStream", "StreamTable"]


class MessageStream(trio.abc.AsyncResource):
    """A bidirectional, ordered stream of messages inside one connection.

    Each direction has a credit window in bytes (the receiver's
    ``stream_window``), so bulk transfers never queue more than that.  Send
    with :meth:`send`, end your direction with :meth:`send_eof`, receive with
    :meth:`receive` or ``async for message in stream``.
    """

    def __init__(
        self,
        link: Link,
        table: StreamTable,
        id: int,
        opened_by_us: bool,
        peer_window: int,
        window: int,
    ) -> None:
        self._link = link
        self._table = table
        self.id = id
        self._opened_by_us = opened_by_us
        self._credit_out = CreditOut(peer_window)
        self._credit_in = CreditIn(window)
        self._queue: deque[tuple[Any, int]] = deque()  # (message, wire size)
        self._wakeup = Wakeup()
        self._peer_ended = False
        self._peer_reset: StreamReset | None = None
        self._we_ended = False
        self._closed = False
        self._handler_scope = trio.CancelScope()

    async def send(self, message: Any) -> None:
        """Send one message.

        Args:
            message: any msgpack-serialisable value.

        Raises:
            trio.BrokenResourceError: the peer closed or reset the stream (a
                :class:`RemoteError` is chained when it reported one).
            trio.ClosedResourceError: we closed the stream (or called
                :meth:`send_eof`).
            ConnectionLost: the connection failed.
            LocalProtocolError: the message cannot be packed or is too large.

        Cancellation:
            Safe: the message is queued whole or not at all.  A checkpoint
            when waiting and once every 256 calls, as ``Connection.notify``.

        Backpressure:
            Waits while the peer's window for this stream is full (it has not
            consumed earlier messages), or while the outgoing buffer is full.
        """
        link = self._link
        await link.schedule_point()
        self._check_send()
        data = link.pack_stream_data(self.id, self._opened_by_us, message)
        if not await link.send_flow(data, self._credit_out):
            self._check_send()  # raises: the stream was closed or reset meanwhile

    def _check_send(self) -> None:
        if self._closed or self._we_ended:
            raise trio.ClosedResourceError("stream closed for sending")
        reset = self._peer_reset
        if reset is not None:
            err = trio.BrokenResourceError("the peer closed the stream")
            if reset.type:
                err.__cause__ = RemoteError(reset.type, reset.message)
            raise err
        self._link.check_usable()

    async def send_eof(self) -> None:
        """Tell the peer we will send no more messages (its receive ends normally).

        Cancellation:
            Safe.  Calling it twice is a no-op.
        """
        await trio.lowlevel.checkpoint()
        if not self._we_ended and not self._closed:
            self._we_ended = True
            self._link.send_control(StreamEnd(self.id, self._opened_by_us))

    async def receive(self) -> Any:
        """Return the next message.

        Raises:
            trio.EndOfChannel: the peer ended its direction and all was consumed.
            RemoteError: the peer's handler raised (or refused the stream).
            trio.BrokenResourceError: the peer reset the stream without an end.
            ConnectionLost: the connection failed.
            trio.ClosedResourceError: we closed the stream.
            trio.BusyResourceError: another task is receiving on it.

        Cancellation:
            Safe: no message is lost.

        Backpressure:
            Consuming returns credit, letting the peer send more.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
            if self._peer_ended:
                raise trio.EndOfChannel
            reset = self._peer_reset
            if reset is not None:
                if reset.type:
                    raise RemoteError(reset.type, reset.message)
                raise trio.BrokenResourceError("the peer reset the stream")
            self._link.check_usable()
            await self._wakeup.wait()
        data, size = self._queue.popleft()
        amount = self._credit_in.consume(size, not self._queue)
        if amount:
            self._link.send_control(Credit(Channel.STREAM, amount, self.id, self._opened_by_us))
        return data

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Close the stream: end our direction and discard what the peer sends next.

        Cancellation:
            The stream is closed even when cancelled.
        """
        self._close_with(None)
        await trio.lowlevel.checkpoint()

    def _abort(self, type_: str, message: str) -> None:
        """Reset with an error: the peer's handler (if any) is cancelled."""
        self._close_with((type_, message))

    def _close_with(self, error: tuple[str, str] | None) -> None:
        if self._closed:
            return
        self._closed = True
        send_control = self._link.send_control
        if error is not None:
            send_control(StreamReset(self.id, self._opened_by_us, *error))
        else:
            if not self._we_ended:
                self._we_ended = True
                send_control(StreamEnd(self.id, self._opened_by_us))
            if not self._peer_ended and self._peer_reset is None:
                send_control(StreamReset(self.id, self._opened_by_us))
        self._queue.clear()
        self._wakeup.set()
        self._credit_out.close()
        if self._opened_by_us:
            self._forget()

    def _forget(self) -> None:
        self._table.streams.pop((self._opened_by_us, self.id), None)

    # --- called by the reader ---

    def _on_data(self, data: Any, size: int) -> None:
        if self._peer_ended or self._peer_reset is not None:
            raise RemoteProtocolError(f"data on stream {self.id} after its end")
        self._credit_in.receive(size, "stream")
        if self._closed:
            # deliberate: we stopped reading; return the credit at once
            self._credit_in.unacked -= size
            return
        self._queue.append((data, size))
        self._wakeup.set()

    def _on_end(self) -> None:
        if self._peer_ended or self._peer_reset is not None:
            raise RemoteProtocolError(f"second end of stream {self.id}")
        self._peer_ended = True
        self._wakeup.set()

    def _on_reset(self, event: StreamReset) -> None:
        self._peer_reset = event
        self._wakeup.set()
        self._credit_out.close()
        if event.type and not self._opened_by_us:
            self._handler_scope.cancel()


class StreamTable:
    """The message streams of one connection, keyed by (opened by us, id).

    Args:
        link: what the streams may ask of the connection.
        window: our ``stream_window``: bytes buffered here per stream.
        max_concurrency: streams the peer may run here at once.

    Attributes:
        streams: the open streams.
        peer_window: the peer's ``stream_window`` (set once its hello is in).
    """

    __slots__ = (
        "_last_peer_id",
        "_link",
        "_max_concurrency",
        "_next_id",
        "_peer_streams",
        "_window",
        "peer_window",
        "streams",
    )

    def __init__(self, link: Link, window: int, max_concurrency: int) -> None:
        self._link = link
        self._window = window
        self._max_concurrency = max_concurrency
        self.peer_window = 0
        self.streams: dict[tuple[bool, int], MessageStream] = {}
        self._next_id = 0
        self._last_peer_id = -1
        self._peer_streams = 0  # streams the peer opened whose handler still runs

    @asynccontextmanager
    async def open(self, method: str, args: tuple[Any, ...]) -> AsyncIterator[MessageStream]:
        """Open a stream served by the peer's handler ``method`` (``Connection.open_stream``)."""
        link = self._link
        await link.schedule_point()
        link.check_usable()
        stream_id = self._next_id
        data = link.pack(StreamOpen(stream_id, method, list(args)))
        self._next_id += 1
        stream = MessageStream(link, self, stream_id, True, self.peer_window, self._window)
        self.streams[(True, stream_id)] = stream
        try:
            await link.send_flow(data, None)
        except BaseException:
            del self.streams[(True, stream_id)]
            raise
        try:
            yield stream
        except BaseException as exc:
            stream._abort(type(exc).__name__, str(exc))
            raise
        else:
            await stream.aclose()

    def accept(self, event: StreamOpen, served: bool) -> MessageStream | None:
        """Take a stream the peer opens; ``served``: we have a handler for it.

        Returns the stream for its handler to run, or None when it was refused
        (a reset tells the peer why).
        """
        if event.id <= self._last_peer_id:
            raise RemoteProtocolError(f"stream id {event.id} reused")
        self._last_peer_id = event.id
        send_control = self._link.send_control
        if not served:
            send_control(
                StreamReset(event.id, False, "MethodNotFound", f"no stream {event.method!r:.80}")
            )
            return None
        if self._peer_streams >= self._max_concurrency:
            send_control(StreamReset(event.id, False, "TooManyStreams", "stream limit reached"))
            return None
        stream = MessageStream(self._link, self, event.id, False, self.peer_window, self._window)
        self.streams[(False, event.id)] = stream
        self._peer_streams += 1
        return stream

    async def run_handler(self, stream: MessageStream, fn: StreamHandler, args: list[Any]) -> None:
        """Run the handler of a stream the peer opened; close or reset the stream after."""
        try:
            with stream._handler_scope:
                try:
                    await fn(stream, *args)
                except Exception as exc:
                    stream._abort(type(exc).__name__, str(exc))
                else:
                    await stream.aclose()
        finally:
            self._peer_streams -= 1
            stream._forget()

    def wake_all(self) -> None:
        """Wake every task waiting on a stream: the connection ended."""
        for stream in list(self.streams.values()):
            stream._wakeup.set()
            stream._credit_out.lot.unpark_all()

    # The reader's frame handlers.  None of them waits.

    def find(self, id: int, opened_by_sender: bool) -> MessageStream | None:
        ours = not opened_by_sender
        stream = self.streams.get((ours, id))
        if stream is None:
            known = id < self._next_id if ours else id <= self._last_peer_id
            if not known:
                raise RemoteProtocolError(f"frame for stream {id} that was never opened")
        return stream  # None: deliberate no-op, a frame for a stream we already closed

    def on_data(self, id: int, opened_by_sender: bool, data: Any, size: int) -> None:
        stream = self.find(id, opened_by_sender)
        if stream is not None:
            stream._on_data(data, size)

    def on_end(self, event: StreamEnd) -> None:
        stream = self.find(event.id, event.opened_by_sender)
        if stream is not None:
            stream._on_end()

    def on_reset(self, event: StreamReset) -> None:
        stream = self.find(event.id, event.opened_by_sender)
        if stream is not None:
            stream._on_reset(event)

    def on_credit(self, event: Credit) -> None:
        stream = self.find(event.id, event.opened_by_sender)
        if stream is not None:
            stream._credit_out.refill(event.amount)
