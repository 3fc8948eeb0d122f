"""Trio adapter of the message bus: one connection, its tasks and its lifecycle.

Theory of operation
-------------------
A :class:`Connection` drives one :class:`~.proto.BusProtocol` over one trio
stream (vchan, TCP, TLS, an in-memory pair: anything with
``send_all``/``receive_some``) and runs its tasks: the *writer*
(:mod:`.writer`); the *reader*, which feeds each chunk to the core and has
every complete frame in it dispatched (:mod:`.dispatch`) before the next read;
the *timers*, which ping every ``heartbeat_interval``, declare the peer
lost when nothing at all arrived for ``heartbeat_timeout``, and end the
connection when a frame stays incomplete for ``frame_timeout``
(:mod:`.limits`); the *notify
runner* and the request *workers* (:mod:`.rpc`); one task per incoming stream
(:mod:`.streams`).

Dispatch never waits, which keeps the reader (and with it replies, credit and
pongs) moving however slow the application is: a slow consumer cannot stall
the heartbeat, which measures liveness, not speed.  Memory stays bounded by the
outgoing buffer's limit (:mod:`.writer`) and the credit windows of whatever
queues at the receiver (:mod:`.flow`).

The hottest entry points (:meth:`Connection.notify`, :meth:`Connection.publish`)
stay here and touch the writer's buffer inline: a function call per message is
a measurable share of the budget.

Closing: ``aclose`` (or leaving ``Connection.open``) cancels the handlers,
fails pending operations with :class:`trio.ClosedResourceError`, queues a close
frame, lets the writer flush for at most ``close_timeout`` and closes the
transport.  A reply that a worker is writing directly at that moment is let
finish first, within the same ``close_timeout`` (its send has no cancel scope
of its own: see :mod:`.writer`); handlers are cancelled after it.  A dead
peer, a heartbeat timeout or malformed input fails every pending operation
with :class:`~meshlink.ConnectionLost` (the cause chained).
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, Final, Literal

import trio

from ..errors import (
    ConnectionLost,
    HandshakeError,
    LocalProtocolError,
    MeshlinkError,
    RemoteProtocolError,
    SessionLost,
)
from .config import BusConfig
from .dispatch import Dispatcher
from .errors import PeerClosedError
from .events import (
    NEED_DATA,
    Cancel,
    Close,
    ConnectionClosed,
    Credit,
    Hello,
    Ping,
    StreamEnd,
    StreamReset,
    Unsubscribe,
)
from .flow import CreditOut
from .handlers import Handlers
from .limits import FrameWatch, ServerLimits
from .link import Link
from .proto import BusProtocol
from .pubsub import PubSub, Subscription
from .rpc import Reading, Rpc
from .streams import MessageStream, StreamTable
from .writer import SCHEDULE_EVERY, Writer

__all__ = ["CURRENT", "FEATURES", "Connection"]

logger = logging.getLogger("meshlink.bus")

#: Features this implementation speaks; the connection uses the intersection.
FEATURES: Final = ("rpc", "cancel", "notify", "pubsub", "stream", "heartbeat")

#: The connection whose handler runs in the current context (set by the
#: reader, the notify runner and, through them, every handler task).
CURRENT: contextvars.ContextVar[Connection] = contextvars.ContextVar("meshlink_bus_connection")


class Connection:
    """One end of a bus connection over a trio stream.

    Create it with :meth:`Connection.open` (or :func:`serve_bus` on a server);
    the protocol is symmetric, so either end may call, notify, publish,
    subscribe and open streams, and either end may serve handlers.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        handlers: Handlers | None = None,
        *,
        name: str = "",
        config: BusConfig | None = None,
        server_limits: ServerLimits | None = None,
    ) -> None:
        cfg = config or BusConfig()
        self._cfg = cfg
        self._stream = stream
        # What the reader reads from: the stream, or the stream inside it when
        # it wraps bytes read ahead (the server's PrefixedStream), which are
        # then fed to the core first.  A Python frame less on every receive.
        self._rx_stream: trio.abc.ReceiveStream = stream
        self._read_ahead = b""
        split = getattr(stream, "split_read_ahead", None)
        if split is not None:
            self._read_ahead, self._rx_stream = split()
        self._handlers = handlers or Handlers()
        self.name = name
        self._proto = BusProtocol.from_config(cfg, name, FEATURES)
        self._pack_notify = self._proto.pack_notify
        self._writer = Writer(stream, cfg.send_buffer_size, self._check_usable, self._fail)
        #: Queue a control frame, skipping the buffer limit.
        self._append = self._writer.append
        # lifecycle
        self._error: BaseException | None = None
        self._closed_locally = False
        self._peer_closed_cleanly = False
        self._shutdown = trio.Event()
        self._closed = trio.Event()
        self._work: trio.Nursery | None = None
        self._last_rx = 0.0
        self.bytes_in = 0  # read by meshlink.stats; once per chunk, not per frame
        self._watch = FrameWatch(server_limits)  # the incomplete frame, if any
        self._rpc = Rpc(
            self._proto,
            self._writer,
            self._handlers,
            cfg.notify_window,
            check_usable=self._check_usable,
            send_control=self._send_control,
            spawn=self._spawn,
            read=self._read,
        )
        self._notify_out = CreditOut(1)  # the peer's notify window, once its hello is in
        # what subscriptions and streams may ask of us
        link = Link(
            check_usable=self._check_usable,
            check_readable=self._check_readable,
            pack=self._proto.send,
            pack_stream_data=self._proto.pack_stream_data,
            send_control=self._send_control,
            send_flow=self._writer.send_flow,
            schedule_point=self._writer.schedule_point,
        )
        self._pubsub = PubSub(link, cfg.max_subscriptions)
        self._streams = StreamTable(link, cfg.stream_window, cfg.max_concurrency)
        self._sink = Dispatcher(
            self._proto,
            self._writer,
            self._rpc,
            self._pubsub,
            self._streams,
            self._handlers,
            spawn=self._spawn,
            refill_notify=self._refill_notify,
            peer_closed=self._on_peer_closed,
        )

    # --- opening -------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        stream: trio.abc.Stream,
        handlers: Handlers | None = None,
        *,
        name: str = "",
        config: BusConfig | None = None,
        server_limits: ServerLimits | None = None,
    ) -> AsyncIterator[Connection]:
        """Run a bus connection over ``stream`` for the duration of an ``async with``.

        The handshake (protocol version, features, service names, limits) is
        complete when the block is entered.  Leaving the block closes the
        connection and the stream, and cancels every handler still running.

        Args:
            stream: any trio stream; a ``HalfCloseableStream`` is not required.
                The connection owns it from now on and closes it.
            handlers: what this end serves to the peer (may be ``None``).
            name: this end's service name, sent to the peer.
            config: limits and timers; :class:`BusConfig` defaults otherwise.
            server_limits: the budget this connection shares with the other
                connections of its server (:func:`serve_bus_listeners`).

        Returns:
            An async context manager yielding the :class:`Connection`.

        Raises:
            VersionMismatch: the peer speaks another protocol version (the peer
                raises it too).
            HandshakeError: no valid hello within ``handshake_timeout``, or the
                transport failed during the handshake (cause chained).

        Cancellation:
            Cancelling the handshake closes the stream.  Leaving the block by
            cancellation closes the connection without the graceful flush.

        Backpressure:
            The handshake waits for the peer's hello, at most
            ``handshake_timeout`` seconds.
        """
        conn = cls(stream, handlers, name=name, config=config, server_limits=server_limits)
        to_raise: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(conn._run)
            except BaseException as exc:
                to_raise = exc
            else:
                try:
                    yield conn
                except BaseException as exc:
                    to_raise = exc
                finally:
                    await conn.aclose()
        if to_raise is not None:
            raise to_raise

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        self._last_rx = trio.current_time()
        writer = self._writer
        handshake_error: BaseException | None = None
        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(writer.run)
                self._append(self._proto.send(self._proto.our_hello))
                try:
                    with trio.fail_after(self._cfg.handshake_timeout):
                        await self._handshake()
                except BaseException as exc:
                    handshake_error = exc
                    inner.cancel_scope.cancel()
                else:
                    task_status.started()
                    async with trio.open_nursery() as work:
                        self._work = work
                        work.start_soon(self._guard, partial(self._rpc.serve, None))
                        work.start_soon(self._guard, self._notify_runner)
                        if self._cfg.heartbeat_interval or self._cfg.frame_timeout:
                            work.start_soon(self._guard, self._timers)
                        await self._shutdown.wait()
                        # Graceful end: let the writer (and a frame being sent
                        # directly, see Writer.send_direct and send_reply) flush
                        # what is queued, the close frame included, unless the
                        # peer is known to be gone.
                        flush_deadline = trio.current_time() + self._cfg.close_timeout
                        peer_gone = isinstance(self._error, ConnectionLost)
                        direct = writer.direct_scope
                        if direct is not None:
                            if peer_gone:
                                direct.cancel()
                            else:
                                direct.deadline = flush_deadline
                        if writer.replying and not peer_gone:
                            # A worker's reply is unshielded: cancelling the
                            # workers now would cut it short.  Handlers go on
                            # meanwhile (no new reply starts: the rpc ended).
                            with trio.move_on_at(flush_deadline):
                                while writer.replying:
                                    await writer.reply_lot.park()
                        work.cancel_scope.cancel()
                    writer.closing = True
                    writer.wakeup.set()
                    if not peer_gone:
                        with trio.move_on_at(flush_deadline):
                            await writer.done.wait()
                    inner.cancel_scope.cancel()
        finally:
            writer.closing = True
            if self._error is None:
                self._error = trio.ClosedResourceError("bus connection was closed")
            self._wake_all()
            self._watch.release()
            await trio.aclose_forcefully(self._stream)
            self._closed.set()
        if handshake_error is not None:
            self._raise_handshake_error(handshake_error)

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Start a background task of this connection (see :meth:`_guard`)."""
        assert self._work is not None
        self._work.start_soon(self._guard, fn)

    async def _guard(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a background task; a bug in it fails this connection, not the nursery
        of a server that also serves other connections."""
        try:
            await fn()
        except Exception as exc:
            logger.exception("internal error in bus connection %r", self.name)
            lost = ConnectionLost(f"internal error: {exc!r}")
            lost.__cause__ = exc
            self._fail(lost)

    def _raise_handshake_error(self, exc: BaseException) -> None:
        if isinstance(exc, trio.TooSlowError):
            raise HandshakeError(
                f"no hello from the peer within {self._cfg.handshake_timeout} s"
            ) from exc
        if isinstance(exc, MeshlinkError):
            raise exc
        if isinstance(exc, trio.Cancelled) and self._error is not None:
            raise HandshakeError("the transport failed during the handshake") from self._error
        if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
            raise HandshakeError("the transport failed during the handshake") from exc
        raise exc

    async def _handshake(self) -> None:
        proto = self._proto
        if self._read_ahead:
            proto.receive_data(self._read_ahead)
            self._read_ahead = b""
        event = proto.next_event()
        while not isinstance(event, Hello):
            if isinstance(event, ConnectionClosed):
                raise HandshakeError("the peer closed the transport during the handshake")
            assert event is NEED_DATA
            data = await self._rx_stream.receive_some()
            self._last_rx = trio.current_time()
            proto.receive_data(data)
            event = proto.next_event()
            self._watch.update(*proto.incomplete(), self._last_rx)
        self._notify_out = CreditOut(event.notify_window)
        self._rpc.call_slots = trio.Semaphore(event.max_concurrency)
        self._streams.peer_window = event.stream_window

    # --- properties ------------------------------------------------------------

    @property
    def peer_name(self) -> str:
        """The service name the peer announced in its hello."""
        assert self._proto.peer_hello is not None
        return self._proto.peer_hello.name

    @property
    def peer_features(self) -> frozenset[str]:
        """The feature names the peer announced."""
        assert self._proto.peer_hello is not None
        return frozenset(self._proto.peer_hello.features)

    @property
    def features(self) -> frozenset[str]:
        """Features both ends speak (the ones this connection may use)."""
        return self.peer_features & frozenset(FEATURES)

    @property
    def _replying(self) -> bool:
        """A worker is sending a reply directly (the tests watch it)."""
        return self._writer.replying

    @property
    def closed(self) -> bool:
        """True once the connection ended (closed by us, by the peer, or failed)."""
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        """Why the connection ended: ``None`` while it is open or after a clean end.

        A :class:`~meshlink.RemoteProtocolError` (malformed input) or
        :class:`~meshlink.ConnectionLost` otherwise.
        """
        if self._closed_locally or self._peer_closed_cleanly:
            return None
        if isinstance(self._error, trio.ClosedResourceError):
            return None
        return self._error

    async def wait_closed(self) -> None:
        """Wait until the connection has ended and its transport is closed.

        Cancellation:
            Safe; has no effect on the connection.
        """
        await self._closed.wait()

    # --- closing and failing ---------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection: cancel handlers, flush, close the transport.

        Pending calls and waits in other tasks raise
        :class:`trio.ClosedResourceError`.  Calling it again is a no-op.

        Cancellation:
            The transport is closed even when cancelled (without the flush).

        Backpressure:
            Waits at most ``close_timeout`` seconds for queued frames to go out.
        """
        if self._error is None:
            self._closed_locally = True
            self._fail(trio.ClosedResourceError("bus connection was closed"), Close())
        await self._closed.wait()

    def abort(self, exc: ConnectionLost) -> None:
        """End the connection at once: pending and later operations raise ``exc``'s class.

        For the layer below the bus (``meshlink.connect`` when its session is
        lost); nothing is flushed and the peer is not told.  Idempotent.
        """
        self._fail(exc)

    def _fail(self, exc: BaseException, close: Close | None = None) -> None:
        if self._error is not None:
            return
        self._error = exc
        if close is not None:
            try:
                self._append(self._proto.send(close))
            except LocalProtocolError:
                pass  # deliberate: the core is already in error, nothing to tell the peer
        if isinstance(exc, MeshlinkError | trio.BrokenResourceError) and not (
            self._peer_closed_cleanly
        ):
            logger.debug("bus connection %r ended: %r", self.name, exc)
        self._wake_all()
        self._shutdown.set()

    def _wake_all(self) -> None:
        self._rpc.end(self._closed_error)
        self._writer.space_lot.unpark_all()
        self._notify_out.lot.unpark_all()
        self._pubsub.wake_all()
        self._streams.wake_all()

    def _closed_error(self) -> BaseException:
        """A fresh exception for one waiter, saying why the connection is unusable."""
        err = self._error
        if self._closed_locally:
            return trio.ClosedResourceError("bus connection was closed")
        if self._peer_closed_cleanly:
            exc: BaseException = ConnectionLost("the peer closed the bus connection")
        elif isinstance(err, ConnectionLost):
            exc = type(err)(str(err))  # SessionLost stays SessionLost
        else:
            exc = ConnectionLost(f"bus connection failed: {err}")
        exc.__cause__ = err
        return exc

    def _refill_notify(self, amount: int) -> None:
        self._notify_out.refill(amount)

    def _on_peer_closed(self, clean: bool) -> None:
        if clean:
            self._peer_closed_cleanly = True
            self._fail(ConnectionLost("the peer closed the bus connection"))
        else:
            self._fail(ConnectionLost("the peer closed the transport without a close frame"))

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._closed_error()

    def _check_readable(self) -> None:
        """``_check_usable``, but a clean close by the peer is an end of data."""
        if self._error is not None:
            if self._peer_closed_cleanly:
                raise trio.EndOfChannel
            raise self._closed_error()

    def _send_control(self, event: Cancel | Credit | StreamEnd | StreamReset | Unsubscribe) -> None:
        if self._error is None:
            self._append(self._proto.send(event))

    # --- reading -----------------------------------------------------------------

    async def _read(self, reading: Reading) -> bool:
        """The reader: read frames and hand them on (run by one task at a
        time, see :meth:`Rpc.serve`).

        After each chunk it runs the async handler of one request itself
        (:meth:`Rpc.run_lead`, under ``reading.scope``): most finish without
        suspending, and then cost no task switch.

        Returns:
            True once the peer's stream ended or failed; False when a lead
            handler suspended, so that another task reads now.
        """
        CURRENT.set(self)
        proto = self._proto
        stream = self._rx_stream
        sink = self._sink
        rpc = self._rpc
        queue = rpc.notify_queue
        notify_wakeup = rpc.notify_wakeup
        watch = self._watch
        take_request = proto.take_request
        take_any_reply = proto.take_any_reply
        on_request = rpc.on_request
        on_reply = rpc.on_reply
        fed = True  # bytes went to the core: receive_frames has work
        ended = False
        try:
            while True:
                if fed:
                    ended = proto.receive_frames(sink)
                    if queue:
                        notify_wakeup.set()  # once per chunk, not per frame
                if rpc.lead is not None and not await rpc.run_lead(reading):
                    return False
                if ended:
                    return True
                start, partial_len = proto.incomplete()
                if partial_len or watch.start >= 0:  # once per chunk; raises over budget
                    watch.update(start, partial_len, self._last_rx)
                data = await stream.receive_some()
                self._last_rx = trio.current_time()
                self.bytes_in += len(data)
                # A chunk that is one whole request (a server's usual chunk)
                # or one whole reply (a client's) skips the frame loop.
                request = take_request(data)
                if request is not None:
                    on_request(*request)
                    fed = False
                else:
                    reply = take_any_reply(data)
                    if reply is None:
                        proto.receive_data(data)
                        fed = True
                    else:
                        on_reply(*reply)
                        fed = False
        except PeerClosedError as exc:
            self._fail(exc)
        except RemoteProtocolError as exc:
            self._fail(exc, Close(type(exc).__name__, str(exc)))
        except SessionLost as exc:  # the session layer already says why
            self._fail(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            lost = ConnectionLost(f"receiving from the peer failed: {exc!r}")
            lost.__cause__ = exc
            self._fail(lost)
        return True

    # --- heartbeats and the frame timeout -------------------------------------------

    async def _timers(self) -> None:
        interval = self._cfg.heartbeat_interval
        timeout = self._cfg.heartbeat_timeout if interval else math.inf
        frame_timeout = self._cfg.frame_timeout or math.inf
        nonce = 0
        next_ping = trio.current_time() if interval else math.inf
        while True:
            now = trio.current_time()
            deadline = self._last_rx + timeout
            if now >= deadline:
                self._fail(ConnectionLost(f"no data from the peer for {timeout} s (heartbeat)"))
                return
            frame_deadline = self._watch.deadline(frame_timeout, now)
            if now >= frame_deadline:
                exc = RemoteProtocolError(f"a frame stayed incomplete for {frame_timeout} s")
                self._fail(exc, Close(type(exc).__name__, str(exc)))
                return
            if now >= next_ping and self._error is None:
                assert interval is not None
                self._append(self._proto.send(Ping(nonce)))
                nonce += 1
                next_ping = now + interval
            await trio.sleep_until(min(deadline, next_ping, frame_deadline))

    # --- rpc -----------------------------------------------------------------------

    # The issue asks for timeout=; it only opens a cancel scope (see the docstring).
    async def call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Call ``method(*args)`` on the peer and return its result.

        Many calls may be in flight on one connection; replies are matched by id.

        Ordering: the peer starts the handler only after the handlers of every
        notification sent before this call on this connection (every
        :meth:`notify` that returned before this call was made, from any task)
        have returned.  Calls still run concurrently with each other, and a
        notification sent after this call does not wait for it.  Publishes and
        streams are not ordered against calls or notifications.

        Args:
            method: name of a method the peer registered in its :class:`Handlers`.
            *args: msgpack-serialisable arguments.
            timeout: seconds; a convenience that opens a ``trio.fail_after``
                scope around the call (prefer your own cancel scope).

        Returns:
            Whatever the remote handler returned (as msgpack decodes it).

        Raises:
            RemoteError: the handler raised (``remote_type`` and
                ``remote_message`` describe it), or no method has that name
                (``remote_type == "MethodNotFound"``).
            trio.TooSlowError: ``timeout`` expired (the remote handler is cancelled).
            ConnectionLost: the peer died, froze past the heartbeat timeout, or
                broke the protocol, before the reply came.
            trio.ClosedResourceError: this connection was closed locally.
            LocalProtocolError: an argument cannot be packed or the request is
                larger than the peer's frame limit.

        Cancellation:
            Safe.  If cancelled after the request went out, a cancel frame is
            sent and the peer cancels the handler (it sees ``trio.Cancelled``);
            any late reply is discarded.  A call that writes its own small
            request (on an idle line) finishes that write before the cancel
            takes effect; it waits only if the transport's buffer is full.

        Backpressure:
            Waits while the peer already runs ``max_concurrency`` of our calls
            (the slot of a cancelled call is freed when the peer confirms) and
            while the outgoing buffer is full.
        """
        if timeout is None:
            return await self._rpc.call(method, args)
        with trio.fail_after(timeout):
            return await self._rpc.call(method, args)

    # --- notify --------------------------------------------------------------------

    async def notify(self, method: str, *args: Any) -> None:
        """Run ``method(*args)`` on the peer without waiting for it (one-way).

        The peer runs notifications one at a time, in the order sent; their
        results are discarded and their exceptions logged on the peer.  A
        :meth:`call` made after this returns starts its handler on the peer
        only after this notification's handler has returned (so the call sees
        its effects); a call made before it is not waited for.

        Args:
            method: name of a method the peer registered.
            *args: msgpack-serialisable arguments.

        Raises:
            ConnectionLost: the connection failed.
            trio.ClosedResourceError: this connection was closed locally.
            LocalProtocolError: an argument cannot be packed or is too large.

        Cancellation:
            Safe: the notification is either queued whole or not at all.  A
            checkpoint (cancel point and schedule point) when it waits and once
            every 256 calls; in between it neither yields nor looks for
            cancellation, so that a loop of small messages is batched and runs
            at full rate.  A cancel by another task, which can only run while
            this one yields, takes effect at the latest at that yield.

        Backpressure:
            Waits while the peer's notify window (bytes not yet run by its
            handlers) is full, or while the outgoing buffer is full.
        """
        # Writer.schedule_point, inlined: this is the hottest path of a one-way stream.
        writer = self._writer
        ops = writer.ops + 1
        if ops >= SCHEDULE_EVERY:
            writer.ops = 0
            await trio.lowlevel.checkpoint()
        else:
            writer.ops = ops
        if self._error is not None:
            self._check_usable()
        data = self._pack_notify(method, args)
        credit = self._notify_out
        size = len(data)
        outstanding = credit.outstanding
        outbuf = writer.outbuf
        if len(outbuf) < writer.buffer_size and (
            outstanding == 0 or outstanding + size <= credit.window
        ):
            # Fast path of Writer.send_flow: room everywhere, nothing to wait for.
            credit.outstanding = outstanding + size
            writer.frames += 1
            if not outbuf:
                writer.wakeup.set()  # else it was woken by the first frame
            outbuf += data
            return
        await writer.send_flow(data, credit)

    async def _notify_runner(self) -> None:
        # For the handlers run in this task, and for the workers it starts
        # (requests that waited behind notifications, see Rpc.on_request).
        CURRENT.set(self)
        await self._rpc.run_notifications()

    # --- pub/sub -------------------------------------------------------------------

    async def publish(self, topic: str, message: Any) -> None:
        """Publish ``message`` on ``topic`` to every matching subscription of the peer.

        A subscription matches when ``topic`` starts with its prefix.  With no
        matching subscription this does nothing (like a PUB socket).

        Args:
            topic: the topic string.
            message: any msgpack-serialisable value.

        Raises:
            ConnectionLost: the connection failed.
            trio.ClosedResourceError: this connection was closed locally.
            LocalProtocolError: the message cannot be packed or is too large.

        Cancellation:
            Safe per subscription: if cancelled while waiting, the message went
            to the subscriptions before the one waited on and not to the rest.
            A checkpoint when waiting and once every 256 calls, as
            :meth:`notify`.

        Backpressure:
            For a ``"block"`` subscription, waits while the subscriber's window
            is full (a subscriber that never reads blocks the publisher).  For a
            ``"drop_oldest"`` subscription, never waits for the subscriber (it
            drops and counts).  Always waits while the outgoing buffer is full.
        """
        writer = self._writer
        await writer.schedule_point()
        self._check_usable()
        # The routing of pubsub.PubSub, inline (one call less per message).
        for rsub in list(self._pubsub.remote.values()):
            if not topic.startswith(rsub.prefix) or rsub.closed:
                continue
            data = self._proto.pack_publish(rsub.id, topic, message)
            await writer.send_flow(data, rsub.credit)

    def subscribe(
        self,
        prefix: str = "",
        *,
        policy: Literal["block", "drop_oldest"] = "block",
        queue_size: int = 1024,
        window: int | None = None,
    ) -> Subscription:
        """Subscribe to the peer's messages whose topic starts with ``prefix``.

        Use the result as ``async with conn.subscribe("sensors.") as sub:`` and
        iterate it: ``async for topic, message in sub``.

        Args:
            prefix: topic prefix; ``""`` matches everything.
            policy: ``"block"``: the publisher waits when ``window`` bytes are
                queued here unread.  ``"drop_oldest"``: the publisher never
                waits; when ``queue_size`` messages are queued the oldest is
                dropped and :attr:`Subscription.dropped` counts it.
            queue_size: queue length for ``"drop_oldest"``.
            window: credit window in bytes for ``"block"`` (default from
                :class:`BusConfig`).

        Returns:
            A :class:`Subscription` (not yet active: enter it).
        """
        if policy not in ("block", "drop_oldest"):
            raise ValueError(f"unknown subscription policy {policy!r}")
        if queue_size < 1:
            raise ValueError("queue_size must be positive")
        win = window if window is not None else self._cfg.subscription_window
        if policy == "block" and win < 1:
            raise ValueError("window must be positive")
        return self._pubsub.subscription(prefix, policy == "drop_oldest", queue_size, win)

    # --- streams ----------------------------------------------------------------------

    def open_stream(self, method: str, *args: Any) -> AbstractAsyncContextManager[MessageStream]:
        """Open a message stream served by the peer's stream handler ``method``.

        Use it as ``async with conn.open_stream("upload", name) as stream:``.
        Leaving the block normally closes the stream (an end marker, then the
        peer's further messages are discarded); leaving it with an exception
        resets the stream and the peer's handler is cancelled.

        Args:
            method: name of a stream handler the peer registered.
            *args: msgpack-serialisable arguments passed after the stream.

        Returns:
            An async context manager yielding the :class:`MessageStream`.

        Raises:
            LocalProtocolError: an argument cannot be packed.
            ConnectionLost, trio.ClosedResourceError: the connection is unusable.

        Cancellation:
            Safe; a cancelled open sends nothing.

        Backpressure:
            Waits while the outgoing buffer is full.  If the peer already runs
            ``max_concurrency`` streams, it refuses this one and the stream's
            first receive raises :class:`RemoteError` (``"TooManyStreams"``).
        """
        return self._streams.open(method, args)
