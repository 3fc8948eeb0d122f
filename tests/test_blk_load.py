"""The blk ring's native pieces: the load generator (run_load) and the server's C loop thread."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio

from meshlink import ConnectionLost, LocalProtocolError
from meshlink.disk import MemoryBackend
from meshlink.disk.blk import open_blk, serve_blk
from meshlink.disk.blk.load import run_load
from meshlink.disk.counters import DiskStats

from .conftest import Peer

MIB = 1 << 20


async def _serve(nursery: trio.Nursery, store: Path, disk: MemoryBackend,
                 stats: DiskStats | None = None) -> None:
    await nursery.start(lambda task_status: serve_blk(
        "load", {"d": disk}, host_store=store, stats=stats, task_status=task_status))


async def test_run_load_moves_the_callers_buffer(store: Path) -> None:
    """Writes send the buffer, reads land in it; with indirect 1 MiB requests too."""
    disk = MemoryBackend(16 * MIB)
    async with trio.open_nursery() as nursery:
        await _serve(nursery, store, disk)
        async with open_blk("load/d", host_store=store) as front:
            for block, qd in ((4096, 1), (MIB, 4)):
                out = bytearray(os.urandom(block * qd))
                r = run_load(front, write=True, block_size=block, queue_depth=qd, seconds=0,
                             random_offsets=False, span=block * qd, buffer=out)
                assert (r.requests, r.errors) == (qd, 0)
                assert await front.read(0, block * qd) == bytes(out)
                back = bytearray(block * qd)
                r = run_load(front, write=False, block_size=block, queue_depth=qd, seconds=0,
                             random_offsets=False, span=block * qd, buffer=back)
                assert (r.requests, r.errors) == (qd, 0) and back == out
            # Timed random reads, then the disk is as usable as before.
            r = run_load(front, write=False, block_size=4096, queue_depth=8, seconds=0.05,
                         random_offsets=True)
            assert r.requests >= 8 and r.errors == 0 and r.iops > 0
            assert len(front._free) == front.ring_entries
            await front.write(8 * MIB, b"\x42" * 512)
            assert await front.read(8 * MIB, 512) == b"\x42" * 512
        nursery.cancel_scope.cancel()


async def test_run_load_refuses_what_the_ring_cannot_carry(store: Path) -> None:
    disk = MemoryBackend(4 * MIB)
    async with trio.open_nursery() as nursery:
        await _serve(nursery, store, disk)
        async with open_blk("load/d", host_store=store) as front:
            bad = [dict(block_size=1000), dict(block_size=2 * MIB), dict(queue_depth=0),
                   dict(queue_depth=front.ring_entries + 1), dict(span=8 * MIB),
                   dict(span=256), dict(buffer=bytearray(10))]
            for kw in bad:
                args = dict(write=False, block_size=4096, queue_depth=1, seconds=0,
                            random_offsets=False) | kw
                with pytest.raises(LocalProtocolError):
                    run_load(front, **args)  # type: ignore[arg-type]
            # A request of this disk's own in flight: refused, nothing sent.
            front._free.popleft()
            with pytest.raises(LocalProtocolError, match="in flight"):
                run_load(front, write=False, block_size=4096, queue_depth=1, seconds=0,
                         random_offsets=False)
        nursery.cancel_scope.cancel()


async def test_run_load_against_a_dead_server_raises(tmp_path: Path, store: Path) -> None:
    server = Peer("blk_server.py", str(store), "gone", f"memory:m::{4 * MIB}")
    server.expect("ready")
    async with open_blk("gone/m", host_store=store) as front:
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(ConnectionLost, match="went away"):
            run_load(front, write=False, block_size=4096, queue_depth=1, seconds=1,
                     random_offsets=False)
        # Told by the socket's hang-up, not by the 5 s stall timeout.
        assert time.monotonic() - start < 4
        with pytest.raises(ConnectionLost):  # the disk stays broken
            await front.read(0, 512)
    server.kill()


async def test_native_server_loop_stops_on_cancel_with_clients_connected(store: Path) -> None:
    """Cancelling the server stops the C loop's thread (asleep in poll) and tells the client."""
    disk = MemoryBackend(4 * MIB)
    stats = DiskStats()
    server_scope = trio.CancelScope()
    done = trio.Event()

    async def run_server(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with server_scope:
                await serve_blk("load", {"d": disk}, host_store=store, stats=stats,
                                task_status=task_status)
        finally:
            done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server)
            async with open_blk("load/d", host_store=store) as front:
                await front.write(0, b"\x5a" * 512)
                live = [c for c in stats._live if c.key == ("d", "blk")]
                assert len(live) == 1 and live[0].native is not None  # served by the C loop
                server_scope.cancel()
                await done.wait()  # returns only once the thread left the ring
                with pytest.raises(ConnectionLost):
                    await front.read(0, 512)
    row = stats.snapshot()["d"]["blk"]  # the closed connection's counters, folded in
    assert (row["writes"], row["bytes_written"], row["connections"]) == (1, 512, 0)
    assert row["latency_count"] == row["requests"] and row["latency_ns_sum"] > 0
