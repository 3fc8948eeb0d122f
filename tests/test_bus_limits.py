"""What one peer may cost a bus server, over real sockets: connections,
subscriptions, queued pongs, incomplete frames (shared budget and timeout).

The hostile peers are raw sockets speaking the wire by hand (a hello from
the sans-io core, then whatever the attack needs)."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import msgpack
import pytest
import trio
import trio.testing

from meshlink import ConnectionLost, HandshakeError, RemoteProtocolError
from meshlink.bus import BusConfig, Connection, Handlers, serve_bus_listeners
from meshlink.bus.codec import PROTOCOL_VERSION
from meshlink.bus.dispatch import CONTROL_SLACK
from meshlink.bus.events import Hello, Ping
from meshlink.bus.proto import SHRINK_ABOVE, BusProtocol

MiB = 1 << 20


def _handlers(done: trio.Event | None = None) -> Handlers:
    h = Handlers()

    @h.method
    async def add(a: int, b: int) -> int:
        return a + b

    @h.method
    async def size(data: bytes) -> int:
        return len(data)

    @h.method
    async def blob(n: int) -> bytes:
        return bytes(n)

    @h.method
    def blob_def(n: int) -> bytes:  # a plain def: answered inline by the reader
        return bytes(n)

    @h.method
    async def mark() -> None:
        if done is not None:
            done.set()

    return h


def _raw_core() -> tuple[BusProtocol, bytes]:
    core = BusProtocol(Hello(PROTOCOL_VERSION, ["rpc"], "raw", 8, 1 << 20, 1 << 20, 64 * MiB))
    return core, core.send(core.our_hello)


@asynccontextmanager
async def _server(config: BusConfig, max_connections: int | None = None) -> AsyncIterator[int]:
    """serve_bus_listeners on TCP loopback for the block; yields the port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_bus_listeners(
                _handlers(),
                list(listeners),
                config=config,
                max_connections=max_connections,
                task_status=task_status,
            )
        )
        yield port
        nursery.cancel_scope.cancel()


