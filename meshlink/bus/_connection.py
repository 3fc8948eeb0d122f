"""Trio adapter of the message bus: tasks, waiting, heartbeats and backpressure.

Theory of operation
-------------------
A :class:`Connection` drives one :class:`~meshlink.bus._proto.BusProtocol` over
one trio stream (vchan, TCP, TLS, an in-memory pair: anything with
``send_all``/``receive_some``).  It runs a few tasks:

* the *writer* owns ``send_all``.  Every frame is packed by the task that
  produces it and appended to one outgoing buffer; the writer wakes on the next
  scheduler tick and sends the whole buffer in one ``send_all``, so frames
  produced in the same tick share one write (one ring or socket write).  One
  exception, for latency: a reply produced while nothing is queued and no
  send is in progress is sent at once by the worker that produced it (see
  ``_send_reply``); frames produced meanwhile queue for the writer as usual.
* the *reader* owns ``receive_some``: each chunk is fed to the core and every
  complete frame in it is dispatched before the next read.  Dispatch never
  waits, which keeps the reader (and with it replies, credit and pongs) moving
  however slow the application is.
* the *heartbeat* sends a ping every ``heartbeat_interval`` and declares the
  peer lost when nothing at all arrived for ``heartbeat_timeout``.
* the *notify runner* runs notification handlers one at a time, in order.
* long-lived *workers* run request handlers (one at a time each; as many as
  requests in flight, at most our ``max_concurrency``); one task per incoming
  stream runs its handler.

Backpressure has two layers, so memory stays bounded end to end:

1. the outgoing buffer holds at most ``send_buffer_size`` bytes of
   application frames; a producer that would overfill it waits for the writer.
   Control frames (pong, credit, cancel, close) skip that limit: they are small
   and bounded by what the peer sends us.
2. everything that queues at the receiver is credit-based, counted in wire
   bytes: notifications (per connection), block-policy subscriptions and
   message streams (each its own window).  A sender whose window is used up
   waits; the receiver returns credit as the application consumes.  Requests
   are bounded by the peer's ``max_concurrency`` instead (a semaphore here).
   A drop-oldest subscription takes no credit: its queue has a fixed length
   and drops the oldest message (counted) when full.

Because the reader never waits on the application, a slow consumer cannot stall
the heartbeat: the heartbeat measures liveness, not speed.

Closing: ``aclose`` (or leaving ``Connection.open``) cancels the handlers,
fails pending operations with :class:`trio.ClosedResourceError`, queues a close
frame, lets the writer flush for at most ``close_timeout`` and closes the
transport.  A dead peer, a heartbeat timeout or malformed input fails every
pending operation with :class:`~meshlink.ConnectionLost` (the cause chained).
"""

from __future__ import annotations

import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import CoroutineType, TracebackType
from typing import Any, Final, Literal, TypeVar

import outcome
import trio

from ..errors import (
    ConnectionLost,
    HandshakeError,
    LocalProtocolError,
    MeshlinkError,
    RemoteProtocolError,
)
from ._errors import PeerClosedError, RemoteError
from ._proto import (
    DEFAULT_MAX_CONTAINER_LEN,
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    BusProtocol,
    Cancel,
    Channel,
    Close,
    ConnectionClosed,
    Credit,
    Error,
    Event,
    ExtCodec,
    Hello,
    Ping,
    Pong,
    StreamEnd,
    StreamOpen,
    StreamReset,
    Subscribe,
    Subscribed,
    Unsubscribe,
)

__all__ = [
    "BusConfig",
    "Connection",
    "Handlers",
    "MessageStream",
    "Subscription",
    "current_connection",
    "serve_bus",
    "serve_bus_listeners",
]

logger = logging.getLogger("meshlink.bus")

#: Features this implementation speaks; the connection uses the intersection.
FEATURES: Final = ("rpc", "cancel", "notify", "pubsub", "stream", "heartbeat")
_RECEIVE_SIZE: Final = 256 * 1024
#: A send-side operation that did not have to wait still yields to the
#: scheduler once per this many calls (see "Cancellation" in the docstrings).
#: The writer only runs when the producer yields, so this is also the batch
#: size of a tight notify loop: 256 x 64-byte notifications (~19 KB per
#: send_all) measured +16% one-way over vchan against 64 (bench_bus, same
#: runs; fewer writes, ticks and receiver wakeups per message); 1024 gained
#: nothing more.  The send buffer limit still bounds large messages.
_SCHEDULE_EVERY: Final = 256

MethodHandler = Callable[..., Awaitable[Any]]
StreamHandler = Callable[..., Awaitable[None]]
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

_checkpoint_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled

_current: contextvars.ContextVar[Connection] = contextvars.ContextVar("meshlink_bus_connection")


def current_connection() -> Connection:
    """Return the connection whose handler is running in the current task.

    Raises:
        LookupError: not called from inside a bus handler.
    """
    return _current.get()


