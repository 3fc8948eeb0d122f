"""VchanStream / VchanListener: trio's stream conformance, auth, stale entries."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from meshlink import AddressInUse, AuthError, LocalProtocolError, ServiceNotFound
from meshlink.transport.vchan import VchanStream, connect_vchan, open_vchan_listener
from resolver import HostStore

from .conftest import Peer

_names = itertools.count()


async def vchan_pair(
    store: Path, server_sizes: dict[str, int] | None = None, **sizes: int
) -> tuple[VchanStream, VchanStream]:
    """A connected (client, server) pair through a real host store."""
    name = f"pair{next(_names)}"
    listener = await open_vchan_listener(name, host_store=store, **(server_sizes or sizes))
    accepted: list[VchanStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await connect_vchan(name, host_store=store, **sizes)
    await listener.aclose()
    return client, accepted[0]


async def test_half_closeable_stream_conformance(store: Path) -> None:
    async def maker() -> tuple[VchanStream, VchanStream]:
        return await vchan_pair(store)

    async def flipped() -> tuple[VchanStream, VchanStream]:
        c, s = await vchan_pair(store)
        return s, c

    await trio.testing.check_half_closeable_stream(maker, None)
    await trio.testing.check_half_closeable_stream(flipped, None)


async def test_conformance_with_tiny_rings(store: Path) -> None:
    async def maker() -> tuple[VchanStream, VchanStream]:
        return await vchan_pair(store, read_min=1024, write_min=2048)

    await trio.testing.check_half_closeable_stream(maker, None)


async def test_sizes_negotiated(store: Path) -> None:
    none = {"read_min": 0, "write_min": 0}
    client, server = await vchan_pair(store, none, read_min=1 << 16, write_min=1 << 12)
    assert (client.read_size, client.write_size) == (1 << 16, 1 << 12)
    assert (server.read_size, server.write_size) == (1 << 12, 1 << 16)
    assert server.peer.pid == os.getpid() and server.peer.uid == os.getuid()
    await client.aclose()
    await server.aclose()


async def test_whole_writes_and_a_bound_receive(store: Path) -> None:
    """try_send_whole writes all or nothing; bind_receive is receive_some
    with its size bound, to the end of the stream and past a close."""
    client, server = await vchan_pair(store, write_min=4096)
    try:
        assert client.try_send_whole(b"a" * 100) == 100
        space = client.send_space()
        assert client.try_send_whole(b"x" * (space + 1)) == 0  # does not fit now
        assert client.try_send_whole(b"y" * (client.write_size + 1)) == 0  # nor ever
        assert client.send_space() == space  # nothing of either was written
        with pytest.raises(ValueError):
            server.bind_receive(0)
        small = server.bind_receive(16)
        got = [await small() for _ in range(7)]
        assert got == [b"a" * 16] * 6 + [b"a" * 4]
        space = client.send_space()  # the whole ring again
        assert client.try_send_whole(b"b" * space) == space  # exactly what fits
        assert client.send_space() == 0
        whole = server.bind_receive()
        got_b = b""
        while len(got_b) < space:  # a read stops at the ring's end: two, here
            got_b += await whole()
        assert got_b == b"b" * space
        await client.send_eof()
        assert await whole() == b""
    finally:
        await client.aclose()
        await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await whole()
    with pytest.raises(trio.ClosedResourceError):
        client.try_send_whole(b"z")


async def test_read_spin_follows_recent_waits(store: Path) -> None:
    """A reader spins a few times its recent average wait (a wake-up costs more than
    a short spin), not at all for a slow peer, briefly after bulk reads."""
    from meshlink.transport.vchan import stream as vs

    client, server = await vchan_pair(store)
    client._read_wait_avg = 30e-6  # peer answers in ~30 us: spin through 4x that
    assert client._read_spin_budget() == pytest.approx(vs.READ_SPIN_FACTOR * 30e-6)
    client._read_wait_avg = 200e-6  # capped
    assert client._read_spin_budget() == vs.MAX_READ_SPIN
    client._read_wait_avg = 2 * vs.MAX_READ_SPIN  # a slow peer: sleep at once
    assert client._read_spin_budget() == 0
    client._read_wait_avg, client._last_read = 30e-6, vs.BULK_READ  # bulk: the writer's cap
    assert client._read_spin_budget() == vs.SPIN_SECONDS
    # A real wait feeds the average.  Samples are capped at 2 * MAX_READ_SPIN,
    # and a sleeping reader's wake-up can take that long on a loaded host, so
    # start above the cap: any recorded wait, however slow, pulls it down.
    start = 4 * vs.MAX_READ_SPIN
    client._read_wait_avg, client._last_read = start, 0
    assert client._read_spin_budget() == 0  # the sleeping path, as for a slow peer
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.receive_some, 1)
        await trio.testing.wait_all_tasks_blocked()
        await server.send_all(b"x")
    assert client._read_wait_avg <= start - (start - 2 * vs.MAX_READ_SPIN) / 4
    await client.aclose()
    await server.aclose()


async def test_uid_not_allowed_is_refused(store: Path) -> None:
    listener = await open_vchan_listener("guarded", host_store=store,
                                         allow_uids={os.getuid() + 4242})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listener.accept)
        with pytest.raises(AuthError, match=f"uid {os.getuid()} is not allowed"):
            await connect_vchan("guarded", host_store=store)
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_missing_service(store: Path) -> None:
    with pytest.raises(ServiceNotFound):
        await connect_vchan("nobody-home", host_store=store)


async def test_bad_names_and_sizes(store: Path) -> None:
    with pytest.raises(LocalProtocolError):
        await open_vchan_listener("../escape", host_store=store)
    with pytest.raises(LocalProtocolError):
        await open_vchan_listener("ok", host_store=store, read_min=(1 << 20) + 1)


async def test_second_live_server_is_refused(store: Path) -> None:
    listener = await open_vchan_listener("solo", host_store=store)
    with pytest.raises(AddressInUse):
        await open_vchan_listener("solo", host_store=store)
    await listener.aclose()
    # Withdrawn cleanly: the name is free again and the files are gone.
    assert list(store.iterdir()) == []
    again = await open_vchan_listener("solo", host_store=store)
    await again.aclose()


async def test_stale_socket_of_killed_server_is_replaced(store: Path, peers: list[Peer]) -> None:
    server = Peer("vchan_peer.py", "serve", str(store), "phoenix")
    peers.append(server)
    await trio.to_thread.run_sync(server.expect, "ready")
    hs = HostStore(store)
    assert hs.is_live("phoenix")
    server.kill()  # SIGKILL: leaves phoenix.sock and phoenix.lock behind
    assert (store / "phoenix.sock").exists()
    assert not hs.is_live("phoenix")
    assert list(hs.services()) == [("phoenix", False)]
    with pytest.raises(ServiceNotFound):
        await connect_vchan("phoenix", host_store=store)
    # A new server claims the name, replacing (not reusing) the stale socket.
    listener = await open_vchan_listener("phoenix", host_store=store)
    assert hs.is_live("phoenix")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listener.accept)
        client = await connect_vchan("phoenix", host_store=store)
        nursery.cancel_scope.cancel()
    await client.aclose()
    await listener.aclose()


def test_default_store_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHLINK_HOST_STORE", str(tmp_path / "env-store"))
    assert HostStore().path == tmp_path / "env-store"
    monkeypatch.delenv("MESHLINK_HOST_STORE")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert HostStore().path == tmp_path / "meshlink"
    assert (tmp_path / "meshlink").stat().st_mode & 0o777 == 0o700
    assert HostStore(tmp_path / "explicit").path == tmp_path / "explicit"


def test_default_store_must_be_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from resolver import StoreError as TransportError

    monkeypatch.delenv("MESHLINK_HOST_STORE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "meshlink").mkdir(mode=0o777)
    os.chmod(tmp_path / "meshlink", 0o777)
    with pytest.raises(TransportError, match="not private"):
        HostStore()


async def test_a_parked_waiter_leaves_a_later_signal_for_the_next_sleep() -> None:
    """Two tasks wait on one doorbell (a stream's reader and writer do): one polls,
    one parks.  When the poller wakes, a signal the peer sends afterwards (for a
    waiter that re-armed and slept again) must survive the parked waiter's
    wake-up; if that waiter consumed it, the sleeper would never wake."""
    import select

    from meshlink.transport.doorbell import Doorbell

    own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    peer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    bell = Doorbell(own, peer, None)
    woke: list[str] = []

    async def poller() -> None:
        await bell.wait()
        woke.append("poller")
        os.eventfd_write(own, 1)  # the peer signals again, for a later sleep

    async def parked() -> None:
        await bell.wait()
        woke.append("parked")

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(parked)
                await trio.testing.wait_all_tasks_blocked()
                os.eventfd_write(own, 1)
        assert sorted(woke) == ["parked", "poller"]
        assert select.select([own], [], [], 0)[0] == [own]  # still there for the next sleep
    finally:
        bell.close()


async def test_a_blocking_end_writes_and_waits_in_one_call(store: Path) -> None:
    """ml_vchan_idle and ml_vchan_write_wait, the blocking client's call: idle
    only with nothing to read and a live peer; a request that does not fit is
    not written at all; one that fits is, and the reply is read in the same call."""
    from meshlink._native import ffi, lib

    client, server = await vchan_pair(store)
    ring, bell = client.detach()
    buf = ffi.new("char[]", 64)
    try:
        assert ring.idle(bell.live_fd)
        await server.send_all(b"ping")
        assert not ring.idle(bell.live_fd)  # something came in: look first
        assert ring.read_bytes(64) == b"ping"
        assert ring.idle(bell.live_fd)

        too_big = b"r" * (ring.write_size + 1)
        rc = ring.write_wait(too_big, buf, 64, bell.wait_fd, bell.ack_fd, 0, 0)
        assert rc == lib.ML_ENOROOM
        with trio.move_on_after(0.05):
            await server.receive_some()
            pytest.fail("part of a request that did not fit was written")

        rc = ring.write_wait(b"request", buf, 64, bell.wait_fd, bell.ack_fd, 0, 0)
        assert rc == lib.ML_ETIMEDOUT  # written; no reply within 0 ms
        assert await server.receive_some() == b"request"
        await server.send_all(b"reply")  # there before the next call: read at once
        rc = ring.write_wait(b"again", buf, 64, bell.wait_fd, bell.ack_fd, 0, 1000)
        assert ffi.buffer(buf, rc)[:] == b"reply"
        assert await server.receive_some() == b"again"

        await server.aclose()  # the peer's live byte goes to 0
        assert not ring.idle(bell.live_fd)
    finally:
        ring.close()
        bell.close()
        ring.free()
