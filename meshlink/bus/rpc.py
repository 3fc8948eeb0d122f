"""Methods called by name, both ways: our calls and their replies, the peer's
requests and notifications run on our handlers.

Theory of operation
-------------------
A call packs a request with a fresh id, parks the calling task and is
rescheduled by the reader with the reply (or the error) for that id.  On an
idle line a small request is written by the caller itself
(:meth:`~.writer.Writer.send_direct`), saving a hop through the writer task;
until it parks, its entry in the call table is a :class:`_Sending`
placeholder, in which the reader (or the end of the connection) leaves the
outcome instead of rescheduling a task that is not waiting.  The
peer's ``max_concurrency`` bounds our calls in flight (a semaphore); a
cancelled call sends a cancel frame and keeps its slot until the peer answers,
because the peer still counts the handler until then.

The reader runs the handler of one of the peer's requests per chunk itself
(the *lead*, :meth:`Rpc.run_lead`): most async handlers finish without
suspending, and then the request costs no task switch.  One that suspends
keeps the reader's task, and at that first suspension an idle worker (or a
new task) becomes the reader; every reader and worker task runs
:meth:`Rpc.serve`, so the roles swap and the tasks are reused.  The other
requests run on long-lived *workers*, one handler at a time each: a request
costs a reschedule of an idle worker rather than a new task (about 6 us
here).  The core caps requests in flight at our ``max_concurrency``, which
caps the workers too.  Each handler runs in a fresh copy of the
connection's context (:class:`InContext`), as it would in a task of its own.
A worker's handlers share one cancel scope (a scope per request would cost
about two task steps), renewed after a cancel frame used it (see
:meth:`Rpc._work`); the reader's scope serves its lead handlers the same
way.  A worker's reply goes out without a scope of its own
(:meth:`~.writer.Writer.send_reply`).

The peer's notifications run one at a time, in order, in one task (the
*notify runner*); the notify window (credit, see :mod:`.flow`) bounds how many
bytes of them may queue here, and credit goes back as they run.

Ordering: a request's handler starts only after the handlers of every
notification that arrived before it have returned.  A request that finds the
notify queue empty (no notification waiting or running: the runner leaves a
notification at the head of the queue until its handler returns) starts at
once, the fast path; otherwise it joins the notify queue and the runner starts
its worker when it reaches it, without waiting for the handler.  A queued
request already counts against our ``max_concurrency`` (the core counted it on
arrival), which bounds the queued requests too.  A cancel for a queued request
takes it out (its entry stays in the deque as a dead one, compacted when they
pile up) and answers it as cancelled at once, its handler never run.  Once the
connection has ended the runner starts no queued request: like the ones
running, they get no reply.

Nothing here waits in the reader: the ``on_*`` methods only queue, reschedule
or raise :class:`~meshlink.RemoteProtocolError`, and a lead handler that
would wait hands the reading to another task first.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from functools import partial
from types import CoroutineType
from typing import Any, Final

import outcome
import trio

from ..errors import LocalProtocolError, RemoteProtocolError
from .errors import RemoteError
from .events import Cancel, Channel, Credit, Error, StreamEnd, StreamReset, Unsubscribe
from .flow import CreditIn, Wakeup
from .handlers import Handlers
from .proto import BusProtocol
from .writer import Writer

__all__ = ["InContext", "Reading", "Rpc"]

logger = logging.getLogger("meshlink.bus")

#: The arguments of a job that answers a request as cancelled without running
#: its handler (a request cancelled while it waited in the notify queue);
#: compared by identity, never filled.
_NOT_STARTED: Final[list[Any]] = []

#: Jobs that are orders to a worker, compared by identity: wait idle for a
#: request (_PARK), or become the reader (_READ).
_PARK: Final[tuple[int, str, list[Any]]] = (-1, "", [])
_READ: Final[tuple[int, str, list[Any]]] = (-1, "", [])

#: Dead entries (queued requests since cancelled) the notify queue may hold
#: before a compaction, and at least half of it must be dead.
_COMPACT_ABOVE: Final = 64


def _awaitable(value: object) -> bool:
    """What a plain-def handler returned is to be awaited (``inspect.isawaitable``,
    with the common answers first: its ABC check is slow for a hot path)."""
    t = type(value)
    if t is CoroutineType:
        return True
    if t in (int, str, bytes, float, bool, list, dict, tuple):
        return False
    return inspect.isawaitable(value)


class InContext:
    """Await a coroutine with every step run in ``context`` (as its own task would).

    Handlers run in long-lived worker tasks; this keeps the context variables
    a handler sets from leaking into the next handler that worker runs.
    """

    __slots__ = ("_context", "_coro", "_on_suspend", "suspended")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context,
                 on_suspend: Callable[[], None] | None = None) -> None:
        self._coro = coro
        self._context = context
        #: Called once, when the coroutine first suspends, before trio sees it.
        self._on_suspend = on_suspend
        #: Whether the coroutine suspended (passed something to trio) at all.
        self.suspended = False

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
            if not self.suspended:
                self.suspended = True
                if self._on_suspend is not None:
                    self._on_suspend()
            try:
                value = yield yielded
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # Cancelled included: pass it in
                error = exc
                value = None


#: A request up to this size is written by the caller itself when the line is
#: idle (see :meth:`Rpc.call`); a larger one goes through the writer task, so
#: that a cancelled call never waits long for its own request to be written.
DIRECT_REQUEST_MAX: Final = 16 * 1024


class _Sending:
    """The place of a call whose caller is still writing its request directly.

    The caller has not parked yet, so it cannot be rescheduled: a reply (or
    the end of the connection) that comes meanwhile is left here instead.
    """

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: outcome.Outcome[Any] | None = None


class _Worker:
    """A long-lived task that runs request handlers, one at a time."""

    __slots__ = ("job", "task")

    def __init__(self, task: trio.lowlevel.Task, job: tuple[int, str, list[Any]]) -> None:
        self.task = task
        self.job = job  # the request it runs (or ran last)


class Reading:
    """One task's turn as the reader (see :meth:`Rpc.serve`): its cancel
    scope, and the lead request it kept when that request's handler suspended."""

    __slots__ = ("answer", "id", "scope")

    def __init__(self) -> None:
        #: Cancelled by the lead handler's cancel frame (see Rpc.run_lead).
        self.scope = trio.CancelScope()
        self.id = -1
        self.answer: tuple[Any, tuple[str, str] | None] | None = None


