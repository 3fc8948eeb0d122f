"""The scheduler cost of one bus call, counted, and the direct request path.

A call's latency in one process is mostly trio task steps (each a switch into
a task and out again) and scheduler passes (each a run of the trio loop: one
I/O poll, then the batch of tasks that became runnable).  A trio Instrument
counts both for ONE steady-state call between two connections in one process:

* task steps: ``before_task_step`` events;
* scheduler passes: ``after_io_wait`` events.  Trio calls it once per loop
  iteration, whether the poll waited or not, and every batch of task steps
  follows one; so it counts the sequential hops of the call (its critical
  path), where the steps count all the work done for it.  ``before_run`` /
  ``after_run`` fire once per ``trio.run`` and count nothing here.

The counts start just after the caller's own step that made the call began
(the instrument is added inside it) and include the step in which the caller
resumes with the result.  Heartbeats are off, so no timer task runs.

The ceilings are what this design reaches (see docs/architecture.md, section 4):

* ``socketpair``: 3 steps, 3 passes (before the caller wrote its own request:
  7 and 5; before writes that do not wait, 6 and 4; before the reader ran
  async handlers itself, 4 and 4).  Left: the peer's reader runs the handler
  and writes the reply (one step and pass) and our reader hands the reply to
  the caller (one step and pass).  A plain-def handler takes the same 3 and 3
  (tests/test_bus_inline.py).  Fewer passes would need the caller to read its
  own reply (see docs/architecture.md).
* ``trio.testing.memory_stream_pair``: 11 steps, 8 passes (before: 11 and 9).
  Its ``send_all`` and ``receive_some`` each run two checkpoints of their own
  before touching the data (on purpose, to catch concurrent use), so four of
  the hops are the test stream's; no design above the Stream interface removes
  them.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from meshlink import ConnectionLost
from meshlink.bus import BusConfig, Connection, Handlers, RemoteError
from meshlink.bus.codec import PROTOCOL_VERSION
from meshlink.bus.events import NEED_DATA, Close, ConnectionClosed, Hello, Reply, Request
from meshlink.bus.proto import BusProtocol
from meshlink.bus.rpc import DIRECT_REQUEST_MAX

CONFIG = BusConfig(heartbeat_interval=None)
WARMUP = 20

#: (task steps, scheduler passes) at most, per transport.
CEILING = {"memory": (11, 8), "socket": (3, 3)}


class StepCounter(trio.abc.Instrument):
    """Counts task steps (by task name) and scheduler passes while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.steps: Counter[str] = Counter()
        self.passes = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.steps[task.name.rsplit(".", 1)[-1]] += 1

    def after_io_wait(self, timeout: float) -> None:
        if self.on:
            self.passes += 1


