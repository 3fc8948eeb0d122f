"""A hostile peer against the session layer, over real sockets: bad greetings,
a stolen session id with the wrong token, malformed records, silence.  Every
case ends that one transport (or session) and leaves the server serving."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio

from meshlink import BusConfig, ResolveError, Server, SessionConfig, connect, serve
from meshlink.bus import Handlers
from meshlink.session.wire import (
    ACK,
    DATA,
    HEADER,
    MAGIC,
    NEW,
    REFUSED,
    pack_greeting,
    parse_greeting,
)

NAME = "hostile-target"


@pytest.fixture
async def server(store: Path) -> AsyncIterator[Server]:
    h = Handlers()

    async def echo(x: int) -> int:
        return x

    h.add_method("echo", echo)
    async with trio.open_nursery() as nursery:
        srv: Server = await nursery.start(partial(
            serve, NAME, h, host_store=store, vchan=False, allow_plaintext=True,
            handle_sigterm=False, config=BusConfig(handshake_timeout=0.5),
            session=SessionConfig(resume_timeout=5)))
        yield srv
        nursery.cancel_scope.cancel()


async def _raw(srv: Server) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", srv.tcp_port)


async def _read_all(s: trio.SocketStream) -> bytes:
    """Everything until the server closes (bounded: the test fails if it never does)."""
    out = b""
    with trio.fail_after(5):
        try:
            while chunk := await s.receive_some(65536):
                out += chunk
        except trio.BrokenResourceError:
            pass  # a reset is a close too
    return out


async def _exactly(s: trio.SocketStream, n: int) -> bytes:
    out = b""
    with trio.fail_after(5):
        while len(out) < n:
            chunk = await s.receive_some(n - len(out))
            assert chunk, f"closed after {len(out)} of {n} bytes"
            out += chunk
    return out


async def _still_serves(srv: Server, store: Path) -> None:
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{srv.tcp_port}",
                       allow_plaintext=True) as conn:
        assert await conn.call("echo", 5) == 5


@pytest.mark.parametrize("greeting", [
    MAGIC + b"\x07" + bytes(43),                  # version 7
    b"\xc1XYZ" + bytes(44),                       # 0xC1, then not our magic
    pack_greeting(1, bytes(16), bytes(16), 0),    # a status in a greeting
    MAGIC[:1],                                    # one byte, then silence
])
async def test_a_bad_or_truncated_greeting_is_closed(server: Server, store: Path,
                                                     greeting: bytes) -> None:
    s = await _raw(server)
    await s.send_all(greeting)
    assert await _read_all(s) == b""
    await _still_serves(server, store)


async def test_silence_is_closed_after_the_handshake_timeout(server: Server) -> None:
    s = await _raw(server)
    assert await _read_all(s) == b""  # within _read_all's 5 s; the timeout is 0.5 s


async def test_an_unknown_session_gets_a_new_one(server: Server) -> None:
    s = await _raw(server)
    await s.send_all(pack_greeting(0, b"\x01" * 16, b"\x02" * 16, 12345))
    reply = parse_greeting(await _exactly(s, 48), reply=True)
    assert reply.status == NEW and reply.session_id not in (b"\x01" * 16, bytes(16))
    assert reply.received == 0
    await s.aclose()


async def test_a_stolen_session_id_with_the_wrong_token_is_refused(
        server: Server, store: Path) -> None:
    async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{server.tcp_port}",
                       allow_plaintext=True) as conn:
        assert conn.session is not None
        s = await _raw(server)
        await s.send_all(pack_greeting(0, conn.session.session_id, b"\x00" * 16, 0))
        reply = parse_greeting(await _exactly(s, 48), reply=True)
        assert reply.status == REFUSED and reply.session_id == bytes(16)
        assert await _read_all(s) == b""
        # The owner's session is untouched.
        assert await conn.call("echo", 1) == 1 and conn.resumes == 0


@pytest.mark.parametrize("record", [
    HEADER.pack(9, 0, 0),                   # unknown kind
    HEADER.pack(DATA, 100 << 20, 0),        # a 100 MiB record
    HEADER.pack(DATA, 0, 0),                # an empty DATA record
    HEADER.pack(ACK, 5, 0) + b"xxxxx",      # a payload on an ACK
    HEADER.pack(ACK, 0, 1 << 40),           # acknowledges bytes never sent
])
async def test_a_malformed_record_ends_the_session(server: Server, store: Path,
                                                   record: bytes) -> None:
    s = await _raw(server)
    await s.send_all(pack_greeting(0, bytes(16), bytes(16), 0))
    reply = parse_greeting(await _exactly(s, 48), reply=True)
    assert reply.status == NEW
    await s.send_all(record)
    await _read_all(s)  # the server closes (its bus hello may come first)
    assert server.sessions is not None
    with trio.fail_after(5):
        while len(server.sessions):  # the session is gone, not kept for a resume
            await trio.testing.wait_all_tasks_blocked()
    await _still_serves(server, store)


async def test_a_resume_beyond_what_was_sent_loses_the_session(server: Server) -> None:
    s = await _raw(server)
    await s.send_all(pack_greeting(0, bytes(16), bytes(16), 0))
    reply = parse_greeting(await _exactly(s, 48), reply=True)
    await s.aclose()
    # Come back claiming to have received far more than the server ever sent.
    t = await _raw(server)
    await t.send_all(pack_greeting(0, reply.session_id, reply.token, 1 << 30))
    assert await _read_all(t) == b""
    assert server.sessions is not None
    with trio.fail_after(5):
        while len(server.sessions):
            await trio.testing.wait_all_tasks_blocked()


async def test_a_server_answering_garbage_is_a_failed_attempt(store: Path) -> None:
    async def liar(stream: trio.SocketStream) -> None:
        await stream.receive_some(48)
        await stream.send_all(b"\xc1MLS" + struct.pack("<B", 1) + b"\x09" + bytes(42))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, liar, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with pytest.raises(ResolveError, match="malformed session greeting"):
            async with connect(NAME, host_store=store, pin=f"tcp://127.0.0.1:{port}",
                               allow_plaintext=True):
                pass
        nursery.cancel_scope.cancel()