@dataclass(frozen=True, slots=True)
class BusConfig:
    """Limits and timers of one connection (both ends choose their own).

    Attributes:
        max_concurrency: requests (and, separately, streams) the peer may run
            here at once; announced in the handshake.
        notify_window: bytes of notifications buffered here before the peer
            must wait for credit.
        stream_window: bytes buffered per incoming message stream.
        subscription_window: bytes buffered per block-policy subscription.
        send_buffer_size: bytes of outgoing frames buffered before producers wait.
        max_frame_size: largest frame accepted (default 16 MiB).
        max_container_len: longest msgpack array/map accepted.
        heartbeat_interval: seconds between pings; ``None`` disables heartbeats.
        heartbeat_timeout: seconds without any incoming byte after which the peer
            is declared lost.
        handshake_timeout: seconds allowed for the peer's hello.
        close_timeout: seconds ``aclose`` spends flushing before it gives up.
        ext_types: msgpack ext types allowed (none by default).
    """

    max_concurrency: int = 64
    notify_window: int = 256 * 1024
    stream_window: int = 256 * 1024
    subscription_window: int = 256 * 1024
    send_buffer_size: int = 1024 * 1024
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN
    heartbeat_interval: float | None = 5.0
    heartbeat_timeout: float = 15.0
    handshake_timeout: float = 10.0
    close_timeout: float = 1.0
    ext_types: Sequence[ExtCodec] = ()


class Handlers:
    """The functions a connection serves to its peer, by name.

    Methods are plain ``async def f(*args)`` functions: :meth:`Connection.call`
    runs one and returns its result; :meth:`Connection.notify` runs one and
    discards the result.  Stream handlers are ``async def f(stream, *args)``
    where ``stream`` is a :class:`MessageStream`; the stream is closed when the
    handler returns, and reset with the error when it raises.

    Example::

        handlers = Handlers()

        @handlers.method
        async def add(a, b):
            return a + b
    """

    def __init__(self) -> None:
        self.methods: dict[str, MethodHandler] = {}
        self.streams: dict[str, StreamHandler] = {}

    def method(self, fn: _F) -> _F:
        """Decorator: register ``fn`` as a method under its ``__name__``."""
        self.add_method(fn.__name__, fn)
        return fn

    def stream(self, fn: _F) -> _F:
        """Decorator: register ``fn`` as a stream handler under its ``__name__``."""
        self.add_stream(fn.__name__, fn)
        return fn

    def add_method(self, name: str, fn: MethodHandler) -> None:
        """Register ``fn`` as the method called ``name`` (replacing any previous one)."""
        self.methods[name] = fn

    def add_stream(self, name: str, fn: StreamHandler) -> None:
        """Register ``fn`` as the stream handler called ``name``."""
        self.streams[name] = fn


class _Wakeup:
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


class _InContext:
    """Await a coroutine with every step run in ``context`` (as its own task would).

    Handlers run in long-lived worker tasks; this keeps the context variables
    a handler sets from leaking into the next handler that worker runs.
    """

    __slots__ = ("_context", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context) -> None:
        self._coro = coro
        self._context = context

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        run = self._context.run
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    yielded = run(coro.send, value)
                else:
                    yielded = run(coro.throw, error)
            except StopIteration as stop:
                return stop.value
            try:
                value = yield yielded
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # Cancelled included: pass it in
                error = exc
                value = None


class _CreditOut:
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


class _CreditIn:
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


class _RemoteSub:
    """A subscription the peer holds on us (we publish to it)."""

    __slots__ = ("closed", "credit", "id", "prefix")

    def __init__(self, id: int, prefix: str, window: int) -> None:
        self.id = id
        self.prefix = prefix
        self.credit = _CreditOut(window) if window else None
        self.closed = False


class _Sink:
    """The connection's frame handlers under the names :class:`FrameSink` uses
    (``Connection.notify`` is taken by the public API)."""

    __slots__ = ("error", "event", "notifications", "publish", "reply", "request", "stream_data")

    def __init__(self, conn: Connection) -> None:
        self.notifications = conn._on_notifications
        self.request = conn._on_request
        self.reply = conn._on_reply
        self.error = conn._on_error
        self.publish = conn._on_publish
        self.stream_data = conn._on_stream_data
        self.event = conn._on_event