class LogWaiter(logging.Handler):
    """Sets a trio event when the ``meshlink.bus`` logger says ``text``
    (the server logs a connection's end after the peer saw it close)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()

    def __enter__(self) -> LogWaiter:
        log = logging.getLogger("meshlink.bus")
        log.addHandler(self)
        log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("meshlink.bus").removeHandler(self)


async def _read_to_eof(stream: trio.abc.Stream) -> bytes:
    received = b""
    try:
        while chunk := await stream.receive_some(65536):
            received += bytes(chunk)
    except trio.BrokenResourceError:
        pass  # a reset is an end too
    return received


# --- 1. connections per server ----------------------------------------------------------


async def test_connections_beyond_the_limit_are_closed_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "meshlink.bus")
    async with _server(BusConfig(), max_connections=3) as port, AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(
                Connection.open(await trio.open_tcp_stream("127.0.0.1", port))
            )
            for _ in range(3)
        ]
        extra = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
        with trio.fail_after(5):
            for raw in extra:
                # Closed at once: not even the server's hello comes out.
                assert await _read_to_eof(raw) == b""
                await raw.aclose()
        for i, conn in enumerate(conns):
            assert await conn.call("add", i, 1) == i + 1
        refusals = [r for r in caplog.records if "max_connections" in r.getMessage()]
        assert len(refusals) == 1  # rate-limited: five refusals, one line
        # A slot freed by a closed connection is usable again (once the
        # server has seen the close: retry until it has).
        await conns[0].aclose()
        with trio.fail_after(5):
            while True:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                try:
                    async with Connection.open(stream) as again:
                        assert await again.call("add", 2, 2) == 4
                        break
                except HandshakeError:
                    await trio.sleep(0.01)


# --- 2. subscriptions per connection -----------------------------------------------------


async def test_subscriptions_beyond_the_limit_close_the_connection() -> None:
    async with _server(BusConfig(max_subscriptions=4)) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with Connection.open(stream) as conn:
            # Unsubscribing gives the slot back: churn is fine.
            for i in range(20):
                async with conn.subscribe(f"t{i}"):
                    pass
            async with AsyncExitStack() as stack:
                for i in range(4):
                    await stack.enter_async_context(conn.subscribe(f"s{i}"))
                with trio.fail_after(5), pytest.raises(ConnectionLost) as info:
                    await stack.enter_async_context(conn.subscribe("one-too-many"))
            assert "subscription limit of 4" in str(info.value)
            assert isinstance(info.value.__cause__, RemoteProtocolError)


# --- 3. pongs to a peer that never reads -------------------------------------------------


async def test_ping_flood_from_a_peer_that_never_reads_queues_one_pong() -> None:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    raw = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    core, hello = _raw_core()
    pings = b"".join(core.send(Ping((1 << 62) + i)) for i in range(100_000))  # 1.1 MB
    mark = msgpack.packb([5, "mark", []])
    done = trio.Event()
    config = BusConfig(heartbeat_interval=None)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # The raw peer never reads: our pongs can only pile up here.
            nursery.start_soon(raw.send_all, hello + pings + mark)
            async with Connection.open(ours, _handlers(done), config=config) as conn:
                await done.wait()  # every ping before the notification was dispatched
                queued = len(conn._writer.outbuf)
                assert queued < 64, queued  # without coalescing: ~1 MB of pongs
    await raw.aclose()


@pytest.mark.parametrize("method", ["blob", "blob_def"])
async def test_requests_from_a_peer_that_never_reads_do_not_pile_up_replies(method: str) -> None:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    raw = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    _, hello = _raw_core()
    config = BusConfig(heartbeat_interval=None)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.send_all, hello)
            async with Connection.open(ours, _handlers(), config=config) as conn:
                # Rounds of 40 requests for 64 KiB each, never read; between
                # rounds every task settles, so a peer that stays under our
                # concurrency limit per round keeps asking (10 x 40 x 64 KiB).
                for round in range(10):
                    batch = range(round * 40, round * 40 + 40)
                    try:
                        await raw.send_all(
                            b"".join(msgpack.packb([1, i, method, [64 * 1024]]) for i in batch)
                        )
                    except trio.BrokenResourceError:
                        break  # closed on us: the limit worked
                    await trio.testing.wait_all_tasks_blocked()
                    if conn.closed:
                        break
                queued = len(conn._writer.outbuf)
                # Replies wait for room once the buffer is full, so their
                # requests stay in flight and the peer soon breaks our
                # concurrency limit; without that, every reply is queued.
                assert queued <= config.send_buffer_size + 128 * 1024, queued
                assert isinstance(conn.error, RemoteProtocolError)
                assert "concurrency limit" in str(conn.error)
    await raw.aclose()


async def test_stream_opens_from_a_peer_that_never_reads_end_the_connection() -> None:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    raw = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    core = BusProtocol(Hello(PROTOCOL_VERSION, ["rpc"], "raw", 8, 1 << 20, 1 << 20, 1024))
    hello = core.send(core.our_hello)
    # Each open of an unknown stream is refused with a ~40-byte reset: 4 MB
    # of refusals for 1 MB of asking, none of them ever read.
    opens = b"".join(msgpack.packb([10, i, "nope", []]) for i in range(100_000))
    mark = msgpack.packb([5, "mark", []])
    done = trio.Event()
    config = BusConfig(heartbeat_interval=None)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def attack() -> None:
                try:
                    await raw.send_all(hello + opens + mark)
                except trio.BrokenResourceError:
                    pass  # closed on us: the limit worked

            nursery.start_soon(attack)
            async with Connection.open(ours, _handlers(done), config=config) as conn:
                async with trio.open_nursery() as race:
                    race.start_soon(_cancel_after, done.wait, race.cancel_scope)
                    race.start_soon(_cancel_after, conn.wait_closed, race.cancel_scope)
                queued = len(conn._writer.outbuf)
                limit = config.send_buffer_size + 1024 + CONTROL_SLACK
                assert queued <= limit + 512, queued  # one refusal and our close frame
                assert "does not read" in str(conn.error)
    await raw.aclose()


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


# --- 4. incomplete frames: the server's budget, and the timeout --------------------------


def _request(rid: int, payload: int) -> bytes:
    data: bytes = msgpack.packb([1, rid, "size", [bytes(payload)]], use_bin_type=True)
    return data


async def test_incomplete_frames_share_one_server_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshlink.bus")
    config = BusConfig(max_partial_bytes=4 * MiB, frame_timeout=None)
    frame = _request(0, 2 * MiB)
    cut = 3 * MiB // 2  # each peer holds 1.5 MiB of an incomplete 2 MiB frame
    async with _server(config) as port:
        peers = []
        for _ in range(3):
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            peers.append(raw)
            try:
                await raw.send_all(_raw_core()[1] + frame[:cut])
            except trio.BrokenResourceError:
                pass  # the one refused may be closed while it still sends
        # 3 x 1.5 MiB > 4 MiB: exactly one peer is closed, the others are kept.
        closed: list[int] = []

        async def watch(i: int, raw: trio.SocketStream, cancel: trio.CancelScope) -> None:
            await _read_to_eof(raw)
            closed.append(i)
            cancel.cancel()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i, raw in enumerate(peers):
                    nursery.start_soon(watch, i, raw, nursery.cancel_scope)
        assert len(closed) == 1
        # (What the refused peer reads may be cut by a reset: check the log.)
        messages = [r.getMessage() for r in caplog.records]
        assert any("max_partial_bytes" in m for m in messages), messages
        # The others finish their frames and are answered.
        for i, raw in enumerate(peers):
            if i in closed:
                await raw.aclose()
                continue
            await raw.send_all(frame[cut:])
            unpacker = msgpack.Unpacker()
            with trio.fail_after(10):
                while True:
                    unpacker.feed(await raw.receive_some(65536))
                    frames = list(unpacker)
                    if any(isinstance(f, list) and f[0] == 2 for f in frames):
                        break
            assert [2, 0, 2 * MiB] in frames
            await raw.aclose()
        # ...and the budget they held was given back: a new big frame fits.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with Connection.open(stream) as conn:
            assert await conn.call("size", bytes(3 * MiB)) == 3 * MiB


async def test_a_frame_that_stays_incomplete_times_out() -> None:
    config = BusConfig(frame_timeout=0.5, heartbeat_interval=0.1, heartbeat_timeout=5.0)
    frame = _request(0, 1000)
    with LogWaiter("stayed incomplete") as log:
        async with _server(config) as port:
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            await raw.send_all(_raw_core()[1] + frame[:10])
            start = trio.current_time()

            async def trickle() -> None:
                # One byte every 50 ms keeps the heartbeat happy (any byte is
                # liveness) while the frame never completes in time.
                for byte in frame[10:-1]:
                    await trio.sleep(0.05)
                    await raw.send_all(bytes([byte]))

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    await _read_to_eof(raw)
                    nursery.cancel_scope.cancel()
                elapsed = trio.current_time() - start
                await log.seen.wait()  # the server says why it closed
            assert 0.4 < elapsed < 3.0, elapsed
            await raw.aclose()


def test_unpacker_is_replaced_after_a_big_frame() -> None:
    core, _ = _raw_core()
    _, hello = _raw_core()
    core.receive_data(hello)
    assert isinstance(core.next_event(), Hello)
    big = msgpack.packb([5, "m", [bytes(SHRINK_ABOVE + 10)]], use_bin_type=True)
    small = msgpack.packb([5, "n", [1]])

    class Sink:
        def __init__(self) -> None:
            self.got: list[str] = []

        def notifications(self, batch: list[tuple[str, list[object], int]], total: int) -> None:
            self.got += [m for m, _, _ in batch]

        def __getattr__(self, name: str) -> object:
            raise AssertionError(name)

    sink = Sink()
    before = core._unpacker
    core.receive_data(big + small[:2])
    assert core.receive_frames(sink) is False  # type: ignore[arg-type]
    assert core._unpacker is before  # a partial frame is buffered: keep it
    core.receive_data(small[2:])
    assert core.receive_frames(sink) is False  # type: ignore[arg-type]
    assert core._unpacker is not before
    assert core.incomplete() == (0, 0)
    core.receive_data(small + small[:1])
    assert core.receive_frames(sink) is False  # type: ignore[arg-type]
    assert core.incomplete() == (len(small), 1)
    assert sink.got == ["m", "n", "n"]
