"""Our NBD client: against nbdkit (interop) and against our own server in-process."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from meshlink import ConnectionLost, DiskError, HandshakeError
from meshlink.disk import MemoryBackend, NullBackend
from meshlink.disk.nbd import Export, NBDServer, list_exports, open_listeners, open_nbd
from meshlink.disk.nbd import wire as c
from tests.helpers.nbd import need, wait_until_accepting

MIB = 1 << 20


@pytest.fixture
async def nbdkit_memory(tmp_path: Path) -> AsyncIterator[str]:
    need("nbdkit")
    sock = tmp_path / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                             "memory", "16M"])
    try:
        await trio.to_thread.run_sync(wait_until_accepting, str(sock), proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait()


async def test_client_against_nbdkit_memory(nbdkit_memory: str) -> None:
    async with open_nbd(nbdkit_memory) as disk:
        assert disk.size == 16 * MIB and not disk.read_only
        data = os.urandom(3 * MIB + 123)
        await disk.write(1000, data)
        assert await disk.read(1000, len(data)) == data
        await disk.flush()
        await disk.discard(0, MIB)
        assert await disk.read(0, 4096) == bytes(4096)
        await disk.write_zeroes(2 * MIB, MIB)
        assert await disk.read(2 * MIB, MIB) == bytes(MIB)
        extents = await disk.block_status(0, 16 * MIB)
        assert extents and all(length > 0 for length, _ in extents)
        with pytest.raises(DiskError) as info:
            await disk.read(16 * MIB - 1, 2)
        assert info.value.errno == errno.EINVAL


async def _serve(nursery: trio.Nursery, tmp_path: Path, server: NBDServer) -> str:
    path = str(tmp_path / "ours.sock")
    listeners = await open_listeners(f"unix:{path}")
    await nursery.start(server.serve_listeners, listeners)
    return path


async def test_pipelined_requests_many_clients(tmp_path: Path) -> None:
    backend = MemoryBackend(32 * MIB)
    server = NBDServer([Export("d", backend)])
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, tmp_path, server)

        async def worker(i: int) -> None:
            async with open_nbd(unix_path=path, export="d", max_in_flight=16) as disk:
                base = i * 4 * MIB
                blocks = [hashlib.shake_256(bytes([i, j])).digest(4096) for j in range(256)]
                async with trio.open_nursery() as inner:  # 256 writes in flight at once
                    for j, block in enumerate(blocks):
                        inner.start_soon(disk.write, base + j * 4096, block)
                got: dict[int, bytes] = {}

                async def read(j: int) -> None:
                    got[j] = await disk.read(base + j * 4096, 4096)

                async with trio.open_nursery() as inner:
                    for j in range(256):
                        inner.start_soon(read, j)
                assert [got[j] for j in range(256)] == blocks

        async with trio.open_nursery() as clients:
            for i in range(6):
                clients.start_soon(worker, i)
        nursery.cancel_scope.cancel()


async def test_typed_errors_from_our_server(tmp_path: Path) -> None:
    server = NBDServer([Export("rw", MemoryBackend(MIB)),
                        Export("ro", MemoryBackend(MIB), read_only=True)])
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, tmp_path, server)
        assert sorted(n for n, _ in await list_exports(unix_path=path)) == ["ro", "rw"]
        async with open_nbd(unix_path=path, export="ro") as disk:
            assert disk.read_only
            with pytest.raises(DiskError) as info:
                await disk.write(0, b"x")
            assert info.value.errno == errno.EPERM
            with pytest.raises(DiskError) as info:
                await disk.read(MIB, 1)
            assert info.value.errno == errno.EINVAL
            assert await disk.read(0, 3) == b"\0\0\0"
        async with open_nbd(unix_path=path, export="rw") as disk:
            # A request larger than one NBD request is split, never short.
            big = os.urandom(MIB)
            await disk.write(0, big)
            assert await disk.read(0, MIB) == big
            assert (await disk.block_status(0, MIB))[0][1] == 0
            with pytest.raises(DiskError) as info:
                await disk.write(MIB - 1, b"xy")
            assert info.value.errno == errno.EINVAL
        with pytest.raises(HandshakeError):
            async with open_nbd(unix_path=path, export="missing"):
                pass  # pragma: no cover
        nursery.cancel_scope.cancel()


async def test_server_death_is_connection_lost(tmp_path: Path) -> None:
    server = NBDServer([Export("d", NullBackend(MIB))])
    async with trio.open_nursery() as nursery:
        serve_scope = trio.CancelScope()

        async def run_server(task_status: trio.TaskStatus[str]) -> None:
            with serve_scope:
                async with trio.open_nursery() as inner:
                    task_status.started(await _serve(inner, tmp_path, server))

        path = await nursery.start(run_server)
        async with open_nbd(unix_path=path, export="d") as disk:
            assert await disk.read(0, 10) == bytes(10)
            serve_scope.cancel()  # the server goes away under the client
            with pytest.raises(ConnectionLost):
                for _ in range(1000):
                    await disk.read(0, 10)


async def test_no_silent_short_reads() -> None:
    """A server claiming success with fewer bytes than asked is a protocol error."""
    from meshlink import RemoteProtocolError
    from meshlink.disk.nbd.client_handshake import Negotiated
    from meshlink.disk.nbd.client_transmission import ClientTransmission

    tx = ClientTransmission(Negotiated("", MIB, 1, True, {}))
    cookie, _ = tx.request(c.CMD_READ, 0, 100)
    chunk = c.DATA_CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                                     c.REPLY_TYPE_OFFSET_DATA, cookie, 8 + 50, 0) + bytes(50)
    tx.receive_data(chunk)
    with pytest.raises(RemoteProtocolError, match="short read"):
        tx.next_event()
