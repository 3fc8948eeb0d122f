"""Every NBD client gets bounded time, connections and memory on the real server.

Each test runs ``meshlink.disk serve --nbd`` as a process, attacks it over
real Unix sockets, and checks both the bound and that well-behaved clients
are still served.  Memory is measured from outside (``/proc/PID/status``),
so nothing in the server is mocked.
"""

from __future__ import annotations

import resource
import socket
import struct
import time
from pathlib import Path

import pytest

from meshlink.disk.nbd import wire as c
from meshlink.disk.nbd.client_transmission import Reply
from tests.helpers.nbd import (
    RawClient,
    Server,
    fd_count,
    nbd_server,
    threads_in_writev,
    vm_rss,
    wait_for,
)

MIB = 1 << 20


def _connect(srv: Server) -> socket.socket:
    assert srv.socket is not None
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(srv.socket)
    return sock


def _eof_within(sock: socket.socket, seconds: float) -> float:
    """Read until EOF (failing after ``seconds``); return how long it took."""
    start = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(4096):
        pass
    return time.monotonic() - start


def _serves(srv: Server, client: RawClient | None = None) -> None:
    """A client (fresh unless given) writes and reads back."""
    assert srv.socket is not None
    if client is None:
        client = RawClient(srv.socket)
        client.greet()
        client.go("disk")
    client.request(c.CMD_WRITE, 4096, 5, payload=b"alive")
    reply = client.reply()
    assert isinstance(reply, Reply) and reply.error == 0
    client.request(c.CMD_READ, 4096, 5)
    reply = client.reply()
    assert isinstance(reply, Reply) and reply.data == b"alive"


# --- 1. handshake timeout ----------------------------------------------------------------


def test_silent_and_stalled_handshakes_time_out_while_others_are_served(
        tmp_path: Path) -> None:
    with nbd_server(tmp_path, "disk", size="8M", extra=["--handshake-timeout", "0.5"]) as srv:
        silent = _connect(srv)  # connects, never says a word
        stalled = RawClient(_connect(srv))
        stalled.greet()
        stalled.sock.sendall(struct.pack(">QI", 0x49484156454F5054, c.OPT_GO))  # half a header
        good = RawClient(_connect(srv))
        good.greet()
        good.go("disk")
        _serves(srv, good)  # served while the other two hang
        assert _eof_within(silent, 10) < 10
        assert _eof_within(stalled.sock, 10) < 10
        # The deadline covers the handshake only: an idle client in transmission stays.
        _serves(srv, good)
        for s in (silent, stalled.sock, good.sock):
            s.close()
        _serves(srv)
        assert srv.proc.poll() is None


def test_default_handshake_timeout_is_ten_seconds() -> None:
    from meshlink.disk.nbd import NBDServer

    server = NBDServer()
    assert server._handshake_timeout == 10.0  # the documented default
    with pytest.raises(ValueError):
        NBDServer(handshake_timeout=0)


# --- 2. connection limit -----------------------------------------------------------------


def test_connections_beyond_the_limit_are_closed_at_once(tmp_path: Path) -> None:
    limits = ["--max-connections", "3", "--handshake-timeout", "120"]
    with nbd_server(tmp_path, "disk", size="8M", extra=limits) as srv:
        held = [RawClient(_connect(srv)) for _ in range(3)]
        for client in held:
            client.greet()  # all three were accepted and greeted
        refused = [_connect(srv) for _ in range(20)]
        for sock in refused:
            assert _eof_within(sock, 10) < 10  # closed without a greeting
            sock.close()
        for client in held:  # the admitted ones are unaffected
            client.go("disk")
            _serves(srv, client)
        held.pop().close()
        # The slot comes back once the server has seen that connection end.
        wait_for(lambda: _greets(srv), "a free connection slot")
        for client in held:
            client.close()
        srv.proc.terminate()
        srv.proc.wait(timeout=10)
        log = srv.stderr_text()
        assert log.count("refusing a connection") == 1, log  # rate-limited


def _greets(srv: Server) -> bool:
    sock = _connect(srv)
    try:
        return len(sock.recv(18)) > 0
    finally:
        sock.close()


# --- 3. reply bytes in flight ------------------------------------------------------------


def _pipeline_reads(srv: Server, count: int, length: int) -> RawClient:
    """Send ``count`` READs of ``length`` bytes at once and never read a reply."""
    assert srv.socket is not None
    client = RawClient(srv.socket)
    client.greet()
    client.go("disk")
    headers = b"".join(client.request(c.CMD_READ, (i % 4) * length, length, send=False)[1]
                       for i in range(count))
    client.sock.sendall(headers)
    return client