class _Worker:
    """A long-lived task that runs request handlers, one at a time."""

    __slots__ = ("job", "task")

    def __init__(self, task: trio.lowlevel.Task, job: tuple[int, str, list[Any]]) -> None:
        self.task = task
        self.job = job


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
    ) -> None:
        cfg = config or BusConfig()
        self._cfg = cfg
        self._stream = stream
        self._handlers = handlers or Handlers()
        self.name = name
        self._proto = BusProtocol(
            Hello(
                version=PROTOCOL_VERSION,
                features=list(FEATURES),
                name=name,
                max_concurrency=cfg.max_concurrency,
                notify_window=cfg.notify_window,
                stream_window=cfg.stream_window,
                max_frame_size=cfg.max_frame_size,
            ),
            max_container_len=cfg.max_container_len,
            ext_types=cfg.ext_types,
        )
        self._pack_notify = self._proto.pack_notify
        # outgoing
        self._outbuf = bytearray()
        self._send_buffer_size = cfg.send_buffer_size
        self._writer_wakeup = _Wakeup()
        self._space_lot = trio.lowlevel.ParkingLot()
        self._writer_done = trio.Event()
        self._closing = False
        self._sending = False  # a send_all is in progress (writer or direct reply)
        self._direct_scope: trio.CancelScope | None = None  # of a direct reply
        self._tx_broken = False  # a send was cut short: the stream may hold half a frame
        self._ops = 0
        # lifecycle
        self._error: BaseException | None = None
        self._closed_locally = False
        self._peer_closed_cleanly = False
        self._shutdown = trio.Event()
        self._closed = trio.Event()
        self._work: trio.Nursery | None = None
        self._last_rx = 0.0
        # rpc
        self._next_call_id = 0
        self._calls: dict[int, trio.lowlevel.Task] = {}
        self._call_slots = trio.Semaphore(1)  # resized after the handshake
        self._handler_scopes: dict[int, trio.CancelScope] = {}
        self._idle_workers: list[_Worker] = []
        # notify
        self._notify_out = _CreditOut(1)
        self._notify_in = _CreditIn(cfg.notify_window)
        self._notify_queue: deque[tuple[str, list[Any], int]] = deque()
        self._notify_wakeup = _Wakeup()
        # pub/sub
        self._subs: dict[int, Subscription] = {}
        self._next_sub_id = 0
        self._remote_subs: dict[int, _RemoteSub] = {}
        self._last_remote_sub_id = -1
        # streams, keyed by (opened by us, id)
        self._streams: dict[tuple[bool, int], MessageStream] = {}
        self._next_stream_id = 0
        self._last_peer_stream_id = -1
        self._peer_streams = 0
        self._sink = _Sink(self)

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
        conn = cls(stream, handlers, name=name, config=config)
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
        handshake_error: BaseException | None = None
        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(self._writer)
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
                        work.start_soon(self._guard, self._reader)
                        work.start_soon(self._guard, self._notify_runner)
                        if self._cfg.heartbeat_interval is not None:
                            work.start_soon(self._guard, self._heartbeat)
                        await self._shutdown.wait()
                        # Graceful end: let the writer (and a reply being sent
                        # directly, see _send_reply) flush what is queued, the close
                        # frame included, unless the peer is known to be gone.
                        flush_deadline = trio.current_time() + self._cfg.close_timeout
                        peer_gone = isinstance(self._error, ConnectionLost)
                        direct = self._direct_scope
                        if direct is not None:
                            if peer_gone:
                                direct.cancel()
                            else:
                                direct.deadline = flush_deadline
                        work.cancel_scope.cancel()
                    self._closing = True
                    self._writer_wakeup.set()
                    if not peer_gone:
                        with trio.move_on_at(flush_deadline):
                            await self._writer_done.wait()
                    inner.cancel_scope.cancel()
        finally:
            self._closing = True
            if self._error is None:
                self._error = trio.ClosedResourceError("bus connection was closed")
            self._wake_all()
            await trio.aclose_forcefully(self._stream)
            self._closed.set()
        if handshake_error is not None:
            self._raise_handshake_error(handshake_error)

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
        event = proto.next_event()
        while not isinstance(event, Hello):
            if isinstance(event, ConnectionClosed):
                raise HandshakeError("the peer closed the transport during the handshake")
            assert event is NEED_DATA
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            self._last_rx = trio.current_time()
            proto.receive_data(data)
            event = proto.next_event()
        self._notify_out = _CreditOut(event.notify_window)
        self._call_slots = trio.Semaphore(event.max_concurrency)

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
        calls, self._calls = self._calls, {}
        for task in calls.values():
            trio.lowlevel.reschedule(task, outcome.Error(self._closed_error()))
        self._space_lot.unpark_all()
        self._notify_out.lot.unpark_all()
        for rsub in self._remote_subs.values():
            if rsub.credit is not None:
                rsub.credit.lot.unpark_all()
        for sub in list(self._subs.values()):
            sub._wakeup.set()
        for stream in list(self._streams.values()):
            stream._wakeup.set()
            stream._credit_out.lot.unpark_all()

    def _closed_error(self) -> BaseException:
        """A fresh exception for one waiter, saying why the connection is unusable."""
        err = self._error
        if self._closed_locally:
            return trio.ClosedResourceError("bus connection was closed")
        if self._peer_closed_cleanly:
            exc: BaseException = ConnectionLost("the peer closed the bus connection")
        elif isinstance(err, ConnectionLost):
            exc = ConnectionLost(str(err))
        else:
            exc = ConnectionLost(f"bus connection failed: {err}")
        exc.__cause__ = err
        return exc

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._closed_error()

    # --- writing -----------------------------------------------------------------

    def _append(self, data: bytes) -> None:
        """Queue a frame, ignoring the buffer limit (control frames)."""
        if self._closing and self._writer_done.is_set():
            return  # deliberate: the writer is gone, the frame could never leave
        self._outbuf += data
        self._writer_wakeup.set()

    async def _writer(self) -> None:
        try:
            while True:
                if self._tx_broken:
                    return
                if not self._outbuf or self._sending:
                    if self._closing and not self._sending:
                        return
                    await self._writer_wakeup.wait()
                    continue
                data, self._outbuf = self._outbuf, bytearray()
                if self._space_lot:
                    self._space_lot.unpark_all()
                self._sending = True
                try:
                    await self._stream.send_all(data)
                finally:
                    self._sending = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
        finally:
            self._writer_done.set()

    def _send_failed(self, exc: BaseException) -> None:
        lost = ConnectionLost(f"sending to the peer failed: {exc!r}")
        lost.__cause__ = exc
        self._fail(lost)

    async def _send_reply(self, data: bytes) -> None:
        """Queue a reply, or send it from this (worker) task when the line is idle.

        An idle line (nothing queued, no send in progress) means no batching
        is lost by sending at once, and it saves the reply a trip through the
        scheduler to the writer (one tick, ~4-8 us of round trip).  Anything
        queued meanwhile goes out with the writer's next send_all.

        The send is shielded: a worker is only ever cancelled when the
        connection shuts down, and then ``_run`` gives this send the same flush
        deadline as the writer (or cancels it when the peer is gone).  A send
        cut short may leave half a frame on the stream, so nothing more is sent.
        """
        if self._sending or self._outbuf or self._closing:
            self._append(data)
            return
        self._sending = True
        scope = self._direct_scope = trio.CancelScope(shield=True)
        try:
            with scope:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
        finally:
            self._sending = False
            self._direct_scope = None
            if scope.cancelled_caught:
                self._tx_broken = True
            if self._outbuf or self._closing or self._tx_broken:
                self._writer_wakeup.set()

    async def _schedule_point(self) -> None:
        """Cancel point on every call; schedule point every ``_SCHEDULE_EVERY`` calls."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._ops += 1
        if self._ops >= _SCHEDULE_EVERY:
            self._ops = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_flow(self, data: bytes, credit: _CreditOut | None) -> bool:
        """Queue an application frame once the credit window and the buffer allow.

        Returns False (frame dropped) if the credit's owner went away meanwhile.
        """
        size = len(data)
        limit = self._cfg.send_buffer_size
        while True:
            self._check_usable()
            if credit is not None and credit.closed:
                return False
            if credit is not None and not credit.allows(size):
                await credit.lot.park()
                self._ops = 0
                continue
            if len(self._outbuf) >= limit:
                await self._space_lot.park()
                self._ops = 0
                continue
            if credit is not None:
                credit.outstanding += size
            self._outbuf += data
            self._writer_wakeup.set()
            return True

    # --- reading -----------------------------------------------------------------

    async def _reader(self) -> None:
        _current.set(self)
        proto = self._proto
        stream = self._stream
        sink = self._sink
        queue = self._notify_queue
        try:
            while True:
                ended = proto.receive_frames(sink)
                if queue:
                    self._notify_wakeup.set()  # once per chunk, not per frame
                if ended:
                    return
                data = await stream.receive_some(_RECEIVE_SIZE)
                self._last_rx = trio.current_time()
                proto.receive_data(data)
        except PeerClosedError as exc:
            self._fail(exc)
        except RemoteProtocolError as exc:
            self._fail(exc, Close(type(exc).__name__, str(exc)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            lost = ConnectionLost(f"receiving from the peer failed: {exc!r}")
            lost.__cause__ = exc
            self._fail(lost)

    # The reader's frame handlers (a FrameSink, see _Sink).  None of them waits.

    def _on_notifications(self, batch: list[tuple[str, list[Any], int]], total: int) -> None:
        credit = self._notify_in
        unacked = credit.unacked
        # Frame by frame the rule is "unacked and unacked + size > window"
        # (a frame larger than the window may come alone).  Over a batch the
        # total can only exceed the window if some frame broke that rule, unless
        # the batch is that one lone frame.
        if unacked + total > credit.window and (unacked or len(batch) > 1):
            raise RemoteProtocolError(f"peer overran the notify window of {credit.window} bytes")
        credit.unacked = unacked + total
        self._notify_queue.extend(batch)

    def _on_request(self, id: int, method: str, args: list[Any]) -> None:
        idle = self._idle_workers
        if idle:
            worker = idle.pop()
            worker.job = (id, method, args)
            trio.lowlevel.reschedule(worker.task)
        else:
            assert self._work is not None
            self._work.start_soon(self._guard, partial(self._worker, id, method, args))

    def _on_reply(self, id: int, result: Any) -> None:
        self._call_slots.release()
        task = self._calls.pop(id, None)
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Value(result))
        # else: deliberate no-op, the caller was cancelled; the slot is free now

    def _on_error(self, id: int, type: str, message: str) -> None:
        self._call_slots.release()
        task = self._calls.pop(id, None)
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Error(RemoteError(type, message)))
        # else: deliberate no-op, the caller was cancelled; the slot is free now

    def _on_publish(self, id: int, topic: str, data: Any, size: int) -> None:
        sub = self._subs.get(id)
        if sub is not None:
            sub._deliver(topic, data, size)
        elif id >= self._next_sub_id:
            raise RemoteProtocolError(f"publish to unknown subscription {id}")
        # else: deliberate no-op, we unsubscribed and the message crossed it

    def _on_stream_data(self, id: int, opened_by_sender: bool, data: Any, size: int) -> None:
        stream = self._find_stream(id, opened_by_sender)
        if stream is not None:
            stream._on_data(data, size)

    def _on_event(self, event: Event) -> None:
        """The rare frame kinds."""
        proto = self._proto
        t = type(event)
        if t is Credit:
            assert isinstance(event, Credit)
            self._on_credit(event)
        elif t is Cancel:
            assert isinstance(event, Cancel)
            scope = self._handler_scopes.get(event.id)
            if scope is not None:
                scope.cancel()
            # else: deliberate no-op, the handler finished before the cancel arrived
        elif t is Ping:
            assert isinstance(event, Ping)
            self._append(proto.send(Pong(event.nonce)))
        elif t is Pong:
            pass  # deliberate: any incoming byte already proved liveness
        elif t is Subscribe:
            assert isinstance(event, Subscribe)
            if event.id <= self._last_remote_sub_id:
                raise RemoteProtocolError(f"subscription id {event.id} reused")
            self._last_remote_sub_id = event.id
            self._remote_subs[event.id] = _RemoteSub(event.id, event.prefix, event.window)
            self._append(proto.send(Subscribed(event.id)))
        elif t is Subscribed:
            assert isinstance(event, Subscribed)
            sub = self._subs.get(event.id)
            if sub is not None:
                sub._acked = True
                sub._wakeup.set()
            elif event.id >= self._next_sub_id:
                raise RemoteProtocolError(f"ack of unknown subscription {event.id}")
        elif t is Unsubscribe:
            assert isinstance(event, Unsubscribe)
            rsub = self._remote_subs.pop(event.id, None)
            if rsub is None:
                raise RemoteProtocolError(f"unsubscribe of unknown subscription {event.id}")
            rsub.closed = True
            if rsub.credit is not None:
                rsub.credit.close()
        elif t is StreamOpen:
            assert isinstance(event, StreamOpen)
            self._on_stream_open(event)
        elif t is StreamEnd:
            assert isinstance(event, StreamEnd)
            stream = self._find_stream(event.id, event.opened_by_sender)
            if stream is not None:
                stream._on_end()
        elif t is StreamReset:
            assert isinstance(event, StreamReset)
            stream = self._find_stream(event.id, event.opened_by_sender)
            if stream is not None:
                stream._on_reset(event)
        elif t is Close:
            self._peer_closed_cleanly = True
            self._fail(ConnectionLost("the peer closed the bus connection"))
        elif t is ConnectionClosed:
            self._fail(ConnectionLost("the peer closed the transport without a close frame"))
        else:  # pragma: no cover - the core hands the other kinds to the fast methods
            raise RemoteProtocolError(f"unexpected frame {event!r:.80}")

    def _on_credit(self, event: Credit) -> None:
        if event.channel is Channel.NOTIFY:
            self._notify_out.refill(event.amount)
        elif event.channel is Channel.SUBSCRIPTION:
            rsub = self._remote_subs.get(event.id)
            if rsub is not None and rsub.credit is not None:
                rsub.credit.refill(event.amount)
            elif event.id > self._last_remote_sub_id:
                raise RemoteProtocolError(f"credit for unknown subscription {event.id}")
        else:
            stream = self._find_stream(event.id, event.opened_by_sender)
            if stream is not None:
                stream._credit_out.refill(event.amount)

    def _find_stream(self, id: int, opened_by_sender: bool) -> MessageStream | None:
        ours = not opened_by_sender
        stream = self._streams.get((ours, id))
        if stream is None:
            known = id < self._next_stream_id if ours else id <= self._last_peer_stream_id
            if not known:
                raise RemoteProtocolError(f"frame for stream {id} that was never opened")
        return stream  # None: deliberate no-op, a frame for a stream we already closed

    def _send_control(self, event: Credit | StreamEnd | StreamReset | Unsubscribe) -> None:
        if self._error is None:
            self._append(self._proto.send(event))

    # --- heartbeats --------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self._cfg.heartbeat_interval
        assert interval is not None
        timeout = self._cfg.heartbeat_timeout
        nonce = 0
        next_ping = trio.current_time()
        while True:
            now = trio.current_time()
            deadline = self._last_rx + timeout
            if now >= deadline:
                self._fail(ConnectionLost(f"no data from the peer for {timeout} s (heartbeat)"))
                return
            if now >= next_ping and self._error is None:
                self._append(self._proto.send(Ping(nonce)))
                nonce += 1
                next_ping = now + interval
            await trio.sleep_until(min(deadline, next_ping))

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
            any late reply is discarded.

        Backpressure:
            Waits while the peer already runs ``max_concurrency`` of our calls
            (the slot of a cancelled call is freed when the peer confirms) and
            while the outgoing buffer is full.
        """
        if timeout is None:
            return await self._call(method, args)
        with trio.fail_after(timeout):
            return await self._call(method, args)

    async def _call(self, method: str, args: tuple[Any, ...]) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        try:
            # A free slot costs no trip through the scheduler (latency matters here).
            self._call_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._call_slots.acquire()
        try:
            while len(self._outbuf) >= self._cfg.send_buffer_size:
                await self._space_lot.park()
                self._check_usable()
            self._check_usable()
            call_id = self._next_call_id
            self._next_call_id += 1
            data = self._proto.pack_request(call_id, method, args)
        except BaseException:
            self._call_slots.release()
            raise
        self._outbuf += data
        self._writer_wakeup.set()
        self._calls[call_id] = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            # The slot stays taken until the peer answers the cancel: it still
            # counts the handler against our concurrency limit until then.
            self._calls.pop(call_id, None)
            if self._error is None:
                self._append(self._proto.send(Cancel(call_id)))
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def _worker(self, id: int, method: str, args: list[Any]) -> None:
        """Run request handlers: this one, then whatever the reader hands over.

        Workers outlive their requests and wait in ``_idle_workers``, so a
        request costs a reschedule rather than a new task (about 6 us here).
        The core caps requests in flight at our ``max_concurrency``, which
        caps the workers too.  Each handler runs in a fresh copy of the
        connection's context, as it would in a task of its own.
        """
        me = _Worker(trio.lowlevel.current_task(), (id, method, args))
        idle = self._idle_workers
        base = contextvars.copy_context()

        def abort(_: Any) -> trio.lowlevel.Abort:
            idle.remove(me)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            await self._handle_request(*me.job, base.copy())
            idle.append(me)
            await trio.lowlevel.wait_task_rescheduled(abort)

    async def _handle_request(
        self, id: int, method: str, args: list[Any], context: contextvars.Context
    ) -> None:
        fn = self._handlers.methods.get(method)
        scope = trio.CancelScope()
        self._handler_scopes[id] = scope
        failure: tuple[str, str] | None = None
        result: Any = None
        try:
            with scope:
                if fn is None:
                    failure = ("MethodNotFound", f"no method {method!r}")
                else:
                    try:
                        coro = fn(*args)
                        if type(coro) is CoroutineType:
                            result = await _InContext(coro, context)
                        else:  # some other awaitable: no context of its own
                            result = await coro
                    except Exception as exc:
                        failure = (type(exc).__name__, str(exc))
        finally:
            del self._handler_scopes[id]
        if scope.cancelled_caught:
            failure = ("Cancelled", "the handler was cancelled")
        if self._error is not None:
            return
        proto = self._proto
        if failure is None:
            try:
                data = proto.pack_reply(id, result)
            except LocalProtocolError as exc:
                data = proto.send(Error(id, "LocalProtocolError", str(exc)))
        else:
            data = proto.send(Error(id, *failure))
        await self._send_reply(data)

    # --- notify --------------------------------------------------------------------

    async def notify(self, method: str, *args: Any) -> None:
        """Run ``method(*args)`` on the peer without waiting for it (one-way).

        The peer runs notifications one at a time, in the order sent; their
        results are discarded and their exceptions logged on the peer.

        Args:
            method: name of a method the peer registered.
            *args: msgpack-serialisable arguments.

        Raises:
            ConnectionLost: the connection failed.
            trio.ClosedResourceError: this connection was closed locally.
            LocalProtocolError: an argument cannot be packed or is too large.

        Cancellation:
            Safe: the notification is either queued whole or not at all.  This
            is a cancel point on every call but, to batch small messages, a
            schedule point only when it waits and once every 256 calls.

        Backpressure:
            Waits while the peer's notify window (bytes not yet run by its
            handlers) is full, or while the outgoing buffer is full.
        """
        # _schedule_point, inlined: this is the hottest path of a one-way stream.
        ops = self._ops + 1
        if ops >= _SCHEDULE_EVERY:
            self._ops = 0
            await trio.lowlevel.checkpoint()
        else:
            self._ops = ops
            await _checkpoint_if_cancelled()
        if self._error is not None:
            self._check_usable()
        data = self._pack_notify(method, args)
        credit = self._notify_out
        size = len(data)
        outstanding = credit.outstanding
        outbuf = self._outbuf
        if len(outbuf) < self._send_buffer_size and (
            outstanding == 0 or outstanding + size <= credit.window
        ):
            # Fast path of _send_flow: room everywhere, nothing to wait for.
            credit.outstanding = outstanding + size
            if not outbuf:
                self._writer_wakeup.set()  # else it was woken by the first frame
            outbuf += data
            return
        await self._send_flow(data, credit)

    async def _notify_runner(self) -> None:
        _current.set(self)
        queue = self._notify_queue
        credit = self._notify_in
        quarter = credit.window // 4
        methods = self._handlers.methods
        pending = 0  # bytes run and not yet credited back
        popleft = queue.popleft
        get = methods.get
        while True:
            if not queue:
                await self._notify_wakeup.wait()
            # Run the whole batch the reader queued; credit goes back every
            # quarter window and when the queue runs dry.
            while queue:
                method, args, size = popleft()
                fn = get(method)
                if fn is None:
                    logger.warning("notification for unknown method %r ignored", method)
                else:
                    try:
                        await fn(*args)
                    except Exception:
                        logger.exception("notification handler %r raised", method)
                pending += size
                if pending >= quarter or not queue:
                    credit.unacked -= pending
                    self._send_control(Credit(Channel.NOTIFY, pending))
                    pending = 0

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
            Cancel point on every call; schedule point when waiting and once
            every 256 calls.

        Backpressure:
            For a ``"block"`` subscription, waits while the subscriber's window
            is full (a subscriber that never reads blocks the publisher).  For a
            ``"drop_oldest"`` subscription, never waits for the subscriber (it
            drops and counts).  Always waits while the outgoing buffer is full.
        """
        await self._schedule_point()
        self._check_usable()
        for rsub in list(self._remote_subs.values()):
            if not topic.startswith(rsub.prefix) or rsub.closed:
                continue
            data = self._proto.pack_publish(rsub.id, topic, message)
            await self._send_flow(data, rsub.credit)

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
        return Subscription(self, prefix, policy == "drop_oldest", queue_size, win)

    # --- streams ----------------------------------------------------------------------

    @asynccontextmanager
    async def open_stream(self, method: str, *args: Any) -> AsyncIterator[MessageStream]:
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
        await self._schedule_point()
        self._check_usable()
        stream_id = self._next_stream_id
        data = self._proto.send(StreamOpen(stream_id, method, list(args)))
        self._next_stream_id += 1
        assert self._proto.peer_hello is not None
        stream = MessageStream(self, stream_id, True, self._proto.peer_hello.stream_window)
        self._streams[(True, stream_id)] = stream
        try:
            await self._send_flow(data, None)
        except BaseException:
            del self._streams[(True, stream_id)]
            raise
        try:
            yield stream
        except BaseException as exc:
            stream._abort(type(exc).__name__, str(exc))
            raise
        else:
            await stream.aclose()

    def _on_stream_open(self, event: StreamOpen) -> None:
        if event.id <= self._last_peer_stream_id:
            raise RemoteProtocolError(f"stream id {event.id} reused")
        self._last_peer_stream_id = event.id
        fn = self._handlers.streams.get(event.method)
        if fn is None:
            self._send_control(
                StreamReset(event.id, False, "MethodNotFound", f"no stream {event.method!r}")
            )
            return
        if self._peer_streams >= self._cfg.max_concurrency:
            self._send_control(
                StreamReset(event.id, False, "TooManyStreams", "stream limit reached")
            )
            return
        assert self._proto.peer_hello is not None
        stream = MessageStream(self, event.id, False, self._proto.peer_hello.stream_window)
        self._streams[(False, event.id)] = stream
        self._peer_streams += 1
        assert self._work is not None
        self._work.start_soon(self._guard, partial(self._handle_stream, stream, fn, event.args))

    async def _handle_stream(
        self, stream: MessageStream, fn: StreamHandler, args: list[Any]
    ) -> None:
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


class Subscription:
    """A subscription to the peer's published messages (see :meth:`Connection.subscribe`).

    An async context manager (subscribes on entry, unsubscribes on exit) and an
    async iterator of ``(topic, message)`` pairs.

    Attributes:
        prefix: the topic prefix.
        dropped: messages dropped because the queue was full (``"drop_oldest"``).
    """

    def __init__(
        self, conn: Connection, prefix: str, drop_oldest: bool, queue_size: int, window: int
    ) -> None:
        self._conn = conn
        self.prefix = prefix
        self.dropped = 0
        self._drop_oldest = drop_oldest
        self._queue: deque[tuple[str, Any, int]] = deque()  # (topic, message, wire size)
        self._queue_size = queue_size
        self._credit = _CreditIn(window)
        self._wakeup = _Wakeup()
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
        conn = self._conn
        await trio.lowlevel.checkpoint_if_cancelled()
        conn._check_usable()
        if self._active:
            raise trio.BusyResourceError("subscription already active")
        self._id = conn._next_sub_id
        conn._next_sub_id += 1
        window = 0 if self._drop_oldest else self._credit.window
        data = conn._proto.send(Subscribe(self._id, self.prefix, window))
        conn._subs[self._id] = self
        self._active = True
        try:
            await conn._send_flow(data, None)
            self._sent = True
            while not self._acked:
                conn._check_usable()
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
            self._conn._subs.pop(self._id, None)
            if self._sent:
                self._conn._send_control(Unsubscribe(self._id))
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
            conn = self._conn
            if conn._error is not None:
                if conn._peer_closed_cleanly:
                    raise trio.EndOfChannel
                conn._check_usable()
            await self._wakeup.wait()
        topic, data, size = self._queue.popleft()
        if not self._drop_oldest:
            amount = self._credit.consume(size, not self._queue)
            if amount:
                self._conn._send_control(Credit(Channel.SUBSCRIPTION, amount, self._id))
        return topic, data

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class MessageStream(trio.abc.AsyncResource):
    """A bidirectional, ordered stream of messages inside one connection.

    Each direction has a credit window in bytes (the receiver's
    ``stream_window``), so bulk transfers never queue more than that.  Send
    with :meth:`send`, end your direction with :meth:`send_eof`, receive with
    :meth:`receive` or ``async for message in stream``.
    """

    def __init__(self, conn: Connection, id: int, opened_by_us: bool, peer_window: int) -> None:
        self._conn = conn
        self.id = id
        self._opened_by_us = opened_by_us
        self._credit_out = _CreditOut(peer_window)
        self._credit_in = _CreditIn(conn._cfg.stream_window)
        self._queue: deque[tuple[Any, int]] = deque()  # (message, wire size)
        self._wakeup = _Wakeup()
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
            Safe: the message is queued whole or not at all.  Cancel point on
            every call; schedule point when waiting and once every 256 calls.

        Backpressure:
            Waits while the peer's window for this stream is full (it has not
            consumed earlier messages), or while the outgoing buffer is full.
        """
        conn = self._conn
        await conn._schedule_point()
        self._check_send()
        data = conn._proto.pack_stream_data(self.id, self._opened_by_us, message)
        if not await conn._send_flow(data, self._credit_out):
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
        self._conn._check_usable()

    async def send_eof(self) -> None:
        """Tell the peer we will send no more messages (its receive ends normally).

        Cancellation:
            Safe.  Calling it twice is a no-op.
        """
        await trio.lowlevel.checkpoint()
        if not self._we_ended and not self._closed:
            self._we_ended = True
            self._conn._send_control(StreamEnd(self.id, self._opened_by_us))

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
            self._conn._check_usable()
            await self._wakeup.wait()
        data, size = self._queue.popleft()
        amount = self._credit_in.consume(size, not self._queue)
        if amount:
            self._conn._send_control(Credit(Channel.STREAM, amount, self.id, self._opened_by_us))
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
        conn = self._conn
        if error is not None:
            conn._send_control(StreamReset(self.id, self._opened_by_us, *error))
        else:
            if not self._we_ended:
                self._we_ended = True
                conn._send_control(StreamEnd(self.id, self._opened_by_us))
            if not self._peer_ended and self._peer_reset is None:
                conn._send_control(StreamReset(self.id, self._opened_by_us))
        self._queue.clear()
        self._wakeup.set()
        self._credit_out.close()
        if self._opened_by_us:
            self._forget()

    def _forget(self) -> None:
        self._conn._streams.pop((self._opened_by_us, self.id), None)

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


