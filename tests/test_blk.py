"""The blk ring between processes: integrity per backend, durability, hostile frontends."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlink import ConnectionLost, DiskError, LocalProtocolError, ServiceNotFound
from meshlink._native import ffi, lib
from meshlink.disk.blk import BlkDisk, open_blk

from .conftest import Peer

SIZE = 4 << 20
GOLD = bytes(range(256)) * (SIZE // 256)


@pytest.fixture(scope="module")
def blk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One server process exporting one disk per backend kind."""
    d = tmp_path_factory.mktemp("blk")
    store = d / "store"
    store.mkdir(mode=0o700)
    (d / "gold.img").write_bytes(GOLD)
    specs = [f"memory:memory::{SIZE}", f"null:null::{SIZE}", f"file:file:{d / 'file.img'}:{SIZE}",
             f"mmap:mmap:{d / 'mmap.img'}:{SIZE}", f"cow:cow:{d / 'gold.img'}"]
    server = Peer("blk_server.py", str(store), "storage-node", *specs)
    server.expect("ready")
    yield store, d
    server.kill()


# Reference contents, carried across hypothesis examples like the disks are.
REFERENCE = {
    "memory": bytearray(SIZE),
    "null": bytearray(SIZE),
    "file": bytearray(SIZE),
    "mmap": bytearray(SIZE),
    "cow": bytearray(GOLD),
}

