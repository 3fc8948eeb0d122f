"""SessionStream.try_send: bytes taken at once, without waiting, or none.

The bus writes small frames from the task that made them through
``try_send`` (see meshlink/bus/writer.py); under a session that is
``SessionStream.try_send``.  These tests run two session ends in one
process, over a real vchan pair (a record is never cut, nothing is written
when it does not fit, bytes taken while the transport breaks are resent
after a resume) and over real TCP sockets (a record the socket took only in
part is finished by the keeper before anything else, and before END).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from meshlink.session.stream import SessionConfig, SessionStream
from meshlink.session.wire import HEADER_SIZE
from meshlink.transport.vchan import VchanStream, connect_vchan, open_vchan_listener

ID = b"i" * 16
TOKEN = b"t" * 16


@asynccontextmanager
async def _vchan_pairs() -> AsyncIterator[list[tuple[VchanStream, VchanStream]]]:
    """A list to which ``await _new_pair(...)`` adds vchan pairs; all closed at the end."""
    pairs: list[tuple[VchanStream, VchanStream]] = []
    try:
        yield pairs
    finally:
        for a, b in pairs:
            await a.aclose()
            await b.aclose()


async def _new_pair(store: Path, pairs: list[tuple[VchanStream, VchanStream]]
                    ) -> tuple[VchanStream, VchanStream]:
    name = f"trysend-{len(pairs)}"
    listener = await open_vchan_listener(name, host_store=str(store))
    got: list[VchanStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            got.append(await listener.accept())

        nursery.start_soon(accept)
        client = await connect_vchan(name, host_store=str(store))
    await listener.aclose()
    pairs.append((client, got[0]))
    return client, got[0]


async def _sessions(store: Path, pairs: list[tuple[VchanStream, VchanStream]]
                    ) -> tuple[SessionStream, SessionStream]:
    """A client and a server end of one session, attached over a new vchan pair."""
    va, vb = await _new_pair(store, pairs)
    a = SessionStream(ID, TOKEN, SessionConfig(), server=False)
    b = SessionStream(ID, TOKEN, SessionConfig(), server=True)
    await a.attach(va, 0, "vchan")
    await b.attach(vb, 0, "vchan")
    return a, b


async def _read(end: SessionStream, n: int) -> bytes:
    out = bytearray()
    with trio.fail_after(10):
        while len(out) < n:
            out += await end.receive_some(n - len(out))
    return bytes(out)


async def test_records_are_whole_or_not_written(store: Path) -> None:
    async with _vchan_pairs() as pairs:
        a, b = await _sessions(store, pairs)
        va = a.transport
        assert isinstance(va, VchanStream)
        assert a.try_send(b"hello") == 5
        assert await _read(b, 5) == b"hello"
        assert a.unacknowledged == 5
        # Fill the ring with records: each try is all or nothing.
        taken = bytearray()
        piece = bytes(range(256)) * 16  # 4 KiB
        for i in range(1000):  # bounded: the ring is 256 KiB
            n = a.try_send(piece[: 4096 - i % 7])
            assert n in (0, 4096 - i % 7)
            if not n:
                break
            taken += piece[: 4096 - i % 7]
        assert n == 0
        assert va.send_space() < HEADER_SIZE + 4096  # it did not fit: nothing went
        assert await _read(b, len(taken)) == bytes(taken)


async def test_a_record_larger_than_the_ring_is_left_to_send_all(store: Path) -> None:
    """All or nothing, even when "all" can never fit: nothing is written or
    kept, and send_all then carries it in parts."""
    async with _vchan_pairs() as pairs:
        a, b = await _sessions(store, pairs)
        va = a.transport
        assert isinstance(va, VchanStream)
        big = bytes(range(256)) * (va.write_size // 256)  # + its header: too big
        assert a.try_send(big) == 0
        assert a.unacknowledged == 0
        assert va.send_space() == va.write_size  # nothing went into the ring
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_all, big)
            assert await _read(b, len(big)) == big


async def test_no_send_without_a_transport_that_says_how_much_fits(store: Path) -> None:
    async with _vchan_pairs() as pairs:
        va, _ = await _new_pair(store, pairs)
        a = SessionStream(ID, TOKEN, SessionConfig(), server=False)
        assert a.try_send(b"x") == 0  # detached
        await a.attach(va, 0, "vchan")
        a.detach()
        assert a.try_send(b"x") == 0
        s1, s2 = socket.socketpair()
        sock = trio.SocketStream(trio.socket.from_stdlib_socket(s1))
        c = SessionStream(ID, TOKEN, SessionConfig(), server=False)
        await c.attach(sock, 0, "tcp")
        await sock.aclose()
        s2.close()
        assert c.try_send(b"x") == 0  # the socket is closed: nothing taken
        # a replay buffer without room
        d = SessionStream(ID, TOKEN, SessionConfig(replay_limit=65536), server=False)
        vc, _ = await _new_pair(store, pairs)
        await d.attach(vc, 0, "vchan")
        assert d.try_send(b"y" * 60000) == 60000
        assert d.try_send(b"y" * 6000) == 0


async def test_records_written_by_try_send_are_resent_after_a_resume(store: Path) -> None:
    """A record try_send wrote is kept for replay like any other: the reader
    that never read it from the broken transport gets it after the resume."""
    async with _vchan_pairs() as pairs:
        a, b = await _sessions(store, pairs)
        va = a.transport
        assert va is not None
        assert a.try_send(b"first") == 5
        assert await _read(b, 5) == b"first"
        assert a.try_send(b"second") == 6  # in the ring, never read from it
        await va.aclose()  # the transport breaks
        assert a.try_send(b"third") == 0  # nothing taken: send_all's turn
        await a.send_all(b"third")  # kept for the next transport
        assert a.transport is None
        b.detach()  # what is left in the old ring no longer counts
        va2, vb2 = await _new_pair(store, pairs)
        await b.attach(vb2, a.received, "vchan")
        await a.attach(va2, b.received, "vchan")
        assert await _read(b, 11) == b"secondthird"
        assert a.try_send(b"fourth") == 6
        assert await _read(b, 6) == b"fourth"


async def _tcp_sessions(nursery: trio.Nursery) -> tuple[SessionStream, SessionStream]:
    """Two session ends over a loopback TCP connection with small socket buffers,
    each with its keeper running in ``nursery``."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    ta = await trio.open_tcp_stream("127.0.0.1", port)
    tb = await listener.accept()
    await listener.aclose()
    ta.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    tb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    a = SessionStream(ID, TOKEN, SessionConfig(), server=False)
    b = SessionStream(ID, TOKEN, SessionConfig(), server=True)
    await a.attach(ta, 0, "tcp")
    await b.attach(tb, 0, "tcp")
    nursery.start_soon(a.keep)
    nursery.start_soon(b.keep)
    return a, b