async def serve_bus(
    stream: trio.abc.Stream,
    handlers: Handlers,
    *,
    name: str = "",
    config: BusConfig | None = None,
) -> None:
    """Serve ``handlers`` to the peer at the other end of ``stream`` until it leaves.

    Suitable as the handler of :func:`trio.serve_listeners` when you want errors
    to propagate; :func:`serve_bus_listeners` logs them instead.

    Args:
        stream: the accepted transport stream (owned and closed by this call).
        handlers: the methods and stream handlers to serve.
        name: our service name, sent in the handshake.
        config: limits and timers.

    Raises:
        RemoteProtocolError: the peer sent malformed input (the connection was
            closed with a close frame naming the error).
        ConnectionLost: the peer vanished without closing (crash, heartbeat).
        HandshakeError: the handshake failed (``VersionMismatch`` included).

    Cancellation:
        Closes the connection; running handlers are cancelled.

    Backpressure:
        Per connection, as configured in ``config``.
    """
    async with Connection.open(stream, handlers, name=name, config=config) as conn:
        await conn.wait_closed()
    err = conn.error
    if err is not None:
        raise err


async def serve_bus_listeners(
    handlers: Handlers,
    listeners: list[trio.abc.Listener[Any]],
    *,
    name: str = "",
    config: BusConfig | None = None,
    task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever and serve ``handlers`` on each.

    A connection that fails (malformed input, dead peer, bad handshake) is
    logged on the ``meshlink.bus`` logger and closed; the others go on.

    Args:
        handlers: what every connection serves.
        listeners: trio listeners (TCP, Unix, vchan...).
        name: our service name.
        config: limits and timers of each connection.
        task_status: receives ``listeners`` once accepting (``nursery.start``).

    Cancellation:
        Stops accepting and closes every connection.
    """

    async def one(stream: trio.abc.Stream) -> None:
        try:
            await serve_bus(stream, handlers, name=name, config=config)
        except (MeshlinkError, trio.BrokenResourceError, OSError) as exc:
            logger.info("bus connection ended with an error: %r", exc)

    await trio.serve_listeners(one, listeners, task_status=task_status)