ops = st.lists(
    st.one_of(
        st.tuples(st.just("w"), st.integers(0, SIZE // 512 - 1), st.integers(1, 300),
                  st.integers(0, 255)),
        st.tuples(st.just("r"), st.integers(0, SIZE - 1), st.integers(1, 400_000), st.just(0)),
    ),
    min_size=1, max_size=8,
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(REFERENCE))
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=ops)
def test_random_io_matches_reference(blk_server: tuple[Path, Path], kind: str,
                                     script: list[tuple[str, int, int, int]]) -> None:
    store, _ = blk_server
    ref = REFERENCE[kind]

    async def run() -> None:
        async with open_blk(f"storage-node/{kind}", host_store=store) as disk:
            assert disk.size == SIZE
            for op, a, b, fill in script:
                if op == "w":
                    sector = a
                    count = min(b, SIZE // 512 - sector)
                    data = bytes([fill]) * (count * 512)
                    await disk.write(sector * 512, data)
                    if kind != "null":
                        ref[sector * 512 : sector * 512 + len(data)] = data
                else:
                    length = min(b, SIZE - a)
                    assert await disk.read(a, length) == bytes(ref[a : a + length])

    trio.run(run)


async def test_cow_never_modifies_the_gold_image(blk_server: tuple[Path, Path]) -> None:
    store, d = blk_server
    before = hashlib.sha256((d / "gold.img").read_bytes()).hexdigest()
    async with open_blk("storage-node/cow", host_store=store) as disk:
        await disk.write(8192, b"\xee" * 65536)
        await disk.flush()
        assert await disk.read(8192, 65536) == b"\xee" * 65536
        REFERENCE["cow"][8192 : 8192 + 65536] = b"\xee" * 65536
    assert hashlib.sha256((d / "gold.img").read_bytes()).hexdigest() == before


async def test_errors_are_typed(blk_server: tuple[Path, Path]) -> None:
    store, _ = blk_server
    async with open_blk("storage-node/memory", host_store=store) as disk:
        with pytest.raises(DiskError) as exc:
            await disk.read(SIZE - 10, 11)
        assert exc.value.errno == 22
        with pytest.raises(LocalProtocolError):
            await disk.write(1, b"x" * 512)
    with pytest.raises(Exception, match="no disk named 'nope'"):
        async with open_blk("storage-node/nope", host_store=store):
            pass
    with pytest.raises(ServiceNotFound):
        async with open_blk("elsewhere/memory", host_store=store):
            pass


async def test_flushed_file_write_survives_kill9(tmp_path: Path, store: Path,
                                                 peers: list[Peer]) -> None:
    img = tmp_path / "disk.img"
    server = Peer("blk_server.py", str(store), "durable", f"file:d0:{img}:{1 << 20}")
    peers.append(server)
    await trio.to_thread.run_sync(server.expect, "ready")
    payload = os.urandom(128 * 1024)
    async with open_blk("durable/d0", host_store=store) as disk:
        await disk.write(65536, payload)
        await disk.flush()
        os.kill(server.proc.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(server.proc.wait)
    assert img.read_bytes()[65536 : 65536 + len(payload)] == payload


# --- hostile frontend ------------------------------------------------------


async def _raw(disk: BlkDisk, fill: object) -> int:
    """Submit one hand-made request through a disk's ring; return the status."""
    from meshlink.disk.blk import front as blk

    slot = disk._free.popleft()
    req = disk._reqs[slot]
    ffi.memmove(req, bytes(112), 112)
    req.id = slot
    fill(req)  # type: ignore[operator]
    disk._state[slot] = blk._INFLIGHT
    disk._inflight += 1
    lib.ml_blk_front_put(disk._front, req)
    if lib.ml_blk_front_push(disk._front):
        disk._bell.ring()
    with trio.fail_after(5):
        status = await disk._wait(slot)
    disk._release(slot)
    return status


def _seg(req: object, i: int, gref: int, first: int, last: int) -> None:
    s = req.seg[i]  # type: ignore[attr-defined]
    s.gref, s.first_sect, s.last_sect = gref, first, last


async def test_hostile_requests_get_error_responses(blk_server: tuple[Path, Path]) -> None:
    store, _ = blk_server
    async with open_blk("storage-node/memory", host_store=store) as disk:
        good = disk._pool // 4096

        def too_many_segments(r: object) -> None:
            r.operation, r.nr_segments = 0, 200  # type: ignore[attr-defined]
            for i in range(11):
                _seg(r, i, good + i, 0, 7)

        def reversed_sectors(r: object) -> None:
            r.operation, r.nr_segments = 0, 1  # type: ignore[attr-defined]
            _seg(r, 0, good, 5, 2)

        def sector_beyond_page(r: object) -> None:
            r.operation, r.nr_segments = 1, 1  # type: ignore[attr-defined]
            _seg(r, 0, good, 0, 8)

        def bad_gref(r: object) -> None:
            r.operation, r.nr_segments = 0, 1  # type: ignore[attr-defined]
            _seg(r, 0, 0xFFFFFFF0, 0, 7)

        def ring_page_gref(r: object) -> None:
            r.operation, r.nr_segments = 1, 1  # type: ignore[attr-defined]
            _seg(r, 0, 0, 0, 7)  # grant 0 is the ring itself, not a data page

        def past_the_end(r: object) -> None:
            r.operation, r.nr_segments = 0, 1  # type: ignore[attr-defined]
            r.sector_number = SIZE // 512 - 4  # type: ignore[attr-defined]
            _seg(r, 0, good, 0, 7)

        def huge_sector(r: object) -> None:
            r.operation, r.nr_segments = 0, 1  # type: ignore[attr-defined]
            r.sector_number = 2**64 - 1  # type: ignore[attr-defined]
            _seg(r, 0, good, 0, 7)

        def discard_overflow(r: object) -> None:
            d = ffi.cast("struct ml_blk_request_discard *", r)
            d.operation, d.sector_number, d.nr_sectors = 5, 8, 2**64 - 4

        def unknown_op(r: object) -> None:
            r.operation = 42  # type: ignore[attr-defined]

        def indirect_no_segments(r: object) -> None:
            r.operation = 6  # type: ignore[attr-defined]

        def indirect_too_many(r: object) -> None:
            ind = ffi.cast("struct ml_blk_request_indirect *", r)
            ind.operation, ind.indirect_op, ind.nr_segments = 6, 0, 4096
            for i in range(8):
                ind.indirect_grefs[i] = good + i

        def indirect_bad_page(r: object) -> None:
            ind = ffi.cast("struct ml_blk_request_indirect *", r)
            ind.operation, ind.indirect_op, ind.nr_segments = 6, 0, 20
            ind.indirect_grefs[0] = 0xFFFFFF00

        def indirect_bad_inner_op(r: object) -> None:
            ind = ffi.cast("struct ml_blk_request_indirect *", r)
            ind.operation, ind.indirect_op, ind.nr_segments = 6, 3, 1
            ind.indirect_grefs[0] = good

        def indirect_page_with_bad_segment(r: object) -> None:
            # A valid indirect page whose listed segment points outside the pool.
            at = good * 4096  # byte offset of that page in the shared memory
            disk._mm[at : at + 8] = (0xFFFFFFF0).to_bytes(4, "little") + bytes([0, 7, 0, 0])
            ind = ffi.cast("struct ml_blk_request_indirect *", r)
            ind.operation, ind.indirect_op, ind.nr_segments = 6, 1, 1
            ind.indirect_grefs[0] = good

        for bad in (too_many_segments, reversed_sectors, sector_beyond_page, bad_gref,
                    ring_page_gref, past_the_end, huge_sector, discard_overflow,
                    indirect_no_segments, indirect_too_many, indirect_bad_page,
                    indirect_bad_inner_op, indirect_page_with_bad_segment):
            assert await _raw(disk, bad) == lib.ML_BLK_RSP_ERROR, bad.__name__
        assert await _raw(disk, unknown_op) == lib.ML_BLK_RSP_EOPNOTSUPP
        # The ring still works after all of that.
        await disk.write(0, b"\x42" * 4096)
        assert await disk.read(0, 4096) == b"\x42" * 4096
        REFERENCE["memory"][0:4096] = b"\x42" * 4096


async def test_garbage_ring_indices_drop_only_that_client(blk_server: tuple[Path, Path]) -> None:
    store, _ = blk_server
    async with open_blk("storage-node/memory", host_store=store) as victim:
        async with open_blk("storage-node/memory", host_store=store) as hostile:
            hostile._mm[0:4] = (123456789).to_bytes(4, "little")  # req_prod far ahead
            hostile._bell.ring()
            # The server hangs up on it.  Wait for that without touching the
            # ring (a new request would republish a sane req_prod): a waiter
            # on a slot that was never pushed is failed when the peer goes.
            from meshlink.disk.blk import front as blk

            slot = hostile._free.popleft()
            hostile._state[slot] = blk._INFLIGHT
            with trio.fail_after(5), pytest.raises(ConnectionLost):
                await hostile._wait(slot)
        # ...while another client of the same server is unaffected.
        await victim.write(4096, b"\x17" * 512)
        assert await victim.read(4096, 512) == b"\x17" * 512
        REFERENCE["memory"][4096:4608] = b"\x17" * 512


async def test_cancelled_requests_do_not_leak_ring_slots(blk_server: tuple[Path, Path]) -> None:
    store, _ = blk_server
    async with open_blk("storage-node/null", host_store=store) as disk:
        for deadline in (0, 0.0005, 0.002):
            with trio.move_on_after(deadline):
                async with trio.open_nursery() as nursery:
                    for i in range(3 * disk.ring_entries):
                        nursery.start_soon(disk.read, i * 4096, 4096)
                    nursery.start_soon(disk.read, 0, 1 << 20)
        # Responses to the abandoned requests arrive before this one's, and
        # each hands its slot back.
        assert await disk.read(0, 4096) == bytes(4096)
        assert len(disk._free) == disk.ring_entries


@pytest.mark.parametrize("kind", ["memory", "mmap", "null"])
async def test_large_pipelined_io(blk_server: tuple[Path, Path], kind: str) -> None:
    """Multi-megabyte I/O is split into indirect requests, pipelined, reassembled."""
    store, _ = blk_server
    data = os.urandom(3 << 20)
    async with open_blk(f"storage-node/{kind}", host_store=store) as disk:
        await disk.write(512, data)
        expect = bytes(len(data)) if kind == "null" else data
        assert await disk.read(512, len(data)) == expect
        buf = bytearray(len(data))
        await disk.readinto(512, buf)
        assert buf == expect
        if kind != "null":
            REFERENCE[kind][512 : 512 + len(data)] = data


async def test_disk_open_and_serve_pick_the_front_end(store: Path, tmp_path: Path) -> None:
    """meshlink.disk.serve exports over both front ends; open picks by address."""
    from meshlink import disk as mdisk

    sock = tmp_path / "nbd.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: mdisk.serve(
            {"disk0": mdisk.MemoryBackend(1 << 20)}, f"unix:{sock}", service="both",
            host_store=store, task_status=task_status))
        async with mdisk.open("both/disk0", host_store=store) as local:
            assert isinstance(local, BlkDisk)
            await local.write(0, b"\x33" * 4096)
        async with mdisk.open(f"nbd+unix:///disk0?socket={sock}") as remote:
            assert not isinstance(remote, BlkDisk)
            assert await remote.read(0, 4096) == b"\x33" * 4096
        nursery.cancel_scope.cancel()


