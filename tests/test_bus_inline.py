"""Plain-def handlers (run inline by the reader) and writes that do not wait.

A method registered as a plain ``def`` is called by the connection's reader
the moment its request is decoded, and the reply is written from there; these
tests pin down that it behaves like an async handler everywhere a caller can
tell (results, errors, ordering, context variables) and that the hops are
really gone (a trio Instrument counts them).
"""

from __future__ import annotations

import contextvars
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from meshlink.bus import BusConfig, Connection, Handlers, RemoteError
from meshlink.transport.nowait import nowait_sender

from .test_bus_steps import StepCounter, count_one_call

CONFIG = BusConfig(heartbeat_interval=None)
VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


@asynccontextmanager
async def _pair(
    handlers: Handlers, streams: tuple[trio.abc.Stream, trio.abc.Stream] | None = None
) -> AsyncIterator[Connection]:
    """A client connection to a server serving ``handlers`` (over a socketpair)."""
    a, b = streams or _socket_pair()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def server() -> None:
            async with Connection.open(b, handlers, name="srv", config=CONFIG):
                await done.wait()

        nursery.start_soon(server)
        async with Connection.open(a, name="client", config=CONFIG) as client:
            yield client
        done.set()


def _handlers(log: list[Any]) -> Handlers:
    h = Handlers()

    @h.method
    def echo(x: Any) -> Any:
        return x

    @h.method
    def fail(message: str) -> None:
        raise KeyError(message)

    @h.method
    def set_var(value: str) -> str:
        before = VAR.get()
        VAR.set(value)
        return before

    @h.method
    def record(x: Any) -> None:
        log.append(x)

    @h.method
    async def slow_record(x: Any) -> None:
        await trio.sleep(0.01)
        log.append(x)

    @h.method
    def seen() -> list[Any]:
        return list(log)

    async def later(x: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return ("later", x)

    h.add_method("disguised", lambda x: later(x))
    return h


def test_plain_functions_are_registered_inline() -> None:
    h = _handlers([])
    assert {"echo", "fail", "set_var", "record", "seen", "disguised"} <= set(h.inline)
    assert "slow_record" not in h.inline

    class Callable_:
        async def __call__(self) -> None: ...

    h.add_method("obj", Callable_())
    assert "obj" not in h.inline
    h.add_method("echo", h.methods["slow_record"])  # replaced by an async one
    assert "echo" not in h.inline


async def test_results_errors_and_unknown_methods() -> None:
    async with _pair(_handlers([])) as client:
        assert await client.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        with pytest.raises(RemoteError) as info:
            await client.call("fail", "nope")
        assert (info.value.remote_type, info.value.remote_message) == ("KeyError", "'nope'")
        with pytest.raises(RemoteError) as info:
            await client.call("missing")
        assert info.value.remote_type == "MethodNotFound"
        assert await client.call("echo", b"after") == b"after"


async def test_a_function_that_returns_an_awaitable_is_awaited() -> None:
    async with _pair(_handlers([])) as client:
        assert await client.call("disguised", 7) == ["later", 7]


async def test_context_variables_do_not_leak_between_handlers() -> None:
    async with _pair(_handlers([])) as client:
        assert await client.call("set_var", "one") == "unset"
        assert await client.call("set_var", "two") == "unset"


async def test_notifications_to_plain_functions_run_in_order_before_a_later_call() -> None:
    log: list[Any] = []
    async with _pair(_handlers(log)) as client:
        for i in range(200):
            # mixed: the async ones make the runner wait, the plain ones must not overtake
            await client.notify("slow_record" if i % 50 == 0 else "record", i)
        assert await client.call("seen") == list(range(200))


async def test_plain_notifications_give_their_credit_back() -> None:
    """Ten notify windows of notifications to a plain function: the reader
    runs them and credits them back, so the sender never stalls for good."""
    log: list[Any] = []
    blob = b"n" * 1000
    async with _pair(_handlers(log)) as client:
        window = client._notify_out.window
        count = 10 * window // len(blob)
        with trio.fail_after(60):
            for i in range(count):
                await client.notify("record", (i, blob))
            assert await client.call("seen") == [[i, blob] for i in range(count)]
        assert client._notify_out.outstanding < window


async def test_a_plain_notification_handler_that_returns_an_awaitable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[Any] = []
    h = _handlers(log)

    async def later(x: Any) -> None:
        log.append(x)

    h.add_method("disguised_note", lambda x: later(x))
    async with _pair(h) as client:
        await client.notify("disguised_note", 1)
        with trio.fail_after(10):
            while not log:  # bounded by the deadline: the handler runs in a task
                await client.call("echo", 0)
        await client.notify("disguised_note", 2)
        await client.notify("record", 3)
        assert (await client.call("seen"))[-2:] == [2, 3]  # in order from then on
    assert "register it with async def" in caplog.text


async def test_a_call_to_a_plain_function_skips_every_hop() -> None:
    """Over a socketpair: the peer's reader answers, our reader wakes the
    caller: 3 task steps in 3 scheduler passes (6 and 4 before inline
    handlers and writes that do not wait).  An async handler that does not
    suspend, run by the reader too, now takes the same
    (tests/test_bus_steps.py)."""

    def plain() -> Handlers:
        h = Handlers()

        @h.method
        def echo(x: Any) -> Any:
            return x

        return h

    steps, passes, by_task = await count_one_call("socket", plain())
    assert steps <= 3, dict(by_task)
    assert passes <= 3, passes
    assert "run" not in by_task and "_worker" not in by_task, dict(by_task)


async def test_the_socket_writer_writes_without_waiting_and_reports_a_closed_peer() -> None:
    a, b = _socket_pair()
    send = nowait_sender(a)
    assert send is not None
    assert send(b"hello") == 5
    assert await b.receive_some(5) == b"hello"
    # Fill the socket: the write takes a prefix, then nothing, never waiting.
    total = 0
    for _ in range(10_000):  # bounded: a socket buffer is a few MiB at most
        n = send(b"x" * 65536)
        total += n
        if n == 0:
            break
    assert n == 0 and total > 0
    await b.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first write after the close may still land
            send(b"y" * 65536)
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        send(b"z")
    # trio's memory streams have no such write: the bus awaits send_all there.
    assert nowait_sender(trio.testing.memory_stream_pair()[0]) is None


async def test_vchan_try_send_takes_what_fits() -> None:
    from meshlink.transport.vchan import connect_vchan, open_vchan_listener

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        os.mkdir(store, 0o700)
        listener = await open_vchan_listener("inline-test", host_store=store)
        async with trio.open_nursery() as nursery:
            got: list[trio.abc.Stream] = []

            async def accept() -> None:
                got.append(await listener.accept())

            nursery.start_soon(accept)
            client = await connect_vchan("inline-test", host_store=store)
        server = got[0]
        space = client.send_space()
        assert space > 0
        assert client.try_send(b"a" * 100) == 100
        assert client.send_space() == space - 100
        assert client.try_send(b"b" * space) == space - 100  # what fits, no wait
        assert client.try_send(b"c") == 0
        received = bytearray()
        while len(received) < space:
            received += await server.receive_some(space)
        assert received == b"a" * 100 + b"b" * (space - 100)
        await client.aclose()
        await server.aclose()
        await listener.aclose()


async def test_a_cancelled_call_to_a_disguised_async_handler_cancels_it() -> None:
    started = trio.Event()
    cancelled = trio.Event()
    h = Handlers()

    async def hang() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    h.add_method("hang", lambda: hang())

    @h.method
    def echo(x: Any) -> Any:
        return x

    async with _pair(h) as client:
        with trio.move_on_after(30) as scope:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    await client.call("hang")

                nursery.start_soon(call)
                await started.wait()
                nursery.cancel_scope.cancel()
            with trio.fail_after(10):
                await cancelled.wait()
        assert not scope.cancelled_caught
        assert await client.call("echo", 1) == 1


async def test_counts_are_taken_only_while_the_counter_is_on() -> None:
    # The counter the step tests rely on counts nothing while off.
    counter = StepCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert not counter.steps and counter.passes == 0