def test_unread_replies_do_not_pin_memory(tmp_path: Path) -> None:
    # The file backend allocates a fresh buffer per READ, as most real backends do.
    with nbd_server(tmp_path, "disk", "file", size="128M",
                    path=tmp_path / "disk.img") as srv:
        pid = srv.proc.pid
        baseline = vm_rss(pid)
        client = _pipeline_reads(srv, 40, 32 * MIB)  # 1.25 GiB of replies if all queued
        # Blocked in writev = it has queued everything it is going to queue.
        wait_for(lambda: threads_in_writev(pid) > 0, "the server to block on the full socket")
        grown = vm_rss(pid) - baseline
        assert grown < 300 * MIB, f"server RSS grew by {grown >> 20} MiB"
        client.close()
        _serves(srv)


def test_dropped_connections_free_their_buffers(tmp_path: Path) -> None:
    """Buffers die with their connection (no cycle keeps them for the collector)."""
    with nbd_server(tmp_path, "disk", "file", size="128M",
                    path=tmp_path / "disk.img") as srv:
        pid = srv.proc.pid
        base_fds = fd_count(pid)
        _serves(srv)
        wait_for(lambda: fd_count(pid) == base_fds, "the first connection to close")
        baseline = vm_rss(pid)
        for _ in range(8):
            # Three 32 MiB replies queued, then the client vanishes: writev fails
            # with EPIPE and the exception passes through the frames holding them.
            client = _pipeline_reads(srv, 3, 32 * MIB)
            wait_for(lambda: threads_in_writev(pid) > 0, "the server to block")
            client.close()
            wait_for(lambda: fd_count(pid) == base_fds, "the server to drop the connection")
        grown = vm_rss(pid) - baseline
        assert grown < 200 * MIB, f"server RSS grew by {grown >> 20} MiB over 8 connections"
        _serves(srv)


# --- 4. running out of file descriptors ----------------------------------------------


def test_accept_survives_emfile_and_recovers(tmp_path: Path) -> None:
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    limits = ["--max-connections", "1000", "--handshake-timeout", "120"]
    with nbd_server(tmp_path, "disk", size="8M", preexec_fn=low_fd_limit, extra=limits) as srv:
        pid = srv.proc.pid
        free = 40 - fd_count(pid)
        assert free > 2, "the server needs more descriptors than this test allows"
        held = [_connect(srv) for _ in range(free)]
        for sock in held:  # every one of these got a descriptor and a greeting
            assert len(sock.recv(18)) > 0
        waiting = [_connect(srv) for _ in range(5)]  # in the backlog: accept hits EMFILE
        assert srv.proc.stderr is not None
        line = srv.proc.stderr.readline().decode()  # blocks until the server logs
        assert "cannot accept a connection" in line and "Too many open files" in line, line
        assert srv.proc.poll() is None
        # Backing off, not spinning: over a second of EMFILE, little CPU.
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        waiting[0].settimeout(1.0)
        with pytest.raises(TimeoutError):
            waiting[0].recv(1)  # still no descriptor for it
        used = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        assert used < 0.5, f"server used {used:.0%} of a core while out of descriptors"
        for sock in held:
            sock.close()
        for sock in waiting:  # served as soon as descriptors are back (backoff <= 1 s)
            sock.settimeout(10)
            assert len(sock.recv(18)) > 0
            sock.close()
        _serves(srv)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime in clock ticks


# --- 5. offset + length past 2^63 - 1 --------------------------------------------------


def test_offsets_that_overflow_64_bits_are_rejected(tmp_path: Path) -> None:
    with nbd_server(tmp_path, "disk", size="8M") as srv:
        assert srv.socket is not None
        client = RawClient(srv.socket)
        client.greet()
        client.go("disk")
        cases = [
            (c.CMD_READ, (1 << 64) - 512, 1024, c.EINVAL),  # wraps to 512 in u64 arithmetic
            (c.CMD_READ, (1 << 63) - 1, 2, c.EINVAL),  # crosses 2^63 - 1 (off_t)
            (c.CMD_WRITE_ZEROES, (1 << 64) - 4096, 8192, c.ENOSPC),
            (c.CMD_TRIM, (1 << 63), 4096, c.EINVAL),
            (c.CMD_BLOCK_STATUS, (1 << 64) - 1, 1, c.EINVAL),
        ]
        for cmd, offset, length, err in cases:
            client.request(cmd, offset, length)
            reply = client.reply()
            assert isinstance(reply, Reply), reply
            assert reply.error == err, (cmd, offset, length, reply.error, reply.message)
        _serves(srv, client)