async def test_native_loop_serves_a_memory_disk_and_marks_its_chunks(store: Path) -> None:
    """The mapped memory disk is served by the C loop, whose writes show in its extents."""
    from meshlink.disk import MemoryBackend
    from meshlink.disk.backends import STATE_HOLE, STATE_ZERO
    from meshlink.disk.blk import serve_blk
    from meshlink.disk.counters import DiskStats

    disk = MemoryBackend(16 << 20)
    if not disk.mapped:
        pytest.skip("no lazily allocated anonymous mapping here (not Linux)")
    stats = DiskStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_blk(
            "mapped", {"d": disk}, host_store=store, stats=stats, task_status=task_status))
        async with open_blk("mapped/d", host_store=store) as front:
            await front.write((5 << 20) + 512, b"\x7e" * 4096)  # inside chunk 80
            await front.write(8 << 20, b"\x11" * (128 << 10))  # chunks 128 and 129
            assert await front.read((5 << 20) + 512, 4096) == b"\x7e" * 4096
            live = [c for c in stats._live if c.key == ("d", "blk")]
            assert len(live) == 1 and live[0].native is not None  # the C loop served it
        nursery.cancel_scope.cancel()
    hole = STATE_HOLE | STATE_ZERO
    assert disk.extents(0, 16 << 20) == [
        (5 << 20, hole), (64 << 10, 0), ((8 << 20) - (5 << 20) - (64 << 10), hole),
        (128 << 10, 0), ((16 << 20) - (8 << 20) - (128 << 10), hole)]
    assert disk.allocated_bytes == 3 * (64 << 10)
    assert bytes(disk.read(8 << 20, 128 << 10)) == b"\x11" * (128 << 10)


