"""Bus behaviour that needs real processes (TCP, and vchan for the stopped peer):
a stopped peer, memory of a publisher whose subscriber never reads, and a
server surviving bad clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from meshlink import ConnectionLost
from meshlink.bus import BusConfig, Connection
from meshlink.bus.codec import PROTOCOL_VERSION
from meshlink.bus.events import Hello
from meshlink.bus.proto import BusProtocol

PEER = Path(__file__).parent / "helpers" / "bus_peer.py"


def spawn_server(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(PEER), "serve", *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    return proc, int(line.split()[1])


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc, port = spawn_server()
    yield proc, port
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("transport", ["tcp", "vchan"])
async def test_sigstopped_peer_is_detected_within_timeout(transport: str, tmp_path: Path) -> None:
    if transport == "tcp":
        proc, port = spawn_server()
    else:
        store = tmp_path / "store"
        store.mkdir(mode=0o700)
        proc = subprocess.Popen(
            [sys.executable, str(PEER), "serve-vchan", str(store)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("READY")
    try:
        config = BusConfig(heartbeat_interval=0.2, heartbeat_timeout=1.0)
        if transport == "tcp":
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        else:
            from meshlink.transport.vchan import connect_vchan

            stream = await connect_vchan("bus-test", host_store=store)
        async with Connection.open(stream, config=config) as conn:
            assert await conn.call("pid") == proc.pid
            os.kill(proc.pid, signal.SIGSTOP)
            start = trio.current_time()
            results: list[BaseException] = []

            async def pending() -> None:
                try:
                    await conn.call("add", 1, 2)
                except ConnectionLost as exc:
                    results.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(pending)
            elapsed = trio.current_time() - start
        assert len(results) == 5
        assert "heartbeat" in str(results[0])
        assert elapsed < 1.0 + 0.5, elapsed  # the timeout plus scheduling slack
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


async def test_killed_peer_fails_pending_calls(server: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = server
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with Connection.open(stream) as conn:
        async with trio.open_nursery() as nursery:

            async def pending() -> None:
                with pytest.raises(ConnectionLost):
                    await conn.call("block", "k")

            nursery.start_soon(pending)
            assert await conn.call("wait_started", "k")
            proc.kill()


def _hello() -> Hello:
    return Hello(PROTOCOL_VERSION, ["rpc"], "raw", 8, 65536, 65536, 1 << 20)


@pytest.mark.parametrize(
    "junk",
    [
        b"\xc1" * 10,  # garbage before the hello
        b"HELLO?",
        "hello+garbage",
        "hello+oversized",
        "hello+truncated",
    ],
)
async def test_server_survives_malformed_client(
    server: tuple[subprocess.Popen[str], int], junk: bytes | str
) -> None:
    proc, port = server
    core = BusProtocol(_hello())
    hello = core.send(core.our_hello)
    data = {
        "hello+garbage": hello + b"\x93\x01\x02\x03",
        "hello+oversized": hello + b"\xc6" + (64 << 20).to_bytes(4, "big") + bytes(17 << 20),
        "hello+truncated": hello + msgpack.packb([1, 1, "add", [1, 2]])[:-2],
    }.get(junk, junk)
    assert isinstance(data, bytes)
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await raw.send_all(data)
    except trio.BrokenResourceError:
        pass  # the server may close while we are still sending the oversized frame
    if junk == "hello+truncated":
        await raw.send_eof()
    # The server closes this connection: read to EOF, never hang.
    with trio.fail_after(10):
        received = b""
        try:
            while chunk := await raw.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
    await raw.aclose()
    # ...and keeps serving others.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with Connection.open(stream) as conn:
        assert await conn.call("add", 20, 22) == 42
    assert proc.poll() is None


@pytest.mark.slow
async def test_publisher_memory_bounded_when_subscriber_never_reads() -> None:
    count = 1_000_000
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(PEER), "rss-publisher", str(port), str(count)]
    )
    try:
        with trio.fail_after(200):
            stream = await listeners[0].accept()
            async with Connection.open(stream) as conn:
                async with conn.subscribe("t", policy="drop_oldest", queue_size=100) as sub:
                    baseline, peak = await conn.call("go")
                    # Never read: everything but the last 100 was dropped here...
                    assert sub.dropped == count - 100
                    assert sub.queued == 100
    finally:
        proc.kill()
        await proc.wait()
        for listener in listeners:
            await listener.aclose()
    # ...and the publisher's resident memory did not grow with the message count
    # (1e6 x ~80 wire bytes would be ~80 MB if anything queued them).
    growth = peak - baseline
    assert growth < 8 * 1024 * 1024, (baseline, peak)
