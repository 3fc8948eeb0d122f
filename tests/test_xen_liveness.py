"""Crash told from close on Xen (over the emulated Xen, tests/xenemu): a peer
whose domain dies (kill -9 of the domain's only process) gives ConnectionLost
within 1 s, through the @releaseDomain watch and the domain's existence; a
peer that closes gives EOF, also when its domain goes away right after; a
process that dies in a domain that lives on is, as on real Xen, a close."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from meshlink import ConnectionLost
from meshlink.transport.vchan.xen import XenVchanServer, XenVchanStream, connect_xen_vchan

from .xenemu.fixtures import PEER_DOMID, PY_DOMID, XenHost, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]

CLI = [sys.executable, "-m", "meshlink.cli.vchan"]


async def receive_until_lost(stream: XenVchanStream, killed_at: float) -> float:
    """Read until ConnectionLost; return how long after ``killed_at`` it came."""
    with trio.fail_after(10):
        with pytest.raises(ConnectionLost):
            while await stream.receive_some():
                pass
    return time.monotonic() - killed_at


async def test_kill_server_domain_gives_connection_lost(xen_host: XenHost) -> None:
    path = xen_host.path(PEER_DOMID, PY_DOMID)
    peer = xen_host.peer("server", str(PY_DOMID), path, "stream", "--send", "100", "--hold")
    await trio.to_thread.run_sync(peer.expect_ready)
    stream = await connect_xen_vchan(PEER_DOMID, path)
    await trio.to_thread.run_sync(peer.readline_json)
    assert await stream.receive_some() != b""
    killed_at = time.monotonic()
    os.kill(peer.proc.pid, signal.SIGKILL)
    assert await receive_until_lost(stream, killed_at) < 1.0
    with pytest.raises(ConnectionLost):
        await stream.send_all(b"x")
    await stream.aclose()


async def test_kill_client_domain_gives_connection_lost(xen_host: XenHost) -> None:
    path = xen_host.path(PY_DOMID, PEER_DOMID)
    server = await XenVchanServer.publish(PEER_DOMID, path, read_min=4096, write_min=4096)
    peer = xen_host.peer("client", str(PY_DOMID), path, "stream", "--send", "10", "--hold")
    stream = await server.wait_connected()
    await trio.to_thread.run_sync(peer.expect_ready)
    await trio.to_thread.run_sync(peer.readline_json)
    killed_at = time.monotonic()
    os.kill(peer.proc.pid, signal.SIGKILL)
    assert await receive_until_lost(stream, killed_at) < 1.0
    await stream.aclose()


async def test_clean_close_then_domain_gone_is_eof(xen_host: XenHost) -> None:
    path = xen_host.path(PEER_DOMID, PY_DOMID)
    peer = xen_host.peer("server", str(PY_DOMID), path, "stream", "--send", "5000",
                         "--expect", "1", "--write-min", "65536")
    await trio.to_thread.run_sync(peer.expect_ready)
    stream = await connect_xen_vchan(PEER_DOMID, path)
    await stream.send_all(b"!")  # it closes once this is in
    await trio.to_thread.run_sync(peer.result)  # closed, exited: its domain is gone too
    got = 0
    with trio.fail_after(10):
        while data := await stream.receive_some():
            got += len(data)
    assert got == 5000
    await stream.aclose()


async def test_process_crash_in_a_live_domain_reads_as_close(xen_host: XenHost) -> None:
    # Another process keeps domain 2 alive; the killed one's kernel clears
    # its live byte (unmap-notify), which Xen makes look like a close.
    keeper = xen_host.peer("server", str(PY_DOMID), xen_host.path(PEER_DOMID, PY_DOMID),
                           "stream", "--hold")
    await trio.to_thread.run_sync(keeper.expect_ready)
    path = xen_host.path(PEER_DOMID, PY_DOMID)
    peer = xen_host.peer("server", str(PY_DOMID), path, "stream", "--send", "100", "--hold")
    await trio.to_thread.run_sync(peer.expect_ready)
    stream = await connect_xen_vchan(PEER_DOMID, path)
    await trio.to_thread.run_sync(peer.readline_json)
    peer.kill()
    got = 0
    with trio.fail_after(10):
        while data := await stream.receive_some():
            got += len(data)
    assert got == 100
    await stream.aclose()


@pytest.mark.parametrize("victim", ["server", "client"])
def test_kill_either_meshlink_domain(xen_host: XenHost, victim: str) -> None:
    """Two meshlink processes in two domains (the CLI); kill -9 either: the
    other reports the lost connection within 1 s and exits non-zero."""
    procs = {
        "server": subprocess.Popen(
            [*CLI, "server", "--xen", "--domid", "3", "--path", "live"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **xen_host.env(4)}),
        "client": subprocess.Popen(
            [*CLI, "client", "--xen", "--domid", "4", "--path", "live", "--wait", "30"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **xen_host.env(3)}),
    }
    try:
        # A line each way proves both are connected.
        for a, b in (("server", "client"), ("client", "server")):
            stdin, stdout = procs[a].stdin, procs[b].stdout
            assert stdin is not None and stdout is not None
            stdin.write(f"from {a}\n".encode())
            stdin.flush()
            assert stdout.readline() == f"from {a}\n".encode()
        other = procs["client" if victim == "server" else "server"]
        killed_at = time.monotonic()
        procs[victim].kill()
        rc = other.wait(10)
        took = time.monotonic() - killed_at
        err = other.stderr.read().decode() if other.stderr else ""
        assert rc != 0 and "died without closing" in err, (rc, err)
        assert took < 1.0 + 0.5, took  # 1 s to notice, plus interpreter shutdown
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.communicate()
