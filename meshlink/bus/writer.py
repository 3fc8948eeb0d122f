"""The outgoing side of a bus connection: one buffer, one writer task, batching.

Theory of operation
-------------------
The writer owns ``send_all``.  Every frame is packed by the task that produces
it and appended to one outgoing buffer (:attr:`Writer.outbuf`); the writer task
wakes on the next scheduler tick and sends the whole buffer in one
``send_all``, so frames produced in the same tick share one write (one ring or
socket write).  One exception, for latency: a reply, or a small request,
produced while nothing is queued and no send is in progress is sent at once by
the task that produced it (the worker: :meth:`Writer.send_reply`; the caller:
:meth:`Writer.send_direct`); frames produced meanwhile queue for the writer as
usual.  At most one ``send_all`` is ever in progress (``_sending``): a trio
stream allows one sender at a time.  The caller's send is shielded (it may be
cancelled at any time, and a send cut short leaves half a frame); the
worker's is not, because a shielded cancel scope costs more than the hop it
saves, and a worker is only cancelled when the connection shuts down, which
first waits for a reply in progress (:attr:`Writer.reply_lot`).

The buffer holds at most ``buffer_size`` bytes of application frames; a
producer that would overfill it waits (:meth:`Writer.send_flow`, which also
waits for the frame's credit window, see :mod:`.flow`).  Control frames (pong,
credit, cancel, close) skip that limit (:meth:`Writer.append`): they are small
and bounded by what the peer sends us; pongs are coalesced (at most one
queued, see :mod:`.dispatch`), since a peer may ping without limit.

Writing without waiting: a transport that can write part of a buffer at once,
synchronously, has a ``try_send(data) -> int`` method (vchan and the session
stream do; a trio ``SocketStream`` gets one from
:func:`meshlink.transport.nowait.nowait_sender`, a non-blocking ``write`` on
its socket).  Over such a transport a direct send
(:meth:`Writer.send_now`) is an ordinary function call: it takes no task
step, needs no shielded cancel scope (nothing can interrupt it halfway), and
whatever the transport does not take at once is queued for the writer task.
Over the others (TLS, test streams) the direct sends await ``send_all``.

The hottest producers (``Connection.notify`` and ``Rpc.call``) append to
:attr:`Writer.outbuf` and set :attr:`Writer.wakeup` themselves rather than
call in here: one function call per message is a measurable share of a
one-way stream.  That is why the fields they touch are public.

The writer does not know why a connection ends: it reports a failed send to the
``fail`` callback it was given and asks ``check_usable`` before queueing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from ..errors import ConnectionLost, SessionLost
from ..transport.nowait import nowait_sender
from .flow import CreditOut, Wakeup

__all__ = ["SCHEDULE_EVERY", "Writer"]

#: A send-side operation that did not have to wait still yields to the
#: scheduler once per this many calls (see "Cancellation" in the docstrings).
#: The writer only runs when the producer yields, so this is also the batch
#: size of a tight notify loop: 256 x 64-byte notifications (~19 KB per
#: send_all) measured +16% one-way over vchan against 64 (bench_bus, same
#: runs; fewer writes, ticks and receiver wakeups per message); 1024 gained
#: nothing more.  The send buffer limit still bounds large messages.
SCHEDULE_EVERY: Final = 256


class Writer:
    """The outgoing buffer of one connection and the task that drains it.

    Args:
        stream: the transport; only this object (the writer task, or a direct
            reply) calls its ``send_all``.
        buffer_size: bytes of application frames queued before producers wait.
        check_usable: raises when the connection can no longer be used.
        fail: ends the connection with the given error (a send failed).

    Attributes:
        outbuf: frames packed and not yet handed to ``send_all``.
        buffer_size: the limit on ``outbuf`` for application frames.
        wakeup: wakes the writer task; set it after appending to ``outbuf``.
        space_lot: producers waiting for room in ``outbuf``.
        done: set once the writer task has ended.
        closing: the connection is shutting down: the writer flushes and ends.
        direct_scope: the cancel scope of a request being sent directly by
            its caller, if any.
        replying: a worker is sending a reply directly (unshielded, see
            :meth:`send_reply`).
        reply_lot: the connection's shutdown, waiting for that reply.
        ops: calls since the last schedule point (see :data:`SCHEDULE_EVERY`).
        sends: ``outbuf`` handed to ``send_all`` so far (a frame appended when
            it had some value is still queued while it has that value).
        try_send: the transport's non-waiting write (:func:`nowait_sender`),
            or None.
    """

    __slots__ = (
        "_check_usable",
        "_fail",
        "_sending",
        "_stream",
        "_tx_broken",
        "buffer_size",
        "bytes_out",
        "closing",
        "direct_scope",
        "replying",
        "reply_lot",
        "done",
        "frames",
        "ops",
        "outbuf",
        "sends",
        "space_lot",
        "try_send",
        "wakeup",
    )

    def __init__(
        self,
        stream: trio.abc.SendStream,
        buffer_size: int,
        check_usable: Callable[[], None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self._stream = stream
        self.try_send = nowait_sender(stream)
        self._check_usable = check_usable
        self._fail = fail
        self.outbuf = bytearray()
        self.buffer_size = buffer_size
        self.wakeup = Wakeup()
        self.space_lot = trio.lowlevel.ParkingLot()
        self.done = trio.Event()
        self.closing = False
        self._sending = False  # a send_all is in progress (writer or direct send)
        self.direct_scope: trio.CancelScope | None = None  # of a caller's direct send
        self.replying = False
        self.reply_lot = trio.lowlevel.ParkingLot()
        self._tx_broken = False  # a send was cut short: the stream may hold half a frame
        self.ops = 0
        self.sends = 0
        # Statistics (meshlink.stats): plain increments, read only when asked.
        self.frames = 0  # frames queued or sent (the inline fast paths count too)
        self.bytes_out = 0  # bytes handed to send_all

    def append(self, data: bytes) -> None:
        """Queue a frame, ignoring the buffer limit (control frames)."""
        if self.closing and self.done.is_set():
            return  # deliberate: the writer is gone, the frame could never leave
        self.frames += 1
        self.outbuf += data
        self.wakeup.set()

    async def run(self) -> None:
        """The writer task: send whatever is queued, until closing and flushed."""
        try:
            while True:
                if self._tx_broken:
                    return
                if not self.outbuf or self._sending:
                    if self.closing and not self._sending:
                        return
                    await self.wakeup.wait()
                    continue
                data, self.outbuf = self.outbuf, bytearray()
                self.sends += 1
                self.bytes_out += len(data)
                if self.space_lot:
                    self.space_lot.unpark_all()
                self._sending = True
                try:
                    await self._stream.send_all(data)
                finally:
                    self._sending = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
        finally:
            self.done.set()

    def _send_failed(self, exc: BaseException) -> None:
        if isinstance(exc, SessionLost):  # the session layer already says why
            self._fail(exc)
            return
        lost = ConnectionLost(f"sending to the peer failed: {exc!r}")
        lost.__cause__ = exc
        self._fail(lost)

    def idle(self) -> bool:
        """True when a frame may be sent directly: nothing queued, no send in
        progress, the connection not closing and no earlier send cut short."""
        return not (self._sending or self.outbuf or self.closing or self._tx_broken)

    def send_now(self, data: bytes) -> bool:
        """Write ``data`` from this task at once, if the line is idle and the
        transport takes some of it without waiting; the rest is queued for
        the writer task.  Never waits.

        Returns:
            True if ``data`` was written (or partly written, the rest queued),
            or the write failed and the connection is ending (``fail`` was
            told); False if nothing was written (not idle, no non-waiting
            write, or the transport full): then use :meth:`send_direct` or
            :meth:`send_reply`.
        """
        try_send = self.try_send
        if try_send is None or self._sending or self.outbuf or self.closing or self._tx_broken:
            return False
        try:
            n = try_send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._tx_broken = True
            self._send_failed(exc)
            self.wakeup.set()
            return True
        if not n:
            return False
        self.frames += 1
        self.bytes_out += n
        if n < len(data):
            self.outbuf += memoryview(data)[n:]
            self.wakeup.set()
        return True

    async def send_reply(self, data: bytes) -> None:
        """Queue a reply, or send it from this (worker) task when the line is idle.

        As :meth:`send_direct`, without its cancel scope (which costs more
        than the writer's hop it saves, about 48k instructions against 41k
        here): a worker is only ever cancelled when the connection shuts
        down, and the shutdown first waits (``reply_lot``) for a reply being
        sent, within the same flush deadline as the writer's, unless the
        peer is gone.  A send cut short all the same (the deadline passed,
        the peer is gone, or whatever runs the connection was cancelled) may
        leave half a frame on the stream, so nothing more is sent.
        """
        if self._sending or self.outbuf or self.closing or self._tx_broken:
            self.append(data)
            return
        self._sending = True
        self.replying = True
        self.frames += 1
        self.bytes_out += len(data)
        try:
            await self._stream.send_all(data)
        except trio.Cancelled:
            self._tx_broken = True  # maybe half a frame on the stream
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
        finally:
            self._sending = False
            self.replying = False
            if self.reply_lot:
                self.reply_lot.unpark_all()
            if self.outbuf or self.closing or self._tx_broken:
                self.wakeup.set()

    async def send_direct(self, data: bytes) -> None:
        """Queue a frame, or send it from this task when the line is idle.

        For small requests, from the caller, which parks for the reply right
        after (replies use :meth:`send_reply`).  An idle line (nothing
        queued, no send in progress) means no batching is lost by sending at
        once, and it saves the frame a trip through the scheduler to the
        writer (one task step and one scheduler pass each way).  Anything
        queued meanwhile goes out with the writer's next send_all.

        The send is shielded: the caller may be cancelled at any time, and a
        send cut short may leave half a frame on the stream.  The connection
        gives it the same flush deadline as the writer when it shuts down
        (or cancels it when the peer is gone) through :attr:`direct_scope`;
        a send cut short that way leaves the stream broken, so nothing more
        is sent.  A failed send ends the connection (``fail``); this never
        raises for it.
        """
        if self._sending or self.outbuf or self.closing or self._tx_broken:
            self.append(data)
            return
        self._sending = True
        self.frames += 1
        self.bytes_out += len(data)
        scope = self.direct_scope = trio.CancelScope(shield=True)
        try:
            with scope:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
        finally:
            self._sending = False
            self.direct_scope = None
            if scope.cancelled_caught:
                self._tx_broken = True
            if self.outbuf or self.closing or self._tx_broken:
                self.wakeup.set()

    async def schedule_point(self) -> None:
        """A checkpoint (cancel and schedule point) every ``SCHEDULE_EVERY`` calls.

        Between those, nothing.  Another task that cancels this one runs only
        while this one yields, so the cancel is seen at the next of these
        checkpoints, at most ``SCHEDULE_EVERY`` calls later.  Looking for
        cancellation on every call cost a quarter of a tight notify loop's
        rate: an awaited ``checkpoint_if_cancelled`` is a coroutine call
        (bench_bus one-way over vchan, 0.62x of pyzmq with it, 0.81x without).
        """
        ops = self.ops + 1
        if ops >= SCHEDULE_EVERY:
            self.ops = 0
            await trio.lowlevel.checkpoint()
        else:
            self.ops = ops

    async def send_flow(self, data: bytes, credit: CreditOut | None) -> bool:
        """Queue an application frame once the credit window and the buffer allow.

        Returns False (frame dropped) if the credit's owner went away meanwhile.
        """
        size = len(data)
        limit = self.buffer_size
        while True:
            self._check_usable()
            if credit is not None and credit.closed:
                return False
            if credit is not None and not credit.allows(size):
                await credit.lot.park()
                self.ops = 0
                continue
            if len(self.outbuf) >= limit:
                await self.space_lot.park()
                self.ops = 0
                continue
            if credit is not None:
                credit.outstanding += size
            self.frames += 1
            self.outbuf += data
            self.wakeup.set()
            return True
