"""Hostile and dying peers: typed errors within 1 s, never a hang, no data loss."""

from __future__ import annotations

import array
import hashlib
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from meshlink import ConnectionLost, RingCorruptError
from meshlink._native import ffi, lib
from meshlink.transport.vchan import connect_vchan, open_vchan_listener

from .conftest import HELPERS, Peer


@pytest.mark.parametrize("mode", ["prod", "order", "live"])
async def test_hostile_client_corrupting_reader_side(store: Path, mode: str) -> None:
    listener = await open_vchan_listener("victim", host_store=store)
    proc = subprocess.Popen([sys.executable, str(HELPERS / "vchan_hostile.py"), str(store),
                             "victim", mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        stream = await listener.accept()
        with trio.fail_after(1):
            with pytest.raises(RingCorruptError):
                while await stream.receive_some():
                    pass
        # The error is sticky: the stream never returns to reading garbage.
        with pytest.raises(RingCorruptError):
            await stream.receive_some()
        await stream.aclose()
    finally:
        proc.kill()
        proc.wait()
        await listener.aclose()


async def test_hostile_client_corrupting_writer_side(store: Path) -> None:
    listener = await open_vchan_listener("victim", host_store=store, write_min=65536)
    proc = subprocess.Popen([sys.executable, str(HELPERS / "vchan_hostile.py"), str(store),
                             "victim", "cons"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        stream = await listener.accept()
        assert proc.stdout is not None
        await trio.to_thread.run_sync(proc.stdout.readline)
        with trio.fail_after(1):
            with pytest.raises(RingCorruptError):
                while True:
                    await stream.send_all(b"x" * 4096)
        await stream.aclose()
    finally:
        proc.kill()
        proc.wait()
        await listener.aclose()


async def _fake_server(
    store: Path, page_setup: str, seal: bool, *, task_status: trio.TaskStatus[None]
) -> None:
    """Serve one client a hand-made memfd, as a hostile server would."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(store / "evil.sock"))
    sock.listen(1)
    task_status.started()
    conn, _ = await sock.accept()
    await conn.recv(4096)
    fd = os.memfd_create("evil", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4 * 4096)
    page = mmap.mmap(fd, 4096)
    if page_setup == "order":
        lib.ml_vchan_ctrl_init(ffi.from_buffer(page), 12, 13, ffi.new("uint32_t[]", [1, 2, 3]), 3)
        struct.pack_into("<H", page, 18, 25)
    elif page_setup == "grant":
        lib.ml_vchan_ctrl_init(ffi.from_buffer(page), 12, 13, ffi.new("uint32_t[]", [1, 2, 99]), 3)
    else:
        lib.ml_vchan_ctrl_init(ffi.from_buffer(page), 12, 13, ffi.new("uint32_t[]", [1, 2, 3]), 3)
    if seal:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    e1, e2 = os.eventfd(0), os.eventfd(0)
    body = json.dumps({"ok": True, "ctrl_ref": 0}).encode()
    await conn.sendmsg([struct.pack(">I", len(body)) + body],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd, e1, e2]))])
    await trio.sleep_forever()


@pytest.mark.parametrize(("setup", "seal"), [("order", True), ("grant", True), ("ok", False)])
async def test_hostile_server_page_is_refused(store: Path, setup: str, seal: bool) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_fake_server, store, setup, seal)
        with trio.fail_after(1), pytest.raises(RingCorruptError):
            await connect_vchan("evil", host_store=store)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("victim", ["serve", "connect"])
async def test_kill9_of_writer_mid_transfer(store: Path, peers: list[Peer], victim: str) -> None:
    """The peer is SIGKILLed while holding the stream open: the survivor's
    receive raises ConnectionLost (after draining what was written) within 1 s."""
    if victim == "serve":
        writer = Peer("vchan_peer.py", "serve", str(store), "k9", "--send", str(8 << 20),
                      "--hold")
        peers.append(writer)
        await trio.to_thread.run_sync(writer.expect, "ready")
        stream = await connect_vchan("k9", host_store=store)
    else:
        listener = await open_vchan_listener("k9", host_store=store)
        writer = Peer("vchan_peer.py", "connect", str(store), "k9", "--send", str(8 << 20),
                      "--hold")
        peers.append(writer)
        stream = await listener.accept()
        await listener.aclose()
    got = 0
    data = await stream.receive_some()  # mid-transfer: some data has arrived
    got += len(data)
    os.kill(writer.proc.pid, signal.SIGKILL)
    with trio.fail_after(1):
        with pytest.raises(ConnectionLost):
            while True:
                data = await stream.receive_some()
                assert data, "a crash must not look like a clean EOF"
                got += len(data)
    assert 0 < got <= 8 << 20
    await stream.aclose()


async def test_kill9_of_reader_breaks_writer(store: Path, peers: list[Peer]) -> None:
    listener = await open_vchan_listener("k9r", host_store=store)
    # A peer that never reads (it sends nothing and waits for our EOF).
    reader = Peer("vchan_peer.py", "connect", str(store), "k9r", "--send", "0", "--hold")
    peers.append(reader)
    stream = await listener.accept()
    await listener.aclose()
    await trio.to_thread.run_sync(reader.expect, "connected")
    reader.proc.send_signal(signal.SIGSTOP)
    # Fill the ring: the stopped peer consumes nothing.
    with trio.move_on_after(0.5):
        while True:
            await stream.send_all(b"y" * 65536)
    os.kill(reader.proc.pid, signal.SIGKILL)
    with trio.fail_after(1), pytest.raises(ConnectionLost):
        while True:
            await stream.send_all(b"y" * 65536)
    await stream.aclose()


async def test_everything_written_before_close_is_read(store: Path, peers: list[Peer]) -> None:
    """The writer sends, closes and exits at once; we still read every byte."""
    size = 1 << 20  # fits the ring, so the writer can finish without us reading
    listener = await open_vchan_listener("flush", host_store=store, read_min=size)
    writer = Peer("vchan_peer.py", "connect", str(store), "flush", "--send", str(size),
                  "--write-min", str(size))
    peers.append(writer)
    stream = await listener.accept()
    await listener.aclose()
    await stream.send_eof()
    # Let the writer fill the ring, close and exit before we read anything.
    result = await trio.to_thread.run_sync(writer.result, 30)
    assert writer.proc.returncode == 0
    h = hashlib.sha256()
    n = 0
    with trio.fail_after(10):
        while data := await stream.receive_some():
            h.update(data)
            n += len(data)
    assert n == size == result["sent"]
    assert h.hexdigest() == result["sent_sha"]
    await stream.aclose()
