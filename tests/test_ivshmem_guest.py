"""ivshmem with real guests: TCG QEMU guests running the static C peer.

Each test boots Debian's kernel with a generated busybox initramfs
(tests/helpers/ivshmem_guest.py) and an ivshmem-plain device over a host
file.  Slow (a TCG boot takes seconds), so marked ``slow``; skipped with the
reason when QEMU, a static busybox or a kernel is missing (``.ci/run``
installs them).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from meshlink import ConnectionLost
from meshlink.transport.vchan.ivshmem import IvshmemRegion, connect_ivshmem, open_ivshmem_listener

from .helpers.ivshmem_guest import Guest, build_guest_files, missing

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing() is not None,
                                                   reason=missing() or "")]
REGION_SIZE = 16 << 20


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest_files(tmp_path_factory.mktemp("guest"))


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for g in started:
        g.kill()


async def expect(guest: Guest, prefix: str, within: float = 120) -> str:
    return await trio.to_thread.run_sync(guest.expect, prefix, within)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while data := await stream.receive_some():
        got += data
    return bytes(got)


async def test_guest_host_both_directions_after_hostile_header(
        tmp_path: Path, initramfs: Path, guests: list[Guest]) -> None:
    region_path = tmp_path / "region"
    IvshmemRegion.create(region_path, "kvm-host-1", size=REGION_SIZE).close()
    # A hostile header first: the guest's peer must refuse it, not crash.
    with open(region_path, "r+b") as f:
        f.write(struct.pack("<Q", 0x4141414141414141))
    guest = Guest(initramfs, region_path, [
        ["auto", "probe", "-", "-"],
        ["auto", "connect", "h2g", "recv"],
        ["auto", "listen", "g2h", "send", str(6 << 20)],
    ])
    guests.append(guest)
    line = await expect(guest, "IVSPEER ERROR open")
    assert "bad header" in line
    await expect(guest, "IVSPEER EXIT 1")

    region = IvshmemRegion.create(region_path, "kvm-host-1", size=REGION_SIZE)
    listener = await open_ivshmem_listener(region, "h2g")
    stream = await listener.accept()
    assert stream.transport_details["host_id"] == "kvm-host-1"
    data = os.urandom(8 << 20)
    await stream.send_all(data)
    await stream.send_eof()
    assert await expect(guest, "IVSPEER RECV") == f"IVSPEER RECV {len(data)} {zlib.crc32(data):08x}"
    await stream.aclose()
    await listener.aclose()

    stream = await connect_ivshmem(region, "g2h", wait=60, expect_host_id="kvm-host-1")
    got = await read_all(stream)
    assert len(got) == 6 << 20
    assert await expect(guest, "IVSPEER SENT") == f"IVSPEER SENT {len(got)} {zlib.crc32(got):08x}"
    await stream.aclose()
    await expect(guest, "IVSGUEST DONE")
    assert await trio.to_thread.run_sync(guest.wait) == 0
    region.close()


async def test_guest_killed_mid_transfer(tmp_path: Path, initramfs: Path,
                                         guests: list[Guest]) -> None:
    region_path = tmp_path / "region"
    region = IvshmemRegion.create(region_path, "kvm-host-1", size=REGION_SIZE)
    guest = Guest(initramfs, region_path, [["auto", "listen", "kill", "send", str(1 << 40)]])
    guests.append(guest)
    stream = await connect_ivshmem(region, "kill", wait=120)
    received = 0
    while received < (4 << 20):
        received += len(await stream.receive_some())
    guest.kill()
    killed = time.monotonic()
    with pytest.raises(ConnectionLost):
        with trio.fail_after(2):
            while await stream.receive_some():
                pass
    assert time.monotonic() - killed < 1.0
    await stream.aclose()
    region.close()


async def test_guest_to_guest_both_directions(tmp_path: Path, initramfs: Path,
                                              guests: list[Guest]) -> None:
    region_path = tmp_path / "region"
    IvshmemRegion.create(region_path, "kvm-host-1", size=REGION_SIZE).close()
    a = Guest(initramfs, region_path, [["auto", "listen", "a2b", "send", str(5 << 20)],
                                       ["auto", "connect", "b2a", "recv"]])
    b = Guest(initramfs, region_path, [["auto", "connect", "a2b", "recv"],
                                       ["auto", "listen", "b2a", "send", str(3 << 20)]])
    guests += [a, b]
    sent = await expect(a, "IVSPEER SENT", 180)
    got = await expect(b, "IVSPEER RECV", 180)
    assert sent.split()[2:] == got.split()[2:] and sent.split()[2] == str(5 << 20)
    sent = await expect(b, "IVSPEER SENT", 180)
    got = await expect(a, "IVSPEER RECV", 180)
    assert sent.split()[2:] == got.split()[2:] and sent.split()[2] == str(3 << 20)
    for g in (a, b):
        await expect(g, "IVSGUEST DONE")
