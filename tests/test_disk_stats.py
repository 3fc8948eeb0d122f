"""Disk counters: requests by kind, bytes, errors and latency per disk and path.

Real servers (``meshlink.disk.serve`` on the blk ring and NBD at once) and
real clients: an mmap disk (served by the native C loop on the blk ring), a
RAM disk and a file disk (the Python loop) get N writes, N reads and a
flush over each path; the counters must say exactly that, keep it once the clients are
gone, and reach a bus client through the built-in ``meshlink.stats``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import meshlink
from meshlink import disk as mdisk
from meshlink._native import lib
from meshlink.bus import Handlers
from meshlink.disk.blk import BlkDisk
from meshlink.stats import STATS_METHOD

from .test_blk import _raw

N = 20
BLOCK = 4096


async def _io(disk: Any) -> None:
    for i in range(N):
        await disk.write(i * BLOCK, bytes([i + 1]) * BLOCK)
    for i in range(N):
        assert await disk.read(i * BLOCK, BLOCK) == bytes([i + 1]) * BLOCK
    await disk.flush()


def _check(row: dict[str, int], *, extra_requests: int = 0) -> None:
    assert row["writes"] == N and row["reads"] == N and row["flushes"] == 1
    assert row["bytes_written"] == N * BLOCK and row["bytes_read"] == N * BLOCK
    assert row["requests"] == 2 * N + 1 + extra_requests
    assert row["latency_count"] == row["requests"] and row["latency_ns_sum"] > 0


async def _serve_and_use(store: Path, tmp_path: Path, stats: mdisk.DiskStats,
                         nursery: trio.Nursery) -> Path:
    sock = tmp_path / "nbd.sock"
    exports = {"mmap": mdisk.MmapBackend(tmp_path / "m.img", size=1 << 20),
               "ram": mdisk.MemoryBackend(1 << 20),
               "file": mdisk.FileBackend(tmp_path / "f.img", size=1 << 20)}
    await nursery.start(lambda task_status: mdisk.serve(
        exports, f"unix:{sock}", service="stor", host_store=store, stats=stats,
        task_status=task_status))
    for name in exports:
        async with mdisk.open(f"stor/{name}", host_store=store) as local:
            assert isinstance(local, BlkDisk)
            await _io(local)
            live = stats.snapshot()[name]["blk"]
            assert live["connections"] == 1
            _check(live)  # read while the ring is open (the C loop's live counters)
        async with mdisk.open(f"nbd+unix:///{name}?socket={sock}") as remote:
            await _io(remote)
    return sock


async def test_counters_per_disk_and_path(store: Path, tmp_path: Path) -> None:
    stats = mdisk.DiskStats()
    async with trio.open_nursery() as nursery:
        await _serve_and_use(store, tmp_path, stats, nursery)
        nursery.cancel_scope.cancel()
    # Served and stopped: every connection closed, its counters folded in, not lost.
    snap = stats.snapshot()
    assert set(snap) == {"mmap", "ram", "file"}
    for name in ("mmap", "ram", "file"):
        for path in ("blk", "nbd"):
            _check(snap[name][path])
            assert snap[name][path]["errors"] == 0
            assert snap[name][path]["connections"] == 0, (name, path)
        total = snap[name]["total"]
        assert total["bytes_written"] == 2 * N * BLOCK and total["writes"] == 2 * N


@pytest.mark.parametrize("kind", ["mmap", "ram", "file"])
async def test_blk_errors_are_counted(store: Path, tmp_path: Path, kind: str) -> None:
    """Requests the server refuses count as errors, in the C loop and the Python one."""
    stats = mdisk.DiskStats()
    backend = (mdisk.MemoryBackend(1 << 20) if kind == "ram"
               else mdisk.MmapBackend(tmp_path / "m.img", size=1 << 20) if kind == "mmap"
               else mdisk.FileBackend(tmp_path / "f.img", size=1 << 20))

    def past_the_end(r: Any) -> None:
        r.operation, r.nr_segments = 0, 1  # READ
        r.sector_number = (1 << 20) // 512 - 4
        s = r.seg[0]
        s.gref, s.first_sect, s.last_sect = good, 0, 7

    def unknown_op(r: Any) -> None:
        r.operation = 42

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: mdisk.serve(
            {kind: backend}, service="stor", host_store=store, stats=stats,
            task_status=task_status))
        async with mdisk.open(f"stor/{kind}", host_store=store) as disk:
            assert isinstance(disk, BlkDisk)
            good = disk._pool // 4096
            assert await _raw(disk, past_the_end) == lib.ML_BLK_RSP_ERROR
            assert await _raw(disk, unknown_op) == lib.ML_BLK_RSP_EOPNOTSUPP
            await disk.write(0, b"x" * BLOCK)
            row = stats.snapshot()[kind]["blk"]
        assert (row["reads"], row["other"], row["writes"], row["errors"]) == (1, 1, 1, 2)
        assert row["bytes_read"] == 0 and row["bytes_written"] == BLOCK
        nursery.cancel_scope.cancel()


async def test_bus_stats_method_reports_disks(store: Path, tmp_path: Path) -> None:
    stats = mdisk.DiskStats()
    async with trio.open_nursery() as nursery:
        await _serve_and_use(store, tmp_path, stats, nursery)
        server = await nursery.start(lambda task_status: meshlink.serve(
            "stor-meta", Handlers(), host_store=store, handle_sigterm=False,
            disk_stats=stats, task_status=task_status))
        async with meshlink.connect("stor-meta", host_store=store, client_name="t") as conn:
            snap = await conn.call(STATS_METHOD)
        for name in ("mmap", "ram", "file"):
            _check(snap["disks"][name]["blk"])
            _check(snap["disks"][name]["nbd"])
        server.stop()
        nursery.cancel_scope.cancel()


async def test_no_disks_no_key(store: Path) -> None:
    """A service that serves no disk reports no ``disks`` (the key's absence says so)."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: meshlink.serve(
            "plain", Handlers(), host_store=store, handle_sigterm=False,
            task_status=task_status))
        assert "disks" not in server.stats.snapshot()
        server.stop()
