"""A disk served by one emulated Xen domain and attached from another
(tests/xenemu): the blk ring over grants and event channels behind the vbd
handshake (meshlink/disk/blk/xen.py).  Random I/O against a reference, flush,
discard, the XenStore tree after connect and after close; and the backend
maps nothing but what the frontend granted."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlink import DiskError
from meshlink.disk.blk.xen import open_xen_blk
from meshlink.disk.blk.xenbus import VbdPaths, create_vbd
from meshlink.transport.xenstore import NativeXenStore

from .xenemu.fixtures import XenHost, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]

BACK, FRONT, DEVID = 3, 5, 51712
PATHS = VbdPaths(BACK, FRONT, DEVID)
SIZE = 4 << 20

BACKEND_CODE = f"""
import sys, trio
from meshlink.disk.backends import open_backend
from meshlink.disk.blk.xen import serve_xen_blk

async def main():
    disk = open_backend("memory", size={SIZE})
    again = sys.argv[1:] == ["again"]
    async with trio.open_nursery() as n:
        await n.start(lambda task_status: serve_xen_blk(disk, {FRONT}, {DEVID}, reattach=again,
                                                        task_status=task_status))
        print("ready", flush=True)
    print("closed", flush=True)

trio.run(main)
"""


def start_backend(xen_host: XenHost, monkeypatch: pytest.MonkeyPatch,
                  *args: str) -> subprocess.Popen[str]:
    # The frontend's domain exists before the toolstack gives it a device
    # (in the emulation a domain lives while one of its processes does: this one).
    monkeypatch.setenv("XENEMU_DOMID", str(FRONT))
    NativeXenStore().close()
    monkeypatch.setenv("XENEMU_DOMID", "0")
    with NativeXenStore() as dom0:
        create_vbd(dom0, PATHS)
    proc = subprocess.Popen([sys.executable, "-c", BACKEND_CODE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **xen_host.env(BACK)})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise AssertionError(proc.communicate(timeout=30)[1])
    monkeypatch.setenv("XENEMU_DOMID", str(FRONT))
    return proc


@pytest.fixture
def xen_disk(xen_host: XenHost, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[str]]:
    proc = start_backend(xen_host, monkeypatch)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def xen_disk_again(xen_host: XenHost,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[str]]:
    proc = start_backend(xen_host, monkeypatch, "again")
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


# Reference contents, carried across hypothesis examples like the disk is
# (the backend serves one attach after another).
REFERENCE = bytearray(SIZE)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("w"), st.integers(0, SIZE // 512 - 1), st.integers(1, 300),
                  st.integers(0, 255)),
        st.tuples(st.just("r"), st.integers(0, SIZE - 1), st.integers(1, 200_000),
                  st.just(0)),
        st.tuples(st.just("d"), st.integers(0, SIZE // 512 - 1), st.integers(1, 64),
                  st.just(0)),
        st.tuples(st.just("f"), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1, max_size=10,
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=ops)
def test_hypothesis_io_against_a_reference(xen_disk_again: subprocess.Popen[str],
                                           script: list[tuple[str, int, int, int]]) -> None:
    ref = REFERENCE

    async def run() -> None:
        with trio.fail_after(60):
            async with open_xen_blk(BACK, DEVID) as disk:
                for op, a, b, fill in script:
                    if op == "w":
                        count = min(b, SIZE // 512 - a)
                        data = bytes([fill]) * (count * 512)
                        await disk.write(a * 512, data)
                        ref[a * 512 : a * 512 + len(data)] = data
                    elif op == "r":
                        length = min(b, SIZE - a)
                        assert await disk.read(a, length) == bytes(ref[a : a + length])
                    elif op == "d":
                        count = min(b, SIZE // 512 - a)
                        await disk.discard(a * 512, count * 512)
                        ref[a * 512 : (a + count) * 512] = bytes(count * 512)
                    else:
                        await disk.flush()

    trio.run(run)


def state_of(path: str) -> str:
    with NativeXenStore() as xs:
        return xs.read(0, f"{path}/state")


@pytest.mark.parametrize("order", [0, 2, 4])
async def test_random_io_flush_discard_and_the_tree(xen_disk: subprocess.Popen[str],
                                                    order: int) -> None:
    ref = bytearray(SIZE)
    rng = random.Random(16)
    with trio.fail_after(120):
        async with open_xen_blk(BACK, DEVID, ring_order=order) as disk:
            assert disk.size == SIZE and not disk.read_only
            assert disk.ring_entries == 32 << order
            assert state_of(PATHS.backend) == state_of(PATHS.frontend) == "4"
            with NativeXenStore() as xs:
                assert xs.read(0, f"{PATHS.backend}/sectors") == str(SIZE // 512)
                if order == 0:
                    assert xs.read(0, f"{PATHS.frontend}/ring-ref").isdigit()
                else:  # multi-page: ring-page-order and ring-ref0..
                    assert xs.read(0, f"{PATHS.frontend}/ring-page-order") == str(order)
                    refs = [int(xs.read(0, f"{PATHS.frontend}/ring-ref{i}"))
                            for i in range(1 << order)]
                    assert refs == list(range(refs[0], refs[0] + (1 << order)))
            # Many requests in flight at once: more than one page of ring.
            async with trio.open_nursery() as n:
                for k in range(64):
                    n.start_soon(disk.write, k * 4096, bytes([k]) * 4096)
            for k in range(64):
                ref[k * 4096 : (k + 1) * 4096] = bytes([k]) * 4096
            for _ in range(150):
                kind = rng.random()
                if kind < 0.45:
                    sector = rng.randrange(SIZE // 512)
                    count = min(rng.choice((1, 7, 8, 88, 89, 300)), SIZE // 512 - sector)
                    data = rng.randbytes(count * 512)
                    await disk.write(sector * 512, data)
                    ref[sector * 512 : sector * 512 + len(data)] = data
                elif kind < 0.9:
                    off = rng.randrange(SIZE)
                    length = min(rng.choice((1, 511, 4096, 45056, 45057, 200_000)), SIZE - off)
                    assert await disk.read(off, length) == bytes(ref[off : off + length])
                elif kind < 0.95:
                    await disk.flush()
                else:
                    sector = rng.randrange(SIZE // 512 - 64)
                    await disk.discard(sector * 512, 64 * 512)
                    ref[sector * 512 : sector * 512 + 64 * 512] = bytes(64 * 512)
            await disk.barrier()
            assert await disk.read(0, SIZE) == bytes(ref)
            with pytest.raises(DiskError):
                await disk.read(SIZE - 1, 2)
    # After close: both ends Closed, the backend's loop ended.
    assert state_of(PATHS.backend) == state_of(PATHS.frontend) == "6"
    out, err = xen_disk.communicate(timeout=30)
    assert xen_disk.returncode == 0 and out.strip() == "closed", err


async def test_backend_refuses_pages_not_granted_to_it(xen_disk: subprocess.Popen[str]) -> None:
    from meshlink._native import ffi, lib

    async with open_xen_blk(BACK, DEVID) as disk:
        # Hand-craft a READ naming a ref the frontend never granted: the
        # backend cannot map it and answers ERROR; the ring goes on.
        ring = disk._ring
        req = ring.new_request()
        rc = lib.ml_blk_front_submit(ring.ptr, req, 0, 0, 0, 512, 7, ffi.NULL, 0)
        assert rc >= 0
        disk._free.remove(0)
        disk._state[0] = 1  # in flight
        disk._inflight += 1
        if rc:
            disk._bell.ring()
        with trio.fail_after(30):
            status = await disk._wait(0)
        assert status == -1
        disk._release(0)
        # INDIRECT is not offered over Xen: answered EOPNOTSUPP, not read.
        page = ffi.cast("uint8_t *", ffi.from_buffer(ring.memory)) + 4096 * 5
        rc = lib.ml_blk_front_submit(ring.ptr, req, 0, 0, 0, 12 * 4096, ring.ref_base + 1,
                                     page, ring.ref_base + 5)
        assert rc >= 0 and req.operation == 6
        disk._free.remove(0)
        disk._state[0] = 1
        disk._inflight += 1
        if rc:
            disk._bell.ring()
        with trio.fail_after(30):
            assert await disk._wait(0) == -2
        disk._release(0)
        await disk.write(0, b"\x01" * 512)
        assert await disk.read(0, 512) == b"\x01" * 512


def test_cli_serve_xen_and_cp_from_the_frontend_domain(xen_host: XenHost, tmp_path,  # type: ignore[no-untyped-def]
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``meshlink disk serve NAME --xen --frontend-domid D`` in the backend
    domain; ``meshlink disk cp FILE xen://B/DEVID`` in the frontend domain."""
    monkeypatch.setenv("XENEMU_DOMID", str(FRONT))
    NativeXenStore().close()  # the frontend's domain exists (see xen_disk)
    monkeypatch.setenv("XENEMU_DOMID", "0")
    with NativeXenStore() as dom0:
        create_vbd(dom0, PATHS)
    img, src = tmp_path / "disk.img", tmp_path / "src.bin"
    data = random.Random(3).randbytes(1 << 20)
    src.write_bytes(data)
    cli = [sys.executable, "-m", "meshlink.disk"]
    serve = subprocess.Popen(
        [*cli, "serve", "d", "--backend", "file", "--path", str(img), "--size", "1M", "--xen",
         "--frontend-domid", str(FRONT), "--devid", str(DEVID)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **xen_host.env(BACK)})
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert line.startswith(f"ready xen:{PATHS.backend}"), serve.communicate(timeout=30)[1]
        cp = subprocess.run([*cli, "cp", "-q", str(src), f"xen://{BACK}/{DEVID}"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, **xen_host.env(FRONT)})
        assert cp.returncode == 0, cp.stderr
        assert serve.wait(30) == 0  # the frontend closed the device: the backend is done
        assert img.read_bytes() == data
    finally:
        if serve.poll() is None:
            serve.kill()
        serve.communicate()