def _pair(kind: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


@asynccontextmanager
async def _connected(
    a: trio.abc.Stream, b: trio.abc.Stream, handlers: Handlers
) -> AsyncIterator[tuple[Connection, Connection]]:
    """(client on ``a``, server on ``b`` serving ``handlers``); both close at the end."""
    async with trio.open_nursery() as nursery:
        box: list[Connection] = []
        up = trio.Event()
        done = trio.Event()

        async def server() -> None:
            async with Connection.open(b, handlers, name="srv", config=CONFIG) as s:
                box.append(s)
                up.set()
                await done.wait()

        nursery.start_soon(server)
        async with Connection.open(a, name="client", config=CONFIG) as client:
            await up.wait()
            yield client, box[0]
        done.set()


def _echo_handlers() -> Handlers:
    handlers = Handlers()

    @handlers.method
    async def echo(x: Any) -> Any:
        return x

    return handlers


async def count_one_call(
    kind: str, handlers: Handlers | None = None
) -> tuple[int, int, Counter[str]]:
    """Steps, passes and steps by task of one steady-state call over ``kind``
    (of ``echo``, an async handler unless ``handlers`` has another)."""
    a, b = _pair(kind)
    async with _connected(a, b, handlers or _echo_handlers()) as (client, _):
        for i in range(WARMUP):  # workers spawned, buffers grown
            assert await client.call("echo", i) == i
        await trio.testing.wait_all_tasks_blocked()
        counter = StepCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            counter.on = True
            result = await client.call("echo", "x")
            counter.on = False
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert result == "x"
    return sum(counter.steps.values()), counter.passes, counter.steps


@pytest.mark.parametrize("kind", ["memory", "socket"])
async def test_one_call_stays_under_the_step_ceiling(kind: str) -> None:
    steps, passes, by_task = await count_one_call(kind)
    max_steps, max_passes = CEILING[kind]
    assert steps <= max_steps, f"{kind}: {steps} task steps ({dict(by_task)})"
    assert passes <= max_passes, f"{kind}: {passes} scheduler passes"
    if kind == "socket":
        # The caller wrote its own request, and the peer's reader its reply:
        # the writer tasks took no step.  (A memory stream has no write that
        # never waits, so there the peer's reader queues its reply for the
        # writer.)
        assert "run" not in by_task, dict(by_task)


async def test_large_request_goes_through_the_writer() -> None:
    """A request above DIRECT_REQUEST_MAX is queued for the writer task, so a
    cancelled caller never waits for a long write of its own."""
    a, b = _pair("socket")
    async with _connected(a, b, _echo_handlers()) as (client, _):
        await client.call("echo", 0)
        await trio.testing.wait_all_tasks_blocked()
        counter = StepCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            counter.on = True
            blob = b"z" * (DIRECT_REQUEST_MAX + 1)
            assert await client.call("echo", blob) == blob
            counter.on = False
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps["run"] >= 1, dict(counter.steps)


@asynccontextmanager
async def _hooked_pair(
    handlers: Handlers,
) -> AsyncIterator[tuple[Connection, Connection, list[Callable[[], Awaitable[None]]]]]:
    """Connections over a memory pair whose client->server ``send_all`` runs
    the hooks in ``hooks`` (popped one per send) after the data went over:
    the caller is then still inside its direct send."""
    a, b = trio.testing.memory_stream_pair()
    hooks: list[Callable[[], Awaitable[None]]] = []
    pump = a.send_stream.send_all_hook
    assert pump is not None

    async def hook() -> None:
        await pump()
        if hooks:
            await hooks.pop()()

    async with _connected(a, b, handlers) as (client, server):
        await client.call("echo", 0)
        await trio.testing.wait_all_tasks_blocked()
        a.send_stream.send_all_hook = hook
        yield client, server, hooks


async def test_reply_that_comes_while_the_caller_still_sends() -> None:
    """The peer answers before the caller's send_all returns: the reader leaves
    the reply for the caller, who returns it without parking."""
    async with _hooked_pair(_echo_handlers()) as (client, _, hooks):
        hooks.append(trio.testing.wait_all_tasks_blocked)  # the peer answers meanwhile
        assert await client.call("echo", "early") == "early"
        assert not client._rpc._calls
        assert await client.call("echo", "next") == "next"  # the slot was released


async def test_error_that_comes_while_the_caller_still_sends() -> None:
    handlers = _echo_handlers()

    @handlers.method
    async def boom() -> None:
        raise ValueError("no")

    async with _hooked_pair(handlers) as (client, _, hooks):
        hooks.append(trio.testing.wait_all_tasks_blocked)
        with pytest.raises(RemoteError) as info:
            await client.call("boom")
        assert (info.value.remote_type, info.value.remote_message) == ("ValueError", "no")
        assert not client._rpc._calls
        assert await client.call("echo", "next") == "next"


async def test_connection_ends_while_the_caller_still_sends() -> None:
    async with _hooked_pair(_echo_handlers()) as (client, _, hooks):

        async def end_it() -> None:
            client.abort(ConnectionLost("cut in the test"))

        hooks.append(end_it)
        with pytest.raises(ConnectionLost):
            await client.call("echo", "never")
        assert not client._rpc._calls


async def test_caller_cancelled_while_it_still_sends_cancels_the_handler() -> None:
    """The request went out whole; the cancel that came meanwhile takes
    effect when the caller parks: a cancel frame goes out and the peer's
    handler sees trio.Cancelled."""
    handlers = _echo_handlers()
    started = trio.Event()
    handler_cancelled = trio.Event()

    @handlers.method
    async def hang() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            handler_cancelled.set()
            raise

    async with _hooked_pair(handlers) as (client, _, hooks):
        with trio.CancelScope() as scope:

            async def cancel_caller() -> None:
                await started.wait()
                scope.cancel()

            hooks.append(cancel_caller)
            await client.call("hang")
        assert scope.cancelled_caught
        with trio.fail_after(5):
            await handler_cancelled.wait()
        # the slot comes back once the peer answered the cancel
        assert await client.call("echo", "after") == "after"


@pytest.mark.parametrize("suspends", [True, False])
async def test_close_lets_a_reply_in_progress_finish_whole(suspends: bool) -> None:
    """A worker's reply is sent without a cancel scope of its own, and the
    reply of a handler the reader ran (it never suspended) is the writer's:
    closing the connection while either is being written waits for it
    (within close_timeout), so the peer reads the whole reply and then the
    close frame."""
    a, b = trio.testing.lockstep_stream_pair()  # send_all waits for the reader
    handlers = Handlers()

    @handlers.method
    async def big(n: int) -> bytes:
        if suspends:
            await trio.lowlevel.checkpoint()  # from here on a worker runs it
        return b"x" * n

    config = BusConfig(heartbeat_interval=None, close_timeout=10)
    hello = Hello(PROTOCOL_VERSION, ["rpc"], "raw", 8, 1 << 20, 1 << 20, 1 << 24)
    core = BusProtocol(hello)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            box: list[Connection] = []

            async def server() -> None:
                async with Connection.open(b, handlers, config=config) as conn:
                    box.append(conn)
                    await conn.wait_closed()

            nursery.start_soon(server)
            await a.send_all(core.send(hello))
            while not isinstance(core.next_event(), Hello):
                core.receive_data(await a.receive_some(1))
            await trio.testing.wait_all_tasks_blocked()
            await a.send_all(core.send(Request(0, "big", [200_000])))
            await trio.testing.wait_all_tasks_blocked()
            if suspends:
                assert box[0]._replying  # the worker is writing the reply itself
            else:
                assert box[0]._writer._sending  # the writer task is writing it
            nursery.start_soon(box[0].aclose)
            await trio.testing.wait_all_tasks_blocked()
            events: list[Any] = []
            for _ in range(1000):  # bounded: 200 KB arrive in a few reads
                core.receive_data(await a.receive_some(65536))
                while (event := core.next_event()) is not NEED_DATA:
                    events.append(event)
                    if isinstance(event, Close | ConnectionClosed):
                        break
                if events and isinstance(events[-1], Close | ConnectionClosed):
                    break
            assert isinstance(events[0], Reply) and events[0].result == b"x" * 200_000
            assert isinstance(events[-1], Close)
            assert box[0].error is None


async def test_a_worker_serves_on_after_a_cancelled_handler() -> None:
    """Handlers run under one cancel scope per worker, renewed after a cancel:
    the worker whose handler was cancelled serves the next requests without
    them being cancelled, and a cancel for a finished request touches nothing."""
    handlers = _echo_handlers()
    started = trio.Event()
    cancelled = 0

    @handlers.method
    async def hang() -> None:
        nonlocal cancelled
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled += 1
            raise

    @handlers.method
    async def steps(n: int) -> int:
        for _ in range(n):
            await trio.lowlevel.checkpoint()
        return n

    a, b = _pair("socket")
    async with _connected(a, b, handlers) as (client, server):
        for round in range(5):
            started = trio.Event()
            with trio.CancelScope() as scope:

                async def cancel_when_started(
                    scope: trio.CancelScope = scope, started: trio.Event = started
                ) -> None:
                    await started.wait()
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_started)
                    await client.call("hang")
            assert scope.cancelled_caught
            # Workers that ran a cancelled handler serve these, under new scopes.
            assert await client.call("steps", 20) == 20
            assert await client.call("echo", round) == round
        assert cancelled == 5
        # the next call may come before the cancelled worker answered: two at most
        assert len(server._rpc._idle_workers) <= 2
        assert not server._rpc._handler_scopes


