"""Backpressure, batching, limits and the handshake, over in-memory streams
(the behaviour is transport-independent; test_bus.py covers TCP too)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from meshlink import RemoteProtocolError
from meshlink.bus import (
    BusConfig,
    Connection,
    Handlers,
    VersionMismatch,
    serve_bus,
)
from meshlink.bus.codec import PROTOCOL_VERSION
from meshlink.bus.events import Hello, Notify, Request
from meshlink.bus.proto import BusProtocol

from .helpers.bus_service import make_handlers


class CountingStream(trio.abc.Stream):
    """Wraps a stream and counts send_all / receive_some calls."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sends: list[int] = []
        self.receives = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.receives += 1
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def connected(
    server_handlers: Handlers | None = None,
    *,
    server_config: BusConfig | None = None,
    client_config: BusConfig | None = None,
    client_stream: Any = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        server_conn: list[Connection] = []
        ready = trio.Event()

        async def server() -> None:
            async with Connection.open(
                b, server_handlers or make_handlers(), name="srv", config=server_config
            ) as conn:
                server_conn.append(conn)
                ready.set()
                await conn.wait_closed()

        nursery.start_soon(server)
        stream = client_stream(a) if client_stream else a
        async with Connection.open(stream, name="cli", config=client_config) as client:
            await ready.wait()
            yield client, server_conn[0]
        nursery.cancel_scope.cancel()


async def test_frames_of_one_tick_share_one_send_all() -> None:
    counting: list[CountingStream] = []

    def wrap(s: trio.abc.Stream) -> CountingStream:
        counting.append(CountingStream(s))
        return counting[0]

    async with connected(client_stream=wrap) as (client, _server):
        await client.call("add", 1, 1)
        await trio.testing.wait_all_tasks_blocked()
        before = len(counting[0].sends)
        async with trio.open_nursery() as nursery:
            for i in range(50):  # 50 tasks, all run in the same scheduler batch
                nursery.start_soon(client.notify, "note", i)
        await trio.testing.wait_all_tasks_blocked()
        sends = counting[0].sends[before:]
        assert len(sends) == 1, sends
        assert sorted(await client.call("notes", 50)) == list(range(50))


async def test_one_receive_some_parses_every_buffered_frame() -> None:
    a, b = trio.testing.memory_stream_pair()
    counting = CountingStream(b)
    seen: list[int] = []
    handlers = Handlers()
    all_seen = trio.Event()

    async def note(i: int) -> None:
        seen.append(i)
        if len(seen) == 200:
            all_seen.set()

    handlers.add_method("note", note)
    config = BusConfig(heartbeat_interval=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_bus, counting, handlers, config=config))
        hello = Hello(PROTOCOL_VERSION, ["rpc"], "raw", 8, 1 << 20, 1 << 20, 1 << 20)
        core = BusProtocol(hello)
        data = core.send(hello) + b"".join(core.send(Notify("note", [i])) for i in range(200))
        await a.send_all(data)  # one chunk: hello and 200 frames
        await all_seen.wait()
        assert seen == list(range(200))
        # One receive_some carried the whole chunk (a second one is now pending).
        assert counting.receives <= 2
        nursery.cancel_scope.cancel()


async def test_concurrency_limit_per_connection() -> None:
    running = 0
    peak = 0
    release = trio.Event()
    handlers = Handlers()

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    handlers.add_method("work", work)
    async with connected(handlers, server_config=BusConfig(max_concurrency=3)) as (client, _):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(client.call, "work")
            await trio.testing.wait_all_tasks_blocked()
            assert running == 3
            release.set()
        assert peak == 3


async def test_block_subscription_stops_publisher_at_the_window() -> None:
    async with connected() as (client, server):
        async with client.subscribe("t", window=4096) as sub:
            published = 0

            async def publisher() -> None:
                nonlocal published
                for _ in range(100_000):
                    await server.publish("t", b"x" * 64)
                    published += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher)
                await trio.testing.wait_all_tasks_blocked()
                assert 4096 // 128 <= published <= 4096 // 64 + 1  # about one window
                # Reading makes room again.
                for _ in range(published):
                    await sub.receive()
                await trio.testing.wait_all_tasks_blocked()
                assert published > 4096 // 64
                nursery.cancel_scope.cancel()
            assert sub.dropped == 0


async def test_notify_window_stops_sender_while_handler_is_slow() -> None:
    gate = trio.Event()
    got: list[int] = []
    handlers = Handlers()

    done = trio.Event()

    async def slow(i: int) -> None:
        await gate.wait()
        got.append(i)
        if len(got) == 10_000:
            done.set()

    handlers.add_method("slow", slow)
    config = BusConfig(notify_window=2048)
    async with connected(handlers, server_config=config) as (client, _):
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for i in range(10_000):
                await client.notify("slow", i)
                sent += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert 0 < sent < 2048 // 8
            gate.set()
        await done.wait()
        assert got == list(range(10_000))


async def test_stream_window_bounds_unread_data() -> None:
    async with connected(client_config=BusConfig(stream_window=8192)) as (client, _):
        async with client.open_stream("source", 1000, 1000) as stream:
            await trio.testing.wait_all_tasks_blocked()
            # The server handler is blocked on credit: only ~8 KiB are queued here.
            assert len(stream._queue) <= 9
            sizes = [len(m) async for m in stream]
        assert sizes == [1000] * 1000