def _fill(a: SessionStream) -> bytes:
    """try_send 8 KiB pieces until the socket takes one only in part (bounded)."""
    taken = bytearray()
    for i in range(1000):
        piece = bytes([i % 251]) * 8192
        n = a.try_send(piece)
        assert n in (0, len(piece))
        if not n:
            break
        taken += piece
    assert a._tail is not None  # the last record went out only in part
    assert a.try_send(b"z") == 0  # nothing may pass the tail
    return bytes(taken)


async def test_socket_records_go_out_at_once_or_are_finished_by_the_keeper() -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _tcp_sessions(nursery)
        assert a.try_send(b"hello") == 5  # a socket with room: written at once
        assert await _read(b, 5) == b"hello"
        taken = _fill(a)
        await a.send_all(b"queued behind the tail")  # the tail's holder sends it after
        want = taken + b"queued behind the tail"
        assert await _read(b, len(want)) == want  # whole, in order
        assert a._tail is None
        assert a.try_send(b"again") == 5  # the flag was given back
        assert await _read(b, 5) == b"again"
        nursery.cancel_scope.cancel()


async def test_close_finishes_a_started_record_before_end() -> None:
    async with trio.open_nursery() as nursery:
        a, b = await _tcp_sessions(nursery)
        taken = _fill(a)
        nursery.start_soon(a.aclose)
        assert await _read(b, len(taken)) == taken
        with trio.fail_after(10):
            assert await b.receive_some() == b""  # END arrived: a clean end
        nursery.cancel_scope.cancel()


async def test_a_client_without_sessions_is_answered_without_waiting() -> None:
    # The server reads a bare-bus client's first byte to tell it from a
    # session greeting, and wraps its transport to give that byte back.  The
    # wrapper must keep the transport's non-waiting write: the bus answers
    # through it with no schedule point (without it, every reply to such a
    # client took an awaited send_all).
    from meshlink.session import PrefixedStream
    from meshlink.transport.nowait import nowait_sender

    a, b = socket.socketpair()
    async with trio.SocketStream(trio.socket.from_stdlib_socket(a)) as ours, \
            trio.SocketStream(trio.socket.from_stdlib_socket(b)) as theirs:
        wrapped = PrefixedStream(b"\x82", ours)
        write = nowait_sender(wrapped)
        assert write is not None
        assert write(b"reply") == 5
        assert await theirs.receive_some() == b"reply"
        assert await wrapped.receive_some() == b"\x82"  # the byte read ahead comes back
    memory, _ = trio.testing.memory_stream_pair()
    assert nowait_sender(PrefixedStream(b"", memory)) is None  # none to keep


async def test_the_bus_takes_the_bytes_read_ahead_then_reads_the_transport() -> None:
    # The server read the first bytes of a bare-bus client's hello; the bus
    # over the PrefixedStream feeds them to its core and reads the transport
    # itself from then on (split_read_ahead).  The hello arrives split in
    # two, and calls go both ways after it.
    from meshlink.bus import Connection, Handlers
    from meshlink.session import PrefixedStream

    client_end, server_end = trio.testing.memory_stream_pair()
    h = Handlers()
    h.add_method("echo", lambda x: x)

    async def read_ahead_then_serve() -> None:
        first = await server_end.receive_some(5)  # part of the client's hello
        wrapped = PrefixedStream(bytes(first), server_end)
        async with Connection.open(wrapped, h, name="server") as conn:
            assert await conn.call("echo", "from the server") == "from the server"
            await conn.wait_closed()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_ahead_then_serve)
            async with Connection.open(client_end, h, name="client") as conn:
                for i in range(3):
                    assert await conn.call("echo", i) == i
    wrapped = PrefixedStream(b"ab", client_end)
    assert wrapped.split_read_ahead() == (b"ab", client_end)
    assert wrapped.split_read_ahead() == (b"", client_end)  # handed over once
