"""Where each incoming frame goes: the frame sink the reader hands to the core.

The protocol core (:mod:`.proto`) decodes frames and calls a
:class:`~.proto.FrameSink`; :class:`Dispatcher` is that sink for a connection.
The hot kinds (notifications, requests, replies, publishes, stream data) go
straight to the bound method of their owner (:mod:`.rpc`, :mod:`.pubsub`,
:mod:`.streams`), so the core calls the owner with no hop in between; the rare
kinds come through :meth:`Dispatcher.event` and are routed by type.

None of this waits: the reader runs it for every frame, and a slow
application must never stall the reader (see :mod:`.connection`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

from ..errors import RemoteProtocolError
from .events import (
    Cancel,
    Channel,
    Close,
    ConnectionClosed,
    Credit,
    Event,
    Ping,
    Pong,
    StreamEnd,
    StreamOpen,
    StreamReset,
    Subscribe,
    Subscribed,
    Unsubscribe,
)
from .handlers import Handlers
from .proto import BusProtocol
from .pubsub import PubSub
from .rpc import Rpc
from .streams import StreamTable
from .writer import Writer

__all__ = ["CONTROL_SLACK", "Dispatcher"]

#: Bytes of control frames (acks, refusals, credit) that may wait for the
#: peer beyond the send buffer and one frame, before a peer that keeps asking
#: for more of them is taken for one that never reads.
CONTROL_SLACK: Final = 1 << 20


class Dispatcher:
    """The frame handlers of one connection, under the names a FrameSink uses.

    Args:
        proto: the protocol core (packs the pong and subscribe acks).
        writer: the outgoing buffer (control frames skip its limit).
        rpc, pubsub, streams: the owners of the frames.
        handlers: what we serve (its stream handlers are looked up by name).
        spawn: start a background task of the connection.
        refill_notify: the peer returned notify credit (bytes).
        peer_closed: the peer ended the connection; True for a close frame,
            False for a bare end of the transport.
    """

    __slots__ = (
        "_append",
        "_pong_at",
        "_writer",
        "_peer_closed",
        "_proto",
        "_pubsub",
        "_refill_notify",
        "_rpc",
        "_spawn",
        "_handlers",
        "_streams",
        "error",
        "notifications",
        "publish",
        "reply",
        "request",
        "stream_data",
    )

    def __init__(
        self,
        proto: BusProtocol,
        writer: Writer,
        rpc: Rpc,
        pubsub: PubSub,
        streams: StreamTable,
        handlers: Handlers,
        *,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        refill_notify: Callable[[int], None],
        peer_closed: Callable[[bool], None],
    ) -> None:
        self._proto = proto
        self._writer = writer
        self._append = writer.append
        self._pong_at = -1  # writer.sends when the last pong was queued
        self._rpc = rpc
        self._pubsub = pubsub
        self._streams = streams
        self._handlers = handlers
        self._spawn = spawn
        self._refill_notify = refill_notify
        self._peer_closed = peer_closed
        # The hot kinds: the owners' own methods.
        self.notifications = rpc.on_notifications
        self.request = rpc.on_request
        self.reply = rpc.on_reply
        self.error = rpc.on_error
        self.publish = pubsub.on_publish
        self.stream_data = streams.on_data

    def event(self, event: Event) -> None:
        """The rare frame kinds."""
        proto = self._proto
        t = type(event)
        if t is Credit:
            assert isinstance(event, Credit)
            if event.channel is Channel.NOTIFY:
                self._refill_notify(event.amount)
            elif event.channel is Channel.SUBSCRIPTION:
                self._pubsub.on_credit(event)
            else:
                self._streams.on_credit(event)
        elif t is Cancel:
            assert isinstance(event, Cancel)
            self._rpc.on_cancel(event.id)
        elif t is Ping:
            assert isinstance(event, Ping)
            # One pong queued at most: a peer that pings without reading
            # would otherwise grow our buffer without limit.  Any pong proves
            # liveness, so the pings it covers need no pong of their own.
            sends = self._writer.sends
            if self._pong_at != sends:
                self._pong_at = sends
                self._append(proto.send(Pong(event.nonce)))
        elif t is Pong:
            pass  # deliberate: any incoming byte already proved liveness
        elif t is Subscribe:
            assert isinstance(event, Subscribe)
            self._check_peer_reads()
            self._pubsub.on_subscribe(event)
            self._append(proto.send(Subscribed(event.id)))
        elif t is Subscribed:
            assert isinstance(event, Subscribed)
            self._pubsub.on_subscribed(event)
        elif t is Unsubscribe:
            assert isinstance(event, Unsubscribe)
            self._pubsub.on_unsubscribe(event)
        elif t is StreamOpen:
            assert isinstance(event, StreamOpen)
            self._on_stream_open(event)
        elif t is StreamEnd:
            assert isinstance(event, StreamEnd)
            self._streams.on_end(event)
        elif t is StreamReset:
            assert isinstance(event, StreamReset)
            self._streams.on_reset(event)
        elif t is Close:
            self._peer_closed(True)
        elif t is ConnectionClosed:
            self._peer_closed(False)
        else:  # pragma: no cover - the core hands the other kinds to the fast methods
            raise RemoteProtocolError(f"unexpected frame {event!r:.80}")

    def _check_peer_reads(self) -> None:
        """Refuse to answer a peer that asks for answers but never reads them.

        Acks and refusals are control frames, which skip the send buffer's
        limit; without this a peer could grow our buffer one tiny frame at a
        time.  A peer that reads never gets here: application frames keep the
        buffer under ``buffer_size`` plus one frame of the peer's size limit.

        Raises:
            RemoteProtocolError: more than that plus :data:`CONTROL_SLACK`
                bytes wait for the peer.
        """
        writer = self._writer
        queued = len(writer.outbuf)
        hello = self._proto.peer_hello
        assert hello is not None
        if queued > writer.buffer_size + hello.max_frame_size + CONTROL_SLACK:
            raise RemoteProtocolError(
                f"the peer does not read what it asks for: {queued} bytes wait to be sent to it"
            )

    def _on_stream_open(self, event: StreamOpen) -> None:
        self._check_peer_reads()
        fn = self._handlers.streams.get(event.method)
        stream = self._streams.accept(event, fn is not None)
        if stream is not None:
            assert fn is not None
            self._spawn(partial(self._streams.run_handler, stream, fn, event.args))