class NextVersionConnection(Connection):
    """A connection that speaks the next protocol version (as a newer peer would)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hello = self._proto.our_hello
        hello.version = PROTOCOL_VERSION + 1
        self._proto = BusProtocol(hello)


async def test_version_mismatch_raises_on_both_sides() -> None:
    a, b = trio.testing.memory_stream_pair()
    errors: list[VersionMismatch] = []

    async def side(cls: type[Connection], stream: trio.abc.Stream) -> None:
        with pytest.raises(VersionMismatch) as info:
            async with cls.open(stream):
                pass
        errors.append(info.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, Connection, a)
        nursery.start_soon(side, NextVersionConnection, b)
    assert {str(e) for e in errors} == {
        f"bus protocol version mismatch: we speak v{PROTOCOL_VERSION}, "
        f"the peer speaks v{PROTOCOL_VERSION + 1}",
        f"bus protocol version mismatch: we speak v{PROTOCOL_VERSION + 1}, "
        f"the peer speaks v{PROTOCOL_VERSION}",
    }


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    from meshlink import HandshakeError

    a, _b = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeError, match="no hello"):
        async with Connection.open(a, config=BusConfig(handshake_timeout=5)):
            pass


async def test_current_connection_inside_handler() -> None:
    handlers = Handlers()

    async def whoami() -> str:
        from meshlink.bus import current_connection

        return current_connection().peer_name

    handlers.add_method("whoami", whoami)
    async with connected(handlers) as (client, _):
        assert await client.call("whoami") == "cli"


async def test_replies_many_at_once_and_close_with_a_reply_stuck() -> None:
    """Replies sent straight from the handler's task (idle line) or queued
    (busy line) all arrive; a reply stuck on a peer that never reads does not
    stop the connection from closing within close_timeout."""
    a, b = trio.testing.lockstep_stream_pair()
    handlers = Handlers()

    async def big(n: int) -> bytes:
        return b"x" * n

    async def big_later(n: int) -> bytes:
        await trio.lowlevel.checkpoint()  # suspends: answered from a worker
        return b"x" * n

    handlers.add_method("big", big)
    handlers.add_method("big_later", big_later)
    config = BusConfig(heartbeat_interval=None, close_timeout=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_bus, b, handlers, config=config))
        async with Connection.open(a, config=config) as client:
            results: list[int] = []

            async def one(n: int) -> None:
                results.append(len(await client.call("big", n)))

            async def one_later(n: int) -> None:
                results.append(len(await client.call("big_later", n)))

            async with trio.open_nursery() as calls:
                for i in range(20):
                    calls.start_soon(one, 1000 * i)
                    calls.start_soon(one_later, 1000 * i)
            assert sorted(results) == sorted(2 * [1000 * i for i in range(20)])

    # A raw peer that sends a request and never reads the (large) reply.
    a, b = trio.testing.lockstep_stream_pair()
    hello = Hello(PROTOCOL_VERSION, ["rpc"], "raw", 8, 1 << 20, 1 << 20, 1 << 24)
    core = BusProtocol(hello)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            conn_box: list[Connection] = []

            async def server() -> None:
                async with Connection.open(b, handlers, config=config) as conn:
                    conn_box.append(conn)
                    await conn.wait_closed()

            nursery.start_soon(server)
            await a.send_all(core.send(hello))
            while not isinstance(core.next_event(), Hello):
                core.receive_data(await a.receive_some(1))
            await trio.testing.wait_all_tasks_blocked()
            # The line is idle now: the reply of a handler that suspended goes
            # straight from its task, and one that did not is queued for the
            # writer (it ran in the reader); we never read either.
            await a.send_all(core.send(Request(0, "big_later", [1 << 20])))
            await trio.testing.wait_all_tasks_blocked()
            assert conn_box[0]._replying  # the reply is being sent directly
            await a.send_all(core.send(Request(1, "big", [1 << 20])))
            await trio.testing.wait_all_tasks_blocked()
            assert len(conn_box[0]._writer.outbuf) >= 1 << 20  # queued, bounded by one reply
            await conn_box[0].aclose()  # returns (fail_after guards against a hang)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("sizes", "overrun"),
    [
        ([1000, 1000], False),  # within the window
        ([5000], False),  # one frame larger than the whole window may come alone
        ([5000, 10], True),  # ...but nothing after it until credit returns
        ([1000, 1000, 1000, 1000, 1000], True),  # past the window
    ],
)
async def test_peer_that_overruns_the_notify_window_is_a_protocol_error(
    sizes: list[int], overrun: bool
) -> None:
    a, b = trio.testing.memory_stream_pair()
    gate = trio.Event()
    handlers = Handlers()

    async def note(data: bytes) -> None:
        await gate.wait()  # never consume: no credit goes back

    handlers.add_method("note", note)
    handlers.add_method("ping", partial(trio.sleep, 0))
    config = BusConfig(heartbeat_interval=None, notify_window=4096)
    hello = Hello(PROTOCOL_VERSION, ["rpc"], "raw", 8, 1 << 20, 1 << 20, 1 << 20)
    core = BusProtocol(hello)
    errors: list[BaseException] = []

    async def server() -> None:
        try:
            await serve_bus(b, handlers, config=config)
        except RemoteProtocolError as exc:
            errors.append(exc)

    with trio.fail_after(10):  # never hang
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            data = core.send(hello)
            data += b"".join(core.send(Notify("note", [b"x" * size])) for size in sizes)
            await a.send_all(data)
            await trio.testing.wait_all_tasks_blocked()
            if overrun:
                assert errors and "overran the notify window" in str(errors[0])
            else:
                assert not errors
            nursery.cancel_scope.cancel()
