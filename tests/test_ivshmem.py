"""ivshmem provider on one host: a region file shared by processes.

A host file mapped by two processes is the same thing a guest sees through
BAR2, so these tests exercise the provider, the static C peer and the hostile
header without QEMU (tests/test_ivshmem_guest.py boots real guests).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from meshlink import ConnectionLost, ProviderUnavailable, RingCorruptError, ServiceNotFound
from meshlink._native import lib
from meshlink.errors import LocalProtocolError, TransportError
from meshlink.transport.vchan.ivshmem import (
    DEAD_AFTER,
    IvshmemRegion,
    connect_ivshmem,
    open_ivshmem_listener,
)

from .conftest import HELPERS
from .helpers.ivshmem_build import build_peer

# Layout facts (docs/vchan.md section 10), used to play a hostile party.
HEADER = struct.Struct("<QIIQQQ64s")
ENTRY_OFF, ENTRY_SIZE = 128, 128


def entry(i: int, field: int) -> int:
    return ENTRY_OFF + ENTRY_SIZE * i + field


@pytest.fixture
def region_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "region"


@pytest.fixture(scope="module")
def c_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("peer") / "ivshmem_peer"
    try:
        return build_peer(out, static=False)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def py_peer(region: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HELPERS / "ivshmem_peer.py"), str(region),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_json(proc: subprocess.Popen[str]) -> dict[str, int]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while data := await stream.receive_some():
        got += data
    return bytes(got)


def test_region_header_roundtrip(region_path: Path) -> None:
    with IvshmemRegion.create(region_path, "host-a", size=1 << 20, nslots=4) as r:
        assert (r.host_id, r.size, r.nslots) == ("host-a", 1 << 20, 4)
        assert r.max_ring >= 65536
    with IvshmemRegion.open(region_path) as r2:
        assert r2.host_id == "host-a"
        assert [r2.slot_state(i) for i in range(4)] == [lib.ML_IVSHMEM_FREE] * 4


@pytest.mark.parametrize("direction", ["to_peer", "from_peer"])
async def test_python_processes_both_directions(region_path: Path, direction: str) -> None:
    region = IvshmemRegion.create(region_path, "host-a")
    data = os.urandom(3 << 20)
    if direction == "to_peer":
        listener = await open_ivshmem_listener(region, "svc")
        proc = py_peer(region_path, "connect", "svc", "recv")
        stream = await listener.accept()
        assert stream.transport_details["notify"] == "poll"
        await stream.send_all(data)
        await stream.send_eof()
        result = await trio.to_thread.run_sync(last_json, proc)
        assert result == {"bytes": len(data), "crc": zlib.crc32(data)}
        await stream.aclose()
        await listener.aclose()
    else:
        proc = py_peer(region_path, "listen", "svc", "send", str(len(data)))
        stream = await connect_ivshmem(region, "svc", wait=10, expect_host_id="host-a")
        got = await read_all(stream)
        result = await trio.to_thread.run_sync(last_json, proc)
        assert result == {"bytes": len(got), "crc": zlib.crc32(got)} and len(got) == len(data)
        await stream.aclose()
    # Both ends left: every slot is free again.
    assert {region.slot_state(i) for i in range(region.nslots)} == {lib.ML_IVSHMEM_FREE}
    region.close()


async def test_static_peer_both_directions(region_path: Path, c_peer: Path) -> None:
    region = IvshmemRegion.create(region_path, "host-a")
    data = os.urandom(5 << 20)
    listener = await open_ivshmem_listener(region, "in")
    recv = subprocess.Popen([str(c_peer), str(region_path), "connect", "in", "recv"],
                            stdout=subprocess.PIPE, text=True)
    stream = await listener.accept()
    await stream.send_all(data)
    await stream.send_eof()
    out, _ = await trio.to_thread.run_sync(recv.communicate)
    assert f"IVSPEER RECV {len(data)} {zlib.crc32(data):08x}" in out
    await stream.aclose()
    await listener.aclose()

    send = subprocess.Popen([str(c_peer), str(region_path), "listen", "out", "send", "4000000"],
                            stdout=subprocess.PIPE, text=True)
    stream = await connect_ivshmem(region, "out", wait=10)
    got = await read_all(stream)
    out, _ = await trio.to_thread.run_sync(send.communicate)
    assert len(got) == 4000000
    assert f"IVSPEER SENT {len(got)} {zlib.crc32(got):08x}" in out
    await stream.aclose()
    region.close()


@pytest.mark.parametrize("side", ["reader", "writer"])
async def test_peer_killed_mid_transfer(region_path: Path, side: str) -> None:
    region = IvshmemRegion.create(region_path, "host-a")
    listener = await open_ivshmem_listener(region, "svc")
    mode = ["send", "-1"] if side == "reader" else ["echo"]
    proc = py_peer(region_path, "connect", "svc", *mode)
    try:
        stream = await listener.accept()
        if side == "reader":
            assert await stream.receive_some()
        else:
            # The echo peer reads our bytes and writes them back: we never read,
            # so it soon blocks writing while we keep sending.
            with trio.move_on_after(0.5):
                while True:
                    await stream.send_all(b"x" * 65536)
        proc.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(proc.wait)
        killed = time.monotonic()
        with pytest.raises(ConnectionLost):
            with trio.fail_after(1):
                if side == "reader":
                    while await stream.receive_some():
                        pass
                else:
                    while True:
                        await stream.send_all(b"x" * 65536)
        assert time.monotonic() - killed <= max(1.0, DEAD_AFTER + 0.3)
        await stream.aclose()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        await listener.aclose()
    # The survivor freed the dead peer's slot.
    assert region.slot_state(0) == lib.ML_IVSHMEM_FREE
    region.close()


async def test_clean_close_is_eof_and_ring_survives_many_connections(region_path: Path) -> None:
    region = IvshmemRegion.create(region_path, "host-a", size=1 << 20, nslots=2)
    listener = await open_ivshmem_listener(region, "svc", ring_size=4096)
    for i in range(5):  # slots are given back and reused
        client = await connect_ivshmem(region, "svc")
        server = await listener.accept()
        await client.send_all(b"hello %d" % i)
        await client.aclose()
        assert await read_all(server) == b"hello %d" % i
        await server.aclose()
    await listener.aclose()
    region.close()


async def test_bad_names_are_refused_before_touching_the_region(region_path: Path) -> None:
    with pytest.raises(LocalProtocolError):
        IvshmemRegion.create(region_path, "host a")
    region = IvshmemRegion.create(region_path, "host-a", size=1 << 20, nslots=2)
    for bad in ("", "with space", "caf\u00e9", "x" * 64):
        with pytest.raises(LocalProtocolError):
            await open_ivshmem_listener(region, bad)
        with pytest.raises(LocalProtocolError):
            await connect_ivshmem(region, bad)
    assert {region.slot_state(i) for i in range(2)} == {lib.ML_IVSHMEM_FREE}
    region.close()


async def test_no_listener_full_table_and_wrong_host(region_path: Path) -> None:
    region = IvshmemRegion.create(region_path, "host-a", size=1 << 20, nslots=2)
    with pytest.raises(ServiceNotFound):
        await connect_ivshmem(region, "nobody")
    with pytest.raises(ProviderUnavailable):
        await connect_ivshmem(region, "nobody", expect_host_id="host-b")
    a = await open_ivshmem_listener(region, "a", ring_size=4096)
    b = await open_ivshmem_listener(region, "b", ring_size=4096)
    with pytest.raises(TransportError, match="No space"):
        await open_ivshmem_listener(region, "c", ring_size=4096)
    await a.aclose()
    await b.aclose()
    region.close()


def _stamp(path: Path, offset: int, fmt: str, *values: object) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


HOSTILE_HEADERS = {
    "magic": (0, "<Q", 0x4141414141414141),
    "version": (8, "<I", 2),
    "no slots": (12, "<I", 0),
    "too many slots": (12, "<I", 17),
    "region size": (16, "<Q", 1 << 40),
    "slot size unaligned": (24, "<Q", 4097),
    "slots past the end": (24, "<Q", 1 << 30),
    "slots offset": (32, "<Q", 0),
    "host id unterminated": (40, "<64s", b"h" * 64),
    "host id unprintable": (40, "<64s", b"host\x07id"),
    "host id empty": (40, "<64s", b""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_header_refused(region_path: Path, case: str, c_peer: Path) -> None:
    IvshmemRegion.create(region_path, "host-a", size=1 << 20).close()
    _stamp(region_path, *HOSTILE_HEADERS[case])
    with pytest.raises(RingCorruptError):
        IvshmemRegion.open(region_path)
    out = subprocess.run([str(c_peer), str(region_path), "probe", "-", "-"],
                         capture_output=True, text=True, timeout=30).stdout
    assert "IVSPEER ERROR open" in out and "bad header" in out


def test_region_smaller_than_a_header_is_refused(region_path: Path) -> None:
    region_path.write_bytes(b"\0" * 4096)
    with pytest.raises(RingCorruptError):
        IvshmemRegion.open(region_path)


HOSTILE_SLOTS = {
    "ctrl outside its slot": (16, "<Q", 4096 * 200),
    "ctrl unaligned": (16, "<Q", 4096 + 8),
    "ring over ctrl": (24, "<Q", 4096),
    "ring past slot": (32, "<Q", (1 << 20) - 4096),
    "orders unlike ctrl page": (12, "<HH", 13, 13),
    "orders invalid": (12, "<HH", 30, 12),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SLOTS))
async def test_hostile_slot_refused(region_path: Path, case: str) -> None:
    # A listener with 64 KiB rings in slot 0; a hostile party rewrites the entry.
    region = IvshmemRegion.create(region_path, "host-a", size=1 << 20, nslots=2)
    listener = await open_ivshmem_listener(region, "svc", ring_size=65536)
    off, fmt, *values = HOSTILE_SLOTS[case]
    _stamp(region_path, entry(0, off), fmt, *values)
    with pytest.raises(RingCorruptError):
        await connect_ivshmem(region, "svc")
    # The unusable slot was given back, not left claimed.
    assert region.slot_state(0) == lib.ML_IVSHMEM_FREE
    await listener.aclose()
    region.close()


async def test_header_rewritten_after_open_is_not_reread(region_path: Path) -> None:
    region = IvshmemRegion.create(region_path, "host-a", size=1 << 20, nslots=2)
    _stamp(region_path, 12, "<I", 16)       # claim 16 slots in a 1 MiB region
    _stamp(region_path, 24, "<Q", 1 << 30)  # each 1 GiB
    listener = await open_ivshmem_listener(region, "svc", ring_size=65536)
    client = await connect_ivshmem(region, "svc")
    server = await listener.accept()
    await client.send_all(b"still fine")
    await client.send_eof()
    assert await read_all(server) == b"still fine"
    await client.aclose()
    await server.aclose()
    await listener.aclose()
    region.close()
