"""meshlink's Xen provider against Debian's real libxenvchan, over the emulated
Xen userspace (tests/xenemu): bulk both ways per ring order, packet mode,
close from either side, peer death, and trio's stream conformance."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

import meshlink.transport.vchan.xen
from meshlink import ConnectionLost, ServiceNotFound
from meshlink.transport.vchan.xen import (
    XenVchanServer,
    XenVchanStream,
    connect_xen_vchan,
    open_xen_vchan_server,
)

from .xenemu.fixtures import PEER_DOMID, PY_DOMID, XenHost, crc, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]

BLOCK = random.Random(99).randbytes((1 << 20) + 4093)
# (read_min, write_min) of the server -> (left order, right order)
ORDERS = {
    "10": ((1024, 2048), (10, 11)),
    "11": ((2048, 1024), (11, 10)),
    "12": ((4096, 4096), (12, 12)),
    "13": ((8192, 8192), (13, 13)),
    "16": ((65536, 65536), (16, 16)),
}


def chunks(total: int, seed: int):
    rng = random.Random(seed)
    off = sent = 0
    while sent < total:
        n = min(total - sent, rng.choice((1, 7, 100, 1000, 4096, 65536, 200_000,
                                          rng.randint(1, 300_000))))
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(BLOCK) - off)
            out += BLOCK[off : off + take]
            off = (off + take) % len(BLOCK)
        sent += n
        yield bytes(out)


async def pump(stream: XenVchanStream, send: int, expect: int, seed: int) -> dict[str, int]:
    """Send ``send`` bytes and receive ``expect`` concurrently; then expect EOF."""
    res = {"sent": 0, "sent_crc": 0, "recv": 0, "recv_crc": 0}

    async def sender() -> None:
        for chunk in chunks(send, seed):
            await stream.send_all(chunk)
            res["sent_crc"] = crc(chunk, res["sent_crc"])
            res["sent"] += len(chunk)

    async def receiver() -> None:
        rng = random.Random(seed + 1)
        while res["recv"] < expect:
            data = await stream.receive_some(rng.choice((1, 100, 4096, 65536, 1 << 20)))
            assert data, f"EOF after {res['recv']} of {expect} bytes"
            res["recv_crc"] = crc(data, res["recv_crc"])
            res["recv"] += len(data)

    async with trio.open_nursery() as n:
        n.start_soon(sender)
        n.start_soon(receiver)
    return res


async def _libxenvchan_server_meshlink_client(host: XenHost, order: str, size: int) -> None:
    (rmin, wmin), (left, right) = ORDERS[order]
    path = host.path(PEER_DOMID, PY_DOMID)
    peer = host.peer("server", str(PY_DOMID), path, "stream", "--send", str(size), "--expect",
                     str(size), "--read-min", str(rmin), "--write-min", str(wmin), "--seed", "5")
    await trio.to_thread.run_sync(peer.expect_ready)
    stream = await connect_xen_vchan(PEER_DOMID, path)
    # The client writes the left ring and reads the right one.
    assert (stream.write_size, stream.read_size) == (1 << left, 1 << right)
    mine = await pump(stream, size, size, seed=7)
    assert await stream.receive_some() == b""  # libxenvchan closed after its data
    await stream.aclose()
    theirs = await trio.to_thread.run_sync(peer.result)
    assert (theirs["read_order"], theirs["write_order"]) == (left, right)
    assert theirs["recv"] == mine["sent"] == size and theirs["recv_crc"] == mine["sent_crc"]
    assert theirs["sent"] == mine["recv"] == size and theirs["sent_crc"] == mine["recv_crc"]


async def _meshlink_server_libxenvchan_client(host: XenHost, order: str, size: int) -> None:
    (rmin, wmin), (left, right) = ORDERS[order]
    path = host.path(PY_DOMID, PEER_DOMID)
    server = await XenVchanServer.publish(PEER_DOMID, path, read_min=rmin, write_min=wmin)
    peer = host.peer("client", str(PY_DOMID), path, "stream", "--send", str(size), "--expect",
                     str(size), "--seed", "6")
    stream = await server.wait_connected()
    assert (stream.read_size, stream.write_size) == (1 << left, 1 << right)
    mine = await pump(stream, size, size, seed=8)
    assert await stream.receive_some() == b""
    await stream.aclose()
    theirs = await trio.to_thread.run_sync(peer.result)
    # libxenvchan's client reads the right ring and writes the left one.
    assert (theirs["read_order"], theirs["write_order"]) == (right, left)
    assert theirs["recv"] == mine["sent"] == size and theirs["recv_crc"] == mine["sent_crc"]
    assert theirs["sent"] == mine["recv"] == size and theirs["sent_crc"] == mine["recv_crc"]


@pytest.mark.parametrize("order", sorted(ORDERS))
async def test_libxenvchan_server_meshlink_client_4mib(xen_host: XenHost, order: str) -> None:
    await _libxenvchan_server_meshlink_client(xen_host, order, 4 << 20)


@pytest.mark.parametrize("order", sorted(ORDERS))
async def test_meshlink_server_libxenvchan_client_4mib(xen_host: XenHost, order: str) -> None:
    await _meshlink_server_libxenvchan_client(xen_host, order, 4 << 20)


@pytest.mark.slow
@pytest.mark.parametrize("order", sorted(ORDERS))
async def test_libxenvchan_server_meshlink_client_64mib(xen_host: XenHost, order: str) -> None:
    await _libxenvchan_server_meshlink_client(xen_host, order, 64 << 20)


@pytest.mark.slow
@pytest.mark.parametrize("order", sorted(ORDERS))
async def test_meshlink_server_libxenvchan_client_64mib(xen_host: XenHost, order: str) -> None:
    await _meshlink_server_libxenvchan_client(xen_host, order, 64 << 20)


@pytest.mark.parametrize("size", [1, 1000, 4096])
async def test_packet_mode_against_libxenvchan_send_recv(xen_host: XenHost, size: int) -> None:
    path = xen_host.path(PY_DOMID, PEER_DOMID)
    server = await XenVchanServer.publish(PEER_DOMID, path, read_min=4096, write_min=4096)
    count = 300
    peer = xen_host.peer("client", str(PY_DOMID), path, "packets", "--count", str(count),
                         "--size", str(size))
    stream = await server.wait_connected()
    rng = random.Random(size)
    sent_crc = 0
    for _ in range(count):
        pkt = rng.randbytes(size)
        await stream.send_packet(pkt)
        sent_crc = crc(pkt, sent_crc)
        # libxenvchan_recv took exactly one packet and libxenvchan_send
        # returned it whole.
        assert await stream.receive_packet(size) == pkt
    assert await stream.receive_packet(size) == b""
    await stream.aclose()
    theirs = await trio.to_thread.run_sync(peer.result)
    assert theirs["recv"] == count * size and theirs["recv_crc"] == sent_crc


async def test_packet_larger_than_ring_is_refused(xen_host: XenHost) -> None:
    from meshlink import LocalProtocolError

    server = await XenVchanServer.publish(PY_DOMID, "big", read_min=4096, write_min=4096)
    async with trio.open_nursery() as n:
        got: list[XenVchanStream] = []

        async def accept() -> None:
            got.append(await server.wait_connected())

        n.start_soon(accept)
        client = await connect_xen_vchan(PY_DOMID, "big")
    with pytest.raises(LocalProtocolError):
        await client.send_packet(b"x" * 4097)
    await client.aclose()
    await got[0].aclose()


async def test_meshlink_close_delivers_everything_to_libxenvchan(xen_host: XenHost) -> None:
    size = 3 << 20
    path = xen_host.path(PY_DOMID, PEER_DOMID)
    server = await XenVchanServer.publish(PEER_DOMID, path, read_min=4096, write_min=16384)
    peer = xen_host.peer("client", str(PY_DOMID), path, "stream", "--expect", str(size),
                         "--until-eof")
    stream = await server.wait_connected()
    data = random.Random(1).randbytes(size)
    await stream.send_all(data)
    await stream.aclose()  # at once: the last ring-full is still unread
    theirs = await trio.to_thread.run_sync(peer.result)
    assert theirs["recv"] == size and theirs["recv_crc"] == crc(data)
    assert theirs["extra"] == 0


async def test_libxenvchan_close_delivers_everything_to_meshlink(xen_host: XenHost) -> None:
    size = 3 << 20
    path = xen_host.path(PEER_DOMID, PY_DOMID)
    peer = xen_host.peer("server", str(PY_DOMID), path, "stream", "--send", str(size),
                         "--read-min", "4096", "--write-min", "16384")
    await trio.to_thread.run_sync(peer.expect_ready)
    stream = await connect_xen_vchan(PEER_DOMID, path)
    # It closes as soon as its last write fits in the ring: hold back the
    # reader until then so that the last ring-full is read after the close.
    got = h = 0
    while got < size - 16384:
        data = await stream.receive_some(16384)
        got += len(data)
        h = crc(data, h)
    theirs = await trio.to_thread.run_sync(peer.result)
    while data := await stream.receive_some():
        got += len(data)
        h = crc(data, h)
    assert got == size and h == theirs["sent_crc"]
    await stream.aclose()


async def test_killed_libxenvchan_peer_is_seen(xen_host: XenHost) -> None:
    """kill -9 of the only process of the peer's domain: the domain is gone,
    nothing clears its live byte; we read its data, then ConnectionLost (the
    @releaseDomain watch), and writing fails too."""
    size = 10000
    path = xen_host.path(PEER_DOMID, PY_DOMID)
    peer = xen_host.peer("server", str(PY_DOMID), path, "stream", "--send", str(size),
                         "--hold", "--write-min", "65536")
    await trio.to_thread.run_sync(peer.expect_ready)
    stream = await connect_xen_vchan(PEER_DOMID, path)
    theirs = await trio.to_thread.run_sync(peer.readline_json)
    peer.kill()
    got = b""
    with trio.fail_after(20), pytest.raises(ConnectionLost):
        while data := await stream.receive_some():
            got += data
    assert len(got) == size and crc(got) == theirs["sent_crc"]
    # Writing to a dead peer fails instead of hanging.
    with trio.fail_after(20), pytest.raises(ConnectionLost):
        await stream.send_all(b"z" * (1 << 20))
    await stream.aclose()


async def test_server_node_is_readable_by_the_client_domain_only(xen_host: XenHost) -> None:
    from meshlink._native import ffi, lib

    path = xen_host.path(PY_DOMID, PEER_DOMID)
    server = await XenVchanServer.publish(PEER_DOMID, path, read_min=4096, write_min=4096)
    try:
        xs = lib.ml_xs_open()
        buf = ffi.new("char[64]")
        n = lib.ml_xs_read(xs, 0, f"{path}/ring-ref".encode(), buf, 64)
        assert n > 0 and int(ffi.string(buf, n)) >= 8  # our own node
        lib.ml_xs_close(xs)
        # Another domain (3) cannot read it; the client domain (2) can.
        for domid, ok in ((3, False), (PEER_DOMID, True)):
            peer = xen_host.peer("client", str(PY_DOMID), path, "packets", "--count", "0",
                                 "--tries", "1", domid=domid)
            rc = await trio.to_thread.run_sync(lambda p=peer: p.proc.wait(30))
            assert (rc == 0) is ok, peer.proc.stderr.read() if peer.proc.stderr else ""
    finally:
        await server.aclose()
    # Closing withdrew the node.
    with pytest.raises(ServiceNotFound, match="ring-ref"):
        await connect_xen_vchan(PY_DOMID, path)


async def xen_pair() -> tuple[XenVchanStream, XenVchanStream]:
    xen_pair.n += 1  # type: ignore[attr-defined]
    port = f"conf{xen_pair.n}"  # type: ignore[attr-defined]
    server = await XenVchanServer.publish(PY_DOMID, port, read_min=1 << 16, write_min=1 << 16)
    got: list[XenVchanStream] = []
    async with trio.open_nursery() as n:

        async def accept() -> None:
            got.append(await server.wait_connected())

        n.start_soon(accept)
        client = await connect_xen_vchan(PY_DOMID, port)
    return client, got[0]


xen_pair.n = 0  # type: ignore[attr-defined]


async def test_half_closeable_stream_conformance_over_xen(
    xen_host: XenHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A peer that closed cannot be told from one that only sent EOF (both
    # clear their live byte, as libxenvchan expects); a writer on a full ring
    # gives up after the grace period.  Shorten it: trio's suite expects
    # BrokenResourceError "eventually" a dozen times.
    monkeypatch.setattr(meshlink.transport.vchan.xen, "CLOSED_PEER_GRACE", 0.2)
    async def flipped() -> tuple[XenVchanStream, XenVchanStream]:
        c, s = await xen_pair()
        return s, c

    await trio.testing.check_half_closeable_stream(xen_pair, None)
    await trio.testing.check_half_closeable_stream(flipped, None)


async def test_open_xen_vchan_server_waits_for_client(xen_host: XenHost) -> None:
    path = xen_host.path(PY_DOMID, PEER_DOMID)
    async with trio.open_nursery() as n:
        got: list[XenVchanStream] = []

        async def serve() -> None:
            got.append(await open_xen_vchan_server(PEER_DOMID, path, read_min=4096,
                                                   write_min=4096))

        n.start_soon(serve)
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        peer = xen_host.peer("client", str(PY_DOMID), path, "stream", "--send", "5")
    stream = got[0]
    assert await stream.receive_some() != b""
    await stream.aclose()
    await trio.to_thread.run_sync(peer.result)