class Rpc:
    """The method calls of one connection, both ways.

    Args:
        proto: the connection's protocol core (packs requests and replies).
        writer: the connection's writer (replies and requests go out there).
        handlers: what we serve (its methods are looked up by name).
        notify_window: our notify window, in bytes.
        check_usable: raises once the connection has ended.
        send_control: queue a control frame unless the connection has ended.
        spawn: start a background task of the connection (a new worker).
        read: the reader's loop, run by whichever task is the reader (see
            :meth:`serve`): True once the stream ended, False once a lead
            handler suspended and another task reads.

    Attributes:
        call_slots: our calls the peer will still accept (its
            ``max_concurrency``, set once its hello is in).
        notify_queue: notifications received and not yet run, the one
            running included (it leaves the queue when its handler returns):
            ``(method, args, wire size)``; and requests that arrived behind
            them: ``(method, args, -1 - id)`` (a negative size).
        notify_wakeup: wakes the notify runner; the reader sets it once per
            chunk that queued notifications.
    """

    __slots__ = (
        "_calls",
        "_check_usable",
        "_dead",
        "_ended",
        "_handler_scopes",
        "_idle_workers",
        "_read",
        "_handlers",
        "_inline_context",
        "_next_call_id",
        "_notify_in",
        "_proto",
        "_queued",
        "_send_control",
        "_spawn",
        "_suspends",
        "_writer",
        "call_slots",
        "lead",
        "notify_queue",
        "notify_wakeup",
        "served",
        "served_errors",
    )

    def __init__(
        self,
        proto: BusProtocol,
        writer: Writer,
        handlers: Handlers,
        notify_window: int,
        *,
        check_usable: Callable[[], None],
        send_control: Callable[[Cancel | Credit | StreamEnd | StreamReset | Unsubscribe], None],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        read: Callable[[Reading], Awaitable[bool]],
    ) -> None:
        self._proto = proto
        self._writer = writer
        self._handlers = handlers
        self._check_usable = check_usable
        self._ended = False  # see end()
        self._send_control = send_control
        self._spawn = spawn
        # our calls
        self._next_call_id = 0
        self._calls: dict[int, trio.lowlevel.Task | _Sending] = {}
        self.call_slots = trio.Semaphore(1)  # resized after the handshake
        # the peer's requests
        self._handler_scopes: dict[int, trio.CancelScope] = {}
        self._idle_workers: list[_Worker] = []
        #: A request whose async handler the reader runs itself, once the
        #: frames at hand are handled (see run_lead).
        self.lead: tuple[int, str, list[Any]] | None = None
        #: Methods whose handler suspended when it last ran: they go to a
        #: worker, not the reader (a role swap per call costs more than the
        #: worker's hop); one that then runs without suspending leaves it.
        self._suspends: set[str] = set()
        self._read = read
        # the peer's notifications
        self._notify_in = CreditIn(notify_window)
        self.notify_queue: deque[tuple[str, list[Any], int]] = deque()
        self.notify_wakeup = Wakeup()
        # Requests waiting in notify_queue, by id, with their entry there (an
        # id may come again once answered, so the runner checks the identity).
        self._queued: dict[int, tuple[str, list[Any], int]] = {}
        self._inline_context: contextvars.Context | None = None  # see on_notifications
        self._dead = 0  # entries of notify_queue whose request was cancelled
        # Statistics (meshlink.stats): the peer's requests answered, and of
        # those, answered with an error.
        self.served = 0
        self.served_errors = 0

    def end(self, error: Callable[[], BaseException]) -> None:
        """The connection ended: wake every pending call with a fresh ``error()``.

        The connection calls this in the same step as it records why it
        ended, so from here on no handler's reply is sent; keeping the flag
        here spares every request a call back into the connection to ask.
        """
        self._ended = True
        calls, self._calls = self._calls, {}
        for task in calls.values():
            if isinstance(task, _Sending):
                task.outcome = outcome.Error(error())
            else:
                trio.lowlevel.reschedule(task, outcome.Error(error()))

    # --- our calls -----------------------------------------------------------------

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        """``Connection.call`` without its timeout convenience."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        try:
            # A free slot costs no trip through the scheduler (latency matters here).
            self.call_slots.acquire_nowait()
        except trio.WouldBlock:
            await self.call_slots.acquire()
        writer = self._writer
        try:
            while len(writer.outbuf) >= writer.buffer_size:
                await writer.space_lot.park()
                self._check_usable()
            self._check_usable()
            call_id = self._next_call_id
            self._next_call_id += 1
            data = self._proto.pack_request(call_id, method, args)
        except BaseException:
            self.call_slots.release()
            raise
        calls = self._calls
        small = len(data) <= DIRECT_REQUEST_MAX
        if small and writer.send_now(data):
            # Written without waiting (or the connection ended meanwhile:
            # then end() already ran, and the call must not park).
            if self._ended:
                self.call_slots.release()
                self._check_usable()
            calls[call_id] = trio.lowlevel.current_task()
        elif small and writer.idle():
            # The line is idle: write the request from this task (no hop
            # through the writer task).  The reply may come in while the send
            # finishes, before this task parks: on_reply leaves it here then.
            sending = _Sending()
            calls[call_id] = sending
            await writer.send_direct(data)
            if sending.outcome is not None:  # the reply (or the end) came already
                return sending.outcome.unwrap()
            calls[call_id] = trio.lowlevel.current_task()
        else:
            writer.outbuf += data
            writer.frames += 1
            writer.wakeup.set()
            calls[call_id] = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            # The slot stays taken until the peer answers the cancel: it still
            # counts the handler against our concurrency limit until then.
            self._calls.pop(call_id, None)
            self._send_control(Cancel(call_id))
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def on_reply(self, id: int, result: Any) -> None:
        self.call_slots.release()
        task = self._calls.pop(id, None)
        if task is None:
            return  # deliberate no-op, the caller was cancelled; the slot is free now
        if isinstance(task, _Sending):
            task.outcome = outcome.Value(result)
        else:
            trio.lowlevel.reschedule(task, outcome.Value(result))

    def on_error(self, id: int, type: str, message: str) -> None:
        self.call_slots.release()
        task = self._calls.pop(id, None)
        if task is None:
            return  # deliberate no-op, the caller was cancelled; the slot is free now
        if isinstance(task, _Sending):
            task.outcome = outcome.Error(RemoteError(type, message))
        else:
            trio.lowlevel.reschedule(task, outcome.Error(RemoteError(type, message)))

    # --- the peer's requests -------------------------------------------------------

    def on_request(self, id: int, method: str, args: list[Any]) -> None:
        queue = self.notify_queue
        if queue:
            # A notification waits or runs: this request starts after it.
            entry = (method, args, -1 - id)
            queue.append(entry)
            self._queued[id] = entry
            return
        if (self.lead is None and method not in self._suspends
                and method not in self._handlers.inline
                and method in self._handlers.methods and not self._ended
                and len(self._writer.outbuf) < self._writer.buffer_size):
            self.lead = (id, method, args)  # the reader runs it: see run_lead
            return
        self._start(id, method, args)

    def _start(self, id: int, method: str, args: list[Any]) -> None:
        """Run a request's plain-function handler inline, or hand the request
        to an idle worker, or to a new one."""
        if args is not _NOT_STARTED:
            fn = self._handlers.inline.get(method)
            # Inline only while the reply can be queued without waiting for
            # room: a peer that never reads must not grow our buffer.
            if fn is not None and len(self._writer.outbuf) < self._writer.buffer_size:
                self._run_inline(id, fn, args)
                return
        idle = self._idle_workers
        if idle:
            worker = idle.pop()
            worker.job = (id, method, args)
            trio.lowlevel.reschedule(worker.task)
        else:
            self._spawn(partial(self.serve, (id, method, args)))

    def _run_inline(self, id: int, fn: Callable[..., Any], args: list[Any]) -> None:
        """Run a plain-function handler here (in the reader, or the notify
        runner) and queue or write its reply, without a task switch.

        It runs in a copy of the current context, as a worker's handler does.
        A plain function that returned an awaitable was an async handler in
        disguise: a task awaits it and answers (cancellable like a worker's).
        """
        failure: tuple[str, str] | None = None
        try:
            result = contextvars.copy_context().run(fn, *args)
        except Exception as exc:
            result, failure = None, (type(exc).__name__, str(exc))
        else:
            if result is not None and _awaitable(result):
                self._spawn(partial(self._await_answer, id, result))
                return
        self._answer_now(id, result, failure)

    def _answer_now(self, id: int, result: Any, failure: tuple[str, str] | None) -> None:
        """Write the reply to request ``id`` from this task, or queue it for the
        writer, without waiting: for a handler run by the reader (or the
        notify runner), which checked beforehand that the buffer has room."""
        if self._ended:
            return
        data = self._pack_answer(id, result, failure)
        writer = self._writer
        if not writer.send_now(data):
            writer.outbuf += data
            writer.frames += 1
            writer.wakeup.set()

    async def _await_answer(self, id: int, awaitable: Awaitable[Any]) -> None:
        answer: tuple[Any, tuple[str, str] | None] = (
            None, ("Cancelled", "the handler was cancelled"))
        scopes = self._handler_scopes
        with trio.CancelScope() as scope:
            scopes[id] = scope
            try:
                answer = (await awaitable, None)
            except Exception as exc:
                answer = (None, (type(exc).__name__, str(exc)))
            finally:
                del scopes[id]
        await self._answer(id, *answer)

    def on_cancel(self, id: int) -> None:
        scope = self._handler_scopes.get(id)
        if scope is not None:
            scope.cancel()
            return
        entry = self._queued.pop(id, None)
        if entry is not None:
            # Still behind notifications: answer it now, never run its handler.
            self._dead += 1
            if self._dead > _COMPACT_ABOVE and 2 * self._dead > len(self.notify_queue):
                self._compact()
            self._start(id, entry[0], _NOT_STARTED)
        # else: deliberate no-op, the handler finished before the cancel arrived

    def _compact(self) -> None:
        """Drop the dead entries of the notify queue, in place, keeping the order.

        A peer that keeps sending requests and cancelling them while a
        notification runs would otherwise grow the queue without bound.  The
        head (a notification whose handler may be running) stays the head.
        """
        queue = self.notify_queue
        queued = self._queued
        live = [e for e in queue if e[2] >= 0 or queued.get(-1 - e[2]) is e]
        queue.clear()
        queue.extend(live)
        self._dead = 0

    async def serve(self, job: tuple[int, str, list[Any]] | None) -> None:
        """The loop of every reader and worker task of this connection.

        A task starts as the reader (``job`` None) or as a worker with its
        first request.  The roles swap when the reader runs a request's
        async handler itself (:meth:`run_lead`) and the handler suspends:
        that task answers and becomes a worker, and an idle worker (or a new
        task) becomes the reader.  One task reads at a time, and every task
        is reused, so there are never more than the requests in flight plus
        one.
        """
        while True:
            if job is None:
                reading = Reading()
                with reading.scope:
                    if await self._read(reading):
                        return  # the stream ended or failed: the connection ends
                # The lead handler suspended, so another task reads now.  Its
                # answer goes out here, outside the scope its cancel used.
                answer = reading.answer
                if answer is None or reading.scope.cancelled_caught:
                    answer = (None, ("Cancelled", "the handler was cancelled"))
                await self._answer(reading.id, *answer)
                job = _PARK
            await self._work(job)
            job = None  # promoted: read

    async def run_lead(self, reading: Reading) -> bool:
        """Run the handler of :attr:`lead` in this task, the reader's.

        Most async handlers finish without ever suspending (nothing they
        await has to wait): then the reader answers and reads on, and the
        request cost no task switch, as a plain-def handler run inline.  A
        method whose handler suspended goes to workers from then on, until
        it runs once without suspending (``_suspends``).  At a handler's
        first suspension, before trio sees it, an idle worker (or a new
        task) is made the reader, and this task keeps the handler.

        ``reading.scope`` is the reader's cancel scope, which this handler's
        cancel frame cancels while, and only while, it runs (as a worker's).
        No cancel frame can be read before the handler suspends: this task
        is the one that reads.

        Returns:
            True when the handler finished without suspending (answered:
            read on); False when it suspended and finished: this task is no
            longer the reader (:meth:`serve` sends the answer).  A cancel
            raises ``trio.Cancelled`` out to :meth:`serve`'s scope.
        """
        lead = self.lead
        assert lead is not None
        self.lead = None
        id, method, args = lead
        reading.id = id
        try:
            coro = self._handlers.methods[method](*args)  # runs no handler code yet
        except Exception as exc:  # the wrong number of arguments, say
            self._answer_now(id, None, (type(exc).__name__, str(exc)))
            return True
        if type(coro) is not CoroutineType:
            if _awaitable(coro):  # some other awaitable: a task of its own awaits it
                self._spawn(partial(self._await_answer, id, coro))
            else:
                self._answer_now(id, coro, None)
            return True
        scopes = self._handler_scopes
        scopes[id] = reading.scope
        step = InContext(coro, contextvars.copy_context(), self._promote)
        answer: tuple[Any, tuple[str, str] | None]
        try:
            answer = (await step, None)
        except Exception as exc:
            answer = (None, (type(exc).__name__, str(exc)))
        finally:
            del scopes[id]
        if step.suspended:
            self._suspends.add(method)
            reading.answer = answer
            return False
        self._answer_now(id, *answer)  # on_request checked the buffer has room
        return True

    def _promote(self) -> None:
        """Make another task the reader: an idle worker, or a new task."""
        idle = self._idle_workers
        if idle:
            worker = idle.pop()
            worker.job = _READ
            trio.lowlevel.reschedule(worker.task)
        else:
            self._spawn(partial(self.serve, None))

    async def _work(self, job: tuple[int, str, list[Any]]) -> None:
        """Run request handlers: ``job``, then whatever the reader hands over,
        until this task is made the reader (returns then).  ``job`` may be
        :data:`_PARK`: wait idle for the first one.

        The handlers run under one cancel scope per worker, not one per
        request (a cancel scope costs as much as two task steps): a cancel
        frame cancels the worker's scope while, and only while, the handler
        of that request runs (it is in ``_handler_scopes`` only then).  A
        cancelled scope cannot be used again, so the worker then leaves it,
        answers that request outside it and opens a new one for the next.
        """
        me = _Worker(trio.lowlevel.current_task(), job)
        idle = self._idle_workers
        base = contextvars.copy_context()
        wait = trio.lowlevel.wait_task_rescheduled

        def abort(_: Any) -> trio.lowlevel.Abort:
            idle.remove(me)
            return trio.lowlevel.Abort.SUCCEEDED

        if job is _PARK:
            idle.append(me)
            await wait(abort)
        while me.job is not _READ:
            scope = trio.CancelScope()
            answer: tuple[Any, tuple[str, str] | None] | None = None
            with scope:
                while True:
                    answer = None
                    answer = await self._run_handler(*me.job, base.copy(), scope)
                    if scope.cancel_called:
                        break  # this request's cancel: answer it outside the scope
                    await self._answer(me.job[0], *answer)
                    idle.append(me)
                    await wait(abort)
                    if me.job is _READ:
                        return
            # The handler of me.job was cancelled by its caller.  It may still
            # have returned (a cancel only lands at a checkpoint), then its
            # answer stands, as it would under a scope of its own.
            if answer is None or scope.cancelled_caught:
                answer = (None, ("Cancelled", "the handler was cancelled"))
            await self._answer(me.job[0], *answer)
            idle.append(me)
            await wait(abort)

    async def _run_handler(
        self,
        id: int,
        method: str,
        args: list[Any],
        context: contextvars.Context,
        scope: trio.CancelScope,
    ) -> tuple[Any, tuple[str, str] | None]:
        """Run the handler of request ``id`` in ``context``: (result, failure).

        ``scope`` (the worker's) is what a cancel frame for ``id`` cancels
        meanwhile; ``trio.Cancelled`` goes through to the worker.
        """
        if args is _NOT_STARTED:
            return None, ("Cancelled", "the call was cancelled before its handler started")
        fn = self._handlers.methods.get(method)
        if fn is None:
            return None, ("MethodNotFound", f"no method {method!r}")
        scopes = self._handler_scopes
        scopes[id] = scope
        try:
            if method in self._handlers.inline:
                # A plain function that could not run inline (the outgoing
                # buffer was full): run it here, in its own context.
                coro = context.run(fn, *args)
                if coro is None or not _awaitable(coro):
                    return coro, None
            else:
                coro = fn(*args)
            if type(coro) is CoroutineType:
                step = InContext(coro, context)
                result = await step
                if not step.suspended:
                    self._suspends.discard(method)  # the reader may run it again
                return result, None
            return await coro, None  # some other awaitable: no context of its own
        except Exception as exc:
            return None, (type(exc).__name__, str(exc))
        finally:
            del scopes[id]

    async def _answer(self, id: int, result: Any, failure: tuple[str, str] | None) -> None:
        """Pack and send the reply (or error) to request ``id``."""
        writer = self._writer
        while len(writer.outbuf) >= writer.buffer_size and not self._ended:
            # A peer that sends requests but never reads must not grow our
            # buffer: the reply waits for room, and its request goes on
            # counting against the max_concurrency we announced until packed.
            await writer.space_lot.park()
        if self._ended:
            return
        data = self._pack_answer(id, result, failure)
        if not writer.send_now(data):
            await writer.send_reply(data)

    def _pack_answer(self, id: int, result: Any, failure: tuple[str, str] | None) -> bytes:
        """The reply (or error) frame to request ``id``, counted as served."""
        self.served += 1
        proto = self._proto
        if failure is not None:
            self.served_errors += 1
            return proto.send(Error(id, *failure))
        try:
            return proto.pack_reply(id, result)
        except LocalProtocolError as exc:
            return proto.send(Error(id, "LocalProtocolError", str(exc)))

    # --- the peer's notifications --------------------------------------------------

    def on_notifications(self, batch: list[tuple[str, list[Any], int]], total: int) -> None:
        credit = self._notify_in
        unacked = credit.unacked
        # Frame by frame the rule is "unacked and unacked + size > window"
        # (a frame larger than the window may come alone).  Over a batch the
        # total can only exceed the window if some frame broke that rule, unless
        # the batch is that one lone frame.
        if unacked + total > credit.window and (unacked or len(batch) > 1):
            raise RemoteProtocolError(f"peer overran the notify window of {credit.window} bytes")
        credit.unacked = unacked + total
        queue = self.notify_queue
        if not queue and batch[0][0] in self._handlers.inline:
            batch = self._run_inline_notifications(batch)
        queue.extend(batch)

    def _run_inline_notifications(
        self, batch: list[tuple[str, list[Any], int]]
    ) -> list[tuple[str, list[Any], int]]:
        """Run the leading notifications of ``batch`` whose handlers are plain
        functions, here in the reader (nothing runs or waits before them: the
        queue is empty); return the rest, from the first async one on.

        They run in one context of their own (as the runner's handlers share
        the runner's), so what they set does not reach the workers the reader
        starts.  The bytes they took are credited back at once.
        """
        inline = self._handlers.inline
        context = self._inline_context
        if context is None:
            context = self._inline_context = contextvars.copy_context()
        run = context.run
        done = 0
        n = 0
        for method, args, size in batch:
            fn = inline.get(method)
            if fn is None:
                break
            n += 1
            done += size
            try:
                returned = run(fn, *args)
                if returned is not None and _awaitable(returned):
                    # An async handler in disguise (``lambda x: f(x)``): it
                    # was called, so it runs, in a task of its own and out of
                    # order; from now on the runner awaits it, in order.
                    inline.pop(method, None)
                    logger.warning(
                        "notification handler %r is a plain function that returned an "
                        "awaitable: register it with async def to keep the order", method)
                    self._spawn(partial(self._await_notification, method, returned))
            except Exception:
                logger.exception("notification handler %r raised", method)
        credit = self._notify_in
        credit.unacked -= done
        self._send_control(Credit(Channel.NOTIFY, done))
        return batch[n:] if n < len(batch) else []

    async def _await_notification(self, method: str, awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("notification handler %r raised", method)

    async def run_notifications(self) -> None:
        """The notify runner: run queued notifications in order, forever, and
        start the requests queued behind them as it reaches them."""
        queue = self.notify_queue
        credit = self._notify_in
        quarter = credit.window // 4
        methods = self._handlers.methods
        inline = self._handlers.inline
        queued = self._queued
        pending = 0  # bytes run and not yet credited back
        popleft = queue.popleft
        get = methods.get
        # Workers started from here copy this context, not the one the notify
        # handlers run in (and may have set variables in).
        clean = contextvars.copy_context()
        start = self._start
        while True:
            if not queue:
                await self.notify_wakeup.wait()
            # Run the whole batch the reader queued; credit goes back every
            # quarter window and when the queue runs dry.
            while queue:
                entry = queue[0]  # stays queued while it runs: see on_request
                method, args, size = entry
                if size < 0:  # a request: start it, do not wait for it
                    popleft()
                    id = -1 - size
                    if queued.get(id) is entry:
                        del queued[id]
                        if not self._ended:
                            clean.run(start, id, method, args)
                    else:  # cancelled while queued, already answered
                        self._dead -= 1
                    if pending and not queue:
                        credit.unacked -= pending
                        self._send_control(Credit(Channel.NOTIFY, pending))
                        pending = 0
                    continue
                fn = get(method)
                if fn is None:
                    logger.warning("notification for unknown method %r ignored", method)
                else:
                    try:
                        if method in inline:
                            returned = fn(*args)
                            if returned is not None and _awaitable(returned):
                                await returned
                        else:
                            await fn(*args)
                    except Exception:
                        logger.exception("notification handler %r raised", method)
                popleft()
                pending += size
                if pending >= quarter or not queue:
                    credit.unacked -= pending
                    self._send_control(Credit(Channel.NOTIFY, pending))
                    pending = 0
