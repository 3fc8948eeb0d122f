"""Bus behaviour, each test run over an in-memory stream pair, over real TCP to a
peer process (tests/helpers/bus_peer.py) and over vchan to a peer process."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from meshlink import ConnectionLost, LocalProtocolError
from meshlink.bus import (
    BusConfig,
    Connection,
    RemoteError,
    serve_bus,
)
from meshlink.bus.codec import PROTOCOL_VERSION
from meshlink.bus.events import Hello
from meshlink.bus.proto import BusProtocol
from meshlink.bus.writer import SCHEDULE_EVERY

from .helpers.bus_service import make_handlers

PEER = Path(__file__).parent / "helpers" / "bus_peer.py"


class PeerProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), "serve", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class VchanPeerProcess:
    def __init__(self, store: Path) -> None:
        self.store = store
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), "serve-vchan", str(store)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), line

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def tcp_peer() -> Iterator[PeerProcess]:
    peer = PeerProcess()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def vchan_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VchanPeerProcess]:
    store = tmp_path_factory.mktemp("bus-store")
    store.chmod(0o700)
    peer = VchanPeerProcess(store)
    yield peer
    peer.stop()


@pytest.fixture(params=["memory", "tcp", "vchan"])
async def conn(request: pytest.FixtureRequest, tcp_peer: PeerProcess) -> AsyncIterator[Connection]:
    if request.param == "memory":
        a, b = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_bus, b, make_handlers())
            async with Connection.open(a, name="client") as c:
                yield c
    elif request.param == "tcp":
        stream = await trio.open_tcp_stream("127.0.0.1", tcp_peer.port)
        async with Connection.open(stream, name="client") as c:
            yield c
    else:
        from meshlink.transport.vchan import connect_vchan

        peer: VchanPeerProcess = request.getfixturevalue("vchan_peer")
        vstream = await connect_vchan("bus-test", host_store=peer.store)
        async with Connection.open(vstream, name="client") as c:
            yield c


def key() -> str:
    return uuid.uuid4().hex


# --- handshake ---------------------------------------------------------------


async def test_handshake_exchanges_names_and_features(conn: Connection) -> None:
    assert conn.peer_name in ("", "test-peer")
    assert {"rpc", "cancel", "notify", "pubsub", "stream", "heartbeat"} <= conn.features


# --- rpc -------------------------------------------------------------------------


async def test_call_returns_result(conn: Connection) -> None:
    assert await conn.call("add", 2, 3) == 5
    assert await conn.call("echo", "a", b"b", [1, {"k": None}]) == ["a", b"b", [1, {"k": None}]]


async def test_remote_exception_carries_type_and_message(conn: Connection) -> None:
    with pytest.raises(RemoteError) as info:
        await conn.call("fail", "ValueError", "bad value")
    assert info.value.remote_type == "ValueError"
    assert info.value.remote_message == "bad value"


async def test_unknown_method(conn: Connection) -> None:
    with pytest.raises(RemoteError) as info:
        await conn.call("no_such_method")
    assert info.value.remote_type == "MethodNotFound"


async def test_wrong_number_of_arguments_is_a_remote_error(conn: Connection) -> None:
    """Calling the handler fails before it runs (TypeError): an error reply,
    and the connection goes on (the reader makes that call itself)."""
    for args in ((), (1, 2, 3)):
        with pytest.raises(RemoteError) as info:
            await conn.call("add", *args)
        assert info.value.remote_type == "TypeError"
    assert await conn.call("add", 1, 1) == 2


async def test_unpackable_argument_and_result(conn: Connection) -> None:
    with pytest.raises(LocalProtocolError):
        await conn.call("echo", object())
    with pytest.raises(RemoteError) as info:
        await conn.call("unpackable")
    assert info.value.remote_type == "LocalProtocolError"
    assert await conn.call("add", 1, 1) == 2  # still usable


async def test_many_calls_in_flight_are_matched_by_id(conn: Connection) -> None:
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        results[i] = await conn.call("echo", i, str(i))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert results == {i: [i, str(i)] for i in range(200)}


async def test_cancelling_caller_cancels_remote_handler(conn: Connection) -> None:
    k = key()
    async with trio.open_nursery() as nursery:

        async def caller(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await conn.call("block", k)
            assert scope.cancelled_caught

        scope = await nursery.start(caller)
        assert await conn.call("wait_started", k)
        scope.cancel()
    assert await conn.call("wait_cancelled", k)


async def test_timeout_cancels_remote_handler(conn: Connection) -> None:
    k = key()
    with pytest.raises(trio.TooSlowError):
        await conn.call("block", k, timeout=0.2)
    assert await conn.call("wait_cancelled", k)


# --- notify ----------------------------------------------------------------------


async def test_notify_runs_in_order(conn: Connection) -> None:
    for i in range(500):
        await conn.notify("note", i)
    assert await conn.call("notes", 500) == list(range(500))


async def test_a_cancel_from_another_task_stops_a_notify_loop_at_its_next_yield(
    conn: Connection,
) -> None:
    # notify checks for cancellation only when it yields (every SCHEDULE_EVERY
    # calls, or when it waits); the task that cancels runs only then, so the
    # loop must stop right there, and exactly what returned is delivered.
    sent = 0
    seen_at = -1

    async def sender(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        nonlocal sent
        with trio.CancelScope() as scope:
            task_status.started(scope)
            for _ in range(20 * SCHEDULE_EVERY):  # bounded: a notify that never yields ends here
                await conn.notify("note", sent)
                sent += 1
        assert scope.cancelled_caught, f"{sent} notifications, never cancelled"

    async with trio.open_nursery() as nursery:
        scope = await nursery.start(sender)
        seen_at = sent
        scope.cancel()
    assert sent - seen_at <= SCHEDULE_EVERY
    assert await conn.call("notes", sent) == list(range(sent))
    await conn.notify("note", "end")
    assert await conn.call("notes", 1) == ["end"]  # nothing after the cancel was queued


# --- pub/sub ---------------------------------------------------------------------


async def test_subscribe_receives_matching_topics(conn: Connection) -> None:
    async with conn.subscribe("news.") as sub:
        await conn.call("publish_n", "sport.x", 3)  # not matching: filtered at the publisher
        await conn.call("publish_n", "news.x", 5)
        got = [await sub.receive() for _ in range(5)]
        assert got == [("news.x", i) for i in range(5)]
        assert sub.queued == 0


async def test_drop_oldest_counts_drops(conn: Connection) -> None:
    async with conn.subscribe("t", policy="drop_oldest", queue_size=10) as sub:
        # The reply follows the 1000 publishes on the wire, so they are all in.
        assert await conn.call("publish_n", "t", 1000) == 1000
        assert sub.dropped == 990
        assert [await sub.receive() for _ in range(10)] == [("t", i) for i in range(990, 1000)]


async def test_block_policy_flows_with_a_small_window(conn: Connection) -> None:
    async with conn.subscribe("b", window=2048) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.call, "publish_n", "b", 300, 100)
            got = [await sub.receive() for _ in range(300)]
        assert [m[1][0] for m in got] == list(range(300))


# --- streams ---------------------------------------------------------------------


async def test_stream_echo(conn: Connection) -> None:
    async with conn.open_stream("echo_stream", 2) as stream:
        for i in range(50):
            await stream.send(i)
        await stream.send_eof()
        assert [m async for m in stream] == [2 * i for i in range(50)]


async def test_stream_bulk_upload_with_small_window(conn: Connection) -> None:
    chunk = b"z" * 65536
    async with conn.open_stream("sink") as stream:
        for _ in range(64):
            await stream.send(chunk)
        await stream.send_eof()
        assert await stream.receive() == [64, 64 * 65536]
        with pytest.raises(trio.EndOfChannel):
            await stream.receive()


async def test_stream_bulk_download(conn: Connection) -> None:
    async with conn.open_stream("source", 40, 100_000) as stream:
        sizes = [len(m) async for m in stream]
    assert sizes == [100_000] * 40


async def test_stream_handler_error_reaches_opener(conn: Connection) -> None:
    async with conn.open_stream("broken_stream") as stream:
        assert await stream.receive() == "first"
        with pytest.raises(RemoteError) as info:
            await stream.receive()
        assert info.value.remote_type == "ValueError"


async def test_unknown_stream(conn: Connection) -> None:
    async with conn.open_stream("nope") as stream:
        with pytest.raises(RemoteError) as info:
            await stream.receive()
    assert info.value.remote_type == "MethodNotFound"


async def test_cancelled_stream_cancels_handler(conn: Connection) -> None:
    k = key()
    with trio.CancelScope() as scope:
        async with conn.open_stream("stream_block", k):
            assert await conn.call("wait_started", k)
            scope.cancel()
            await trio.sleep_forever()
    assert await conn.call("wait_cancelled", k)


# --- closing ---------------------------------------------------------------------


async def test_pending_call_fails_when_closed_locally(conn: Connection) -> None:
    k = key()
    async with trio.open_nursery() as nursery:

        async def caller() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await conn.call("block", k)

        nursery.start_soon(caller)
        assert await conn.call("wait_started", k)
        await conn.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await conn.call("add", 1, 2)


async def test_peer_close_fails_pending_calls_and_ends_subscriptions() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        server_ready = trio.Event()
        close_server = trio.Event()

        async def server() -> None:
            async with Connection.open(b, make_handlers(), name="srv"):
                server_ready.set()
                await close_server.wait()

        nursery.start_soon(server)
        async with Connection.open(a) as client:
            await server_ready.wait()
            async with client.subscribe("x") as sub:

                async def caller() -> None:
                    with pytest.raises(ConnectionLost):
                        await client.call("block", key())

                nursery.start_soon(caller)
                await trio.testing.wait_all_tasks_blocked()
                close_server.set()
                assert [m async for m in sub] == []  # a clean end, not an error
            await client.wait_closed()
            assert client.error is None


async def test_server_connection_error_is_none_after_clean_close() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_bus, b, make_handlers())  # returns: no error raised
        async with Connection.open(a) as client:
            assert await client.call("add", 1, 1) == 2


# --- heartbeat (virtual time) ----------------------------------------------------


async def test_frozen_peer_fails_pending_calls_within_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    config = BusConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    async with trio.open_nursery() as nursery:

        async def frozen_peer() -> None:
            # Says hello, then never reads nor writes again, transport left open.
            await b.send_all(BusProtocol(_hello()).send(_hello()))
            await trio.sleep_forever()

        nursery.start_soon(frozen_peer)
        async with Connection.open(a, config=config) as client:
            start = trio.current_time()
            with pytest.raises(ConnectionLost, match="heartbeat"):
                await client.call("add", 1, 2)
            assert trio.current_time() - start <= 3.0 + 1e-6
        nursery.cancel_scope.cancel()


def _hello() -> Hello:
    return Hello(PROTOCOL_VERSION, ["rpc"], "frozen", 8, 65536, 65536, 1 << 20)


async def test_idle_connection_stays_up_with_heartbeats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    config = BusConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_bus, b, make_handlers(), config=config))
        async with Connection.open(a, config=config) as client:
            await trio.sleep(60)  # virtual time: sixty idle seconds
            assert await client.call("add", 2, 2) == 4