async def test_handlers_that_suspend_reuse_the_readers_and_workers() -> None:
    """The reader runs an async handler itself; when it suspends, an idle
    worker becomes the reader and the old reader a worker.  Calls that
    suspend, one after another and many at once, all get their answers, and
    the tasks are reused: they do not grow with the calls made."""
    handlers = _echo_handlers()

    @handlers.method
    async def later(x: int) -> int:
        await trio.lowlevel.checkpoint()
        return x

    a, b = _pair("socket")
    async with _connected(a, b, handlers) as (client, server):
        for i in range(10):  # warm up: workers spawned
            assert await client.call("later", i) == i
        living = trio.lowlevel.current_statistics().tasks_living
        for i in range(300):
            assert await client.call("later", i) == i
            assert await client.call("echo", i) == i  # does not suspend: no switch
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await client.call("later", i))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(20))
        after_burst = trio.lowlevel.current_statistics().tasks_living
        for i in range(300):
            assert await client.call("later", i) == i
        assert trio.lowlevel.current_statistics().tasks_living == after_burst
        assert after_burst <= living + 20 + 1, (living, after_burst)
        assert len(server._rpc._idle_workers) <= 20


async def test_a_method_that_suspends_goes_to_workers_until_it_stops_suspending() -> None:
    """A handler that suspended made the reader hand over its reading; its
    method then runs on workers (one hop, no role swap per call), until a
    run without suspending brings it back to the reader: 3 steps again."""
    handlers = _echo_handlers()
    wait = True

    @handlers.method
    async def maybe(x: int) -> int:
        if wait:
            await trio.lowlevel.checkpoint()
        return x

    a, b = _pair("socket")
    async with _connected(a, b, handlers) as (client, server):
        assert await client.call("maybe", 1) == 1  # run by the reader: it suspended
        assert "maybe" in server._rpc._suspends
        for i in range(20):  # on workers now
            assert await client.call("maybe", i) == i
        assert "maybe" in server._rpc._suspends
        wait = False
        assert await client.call("maybe", 2) == 2  # on a worker, without suspending
        assert "maybe" not in server._rpc._suspends
        await trio.testing.wait_all_tasks_blocked()
        counter = StepCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            counter.on = True
            assert await client.call("maybe", 3) == 3
            counter.on = False
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert sum(counter.steps.values()) <= 3, dict(counter.steps)