async def test_backend_domain_killed_gives_connection_lost(
        xen_disk: subprocess.Popen[str]) -> None:
    import time

    from meshlink import ConnectionLost

    with trio.fail_after(30):
        async with open_xen_blk(BACK, DEVID) as disk:
            await disk.write(0, b"\x02" * 4096)
            killed_at = time.monotonic()
            xen_disk.kill()  # the backend domain's only process
            with pytest.raises(ConnectionLost):
                for _ in range(10_000):  # bounded: each read waits for the dead ring
                    await disk.read(0, 4096)
            assert time.monotonic() - killed_at < 1.0


FRONTEND_CODE = f"""
import sys, trio
from meshlink.transport.xenstore import NativeXenStore
from meshlink.disk.blk.xen import open_xen_blk

NativeXenStore().close()  # our domain exists from here on
print("joined", flush=True)
sys.stdin.readline()  # the toolstack created the device

async def main():
    async with open_xen_blk({BACK}, {DEVID}) as disk:
        await disk.write(0, b"x" * 512)
        print("attached", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def test_frontend_domain_killed_ends_the_backend(xen_host: XenHost,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the frontend domain's only process: the backend's loop ends
    with ConnectionLost within 1 s (no Closing ever comes)."""
    import time

    other = VbdPaths(BACK, 6, DEVID)
    fe = subprocess.Popen([sys.executable, "-c", FRONTEND_CODE],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **xen_host.env(6)})
    back = None
    try:
        assert fe.stdin is not None and fe.stdout is not None
        assert fe.stdout.readline().strip() == "joined"
        monkeypatch.setenv("XENEMU_DOMID", "0")
        with NativeXenStore() as dom0:
            create_vbd(dom0, other)
        back = subprocess.Popen(
            [sys.executable, "-c", BACKEND_CODE.replace(f"{FRONT}, {DEVID}", f"6, {DEVID}")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **xen_host.env(BACK)})
        assert back.stdout is not None
        assert back.stdout.readline().strip() == "ready"
        fe.stdin.write("go\n")
        fe.stdin.flush()
        line = fe.stdout.readline().strip()
        assert line == "attached", fe.communicate()[1][-3000:]
        killed_at = time.monotonic()
        fe.kill()
        rc = back.wait(10)
        took = time.monotonic() - killed_at
        err = back.communicate()[1]
        assert rc != 0 and "frontend domain 6 is gone" in err, err
        assert took < 1.0 + 0.5, took  # 1 s to notice, plus interpreter shutdown
    finally:
        for p in (fe, back):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.communicate()