async def test_barrier_and_flush_are_acknowledged_in_order(blk_server: tuple[Path, Path]) -> None:
    """WRITE_BARRIER (no data) and FLUSH_DISKCACHE complete after the writes before them."""
    store, d = blk_server
    async with open_blk("storage-node/file", host_store=store) as disk:
        assert disk.features["barrier"] and disk.features["flush"]
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(disk.write, i * 65536, bytes([i + 1]) * 65536)
        await disk.barrier()
        await disk.flush()
        image = (d / "file.img").read_bytes()
        for i in range(8):
            assert image[i * 65536 : (i + 1) * 65536] == bytes([i + 1]) * 65536
            REFERENCE["file"][i * 65536 : (i + 1) * 65536] = bytes([i + 1]) * 65536


def test_backend_maps_only_a_sealed_memfd_of_the_announced_size() -> None:
    """The grant provider refuses frontend memory that could shrink or is mis-sized."""
    from meshlink.disk.blk.ring import BackRing, FrontRing
    from meshlink.errors import HandshakeError

    front = FrontRing(0, 4)
    try:
        with pytest.raises(HandshakeError):
            BackRing(front.memfd, 0, 5, 8, False)  # one page more than shared
        back = BackRing(front.memfd, 0, 4, 8, False)
        back.close()
    finally:
        front.close()
    unsealed = os.memfd_create("unsealed")
    try:
        os.ftruncate(unsealed, 5 * 4096)
        with pytest.raises(HandshakeError):
            BackRing(unsealed, 0, 4, 8, False)
    finally:
        os.close(unsealed)
