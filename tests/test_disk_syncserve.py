"""``meshlink disk serve``'s trio-free path: real clients, no trio, the same harness options.

Each server is the ``meshlink`` command in a process of its own.  The module
guard runs the command in-process through ``helpers/disk_modules.py``, which
writes every module loaded once the command exited, so it sees what serving
real clients imported, not only start-up.  Readiness is the pidfile or the
``ready`` line, never a sleep.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from resolver import HostStore, blk_entry_name

from .helpers.nbd import need, run
from .test_disk_daemon import HELPERS, serve_cmd, wait_for_file

CLI = [sys.executable, "-m", "meshlink.cli", "disk"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MESHLINK_ZEROCONF", "MESHLINK_DISK_SERVE_TRIO")}
    env.update(extra)
    return env


def _serve_and_list_modules(tmp_path: Path, label: str, args: list[str], use: list[list[str]],
                            env: dict[str, str]) -> tuple[list[str], str]:
    """Serve ``args`` (``-v``) in a process that records its modules; run each ``use``
    command against it once ready; stop it with SIGTERM (exit 0); the modules it
    loaded and its stderr."""
    pidfile, modules = tmp_path / f"{label}.pid", tmp_path / f"{label}.modules"
    proc = subprocess.Popen([sys.executable, str(HELPERS / "disk_modules.py"), str(modules),
                             "disk", "serve", *args, "--pidfile", str(pidfile), "-v"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        wait_for_file(pidfile, proc)
        for command in use:
            run(command)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return modules.read_text().split(), err


def test_fast_path_serves_clients_without_trio(store: Path, tmp_path: Path) -> None:
    """blk ring and NBD on a Unix socket: a real client writes and reads back, and
    the server process never imports trio (its own clients, in other processes, do)."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(1 << 20))
    sock = tmp_path / "nbd.sock"
    runs = {
        "blk": (["node/disk0", "--backend", "memory", "--size", "4M", "--host-store",
                 str(store)], "blk://node/disk0", ["--host-store", str(store)]),
        "nbd": (["export", "--backend", "memory", "--size", "4M", "--nbd", "--listen",
                 f"unix:{sock}"], f"nbd+unix:///export?socket={sock}", []),
    }
    for label, (args, url, extra) in runs.items():
        back = tmp_path / f"{label}.back"
        loaded, err = _serve_and_list_modules(
            tmp_path, label, args,
            [[*CLI, "cp", "-q", str(data), url, *extra],
             [*CLI, "cp", "-q", url, str(back), *extra]], _env())
        assert back.read_bytes()[:1 << 20] == data.read_bytes(), label
        assert "meshlink.disk.syncserve" in loaded, label  # the fast path served it
        assert "trio" not in loaded, f"disk serve ({label}) imported trio"
        assert "serving on trio" not in err, err


@pytest.mark.parametrize("why", ["forced", "file backend on the blk ring"])
def test_what_the_fast_path_does_not_serve_runs_on_trio(
        store: Path, tmp_path: Path, why: str) -> None:
    """The fallback: the same command, served by trio, and it still serves."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(1 << 16))
    if why == "forced":
        args = ["node/disk0", "--backend", "memory", "--size", "1M"]
        env = _env(MESHLINK_DISK_SERVE_TRIO="1")
    else:
        args = ["node/disk0", "--backend", "file", "--path", str(tmp_path / "f.img"),
                "--size", "1M"]
        env = _env()
    loaded, err = _serve_and_list_modules(
        tmp_path, "trio", [*args, "--host-store", str(store)],
        [[*CLI, "cp", "-q", str(data), "blk://node/disk0", "--host-store", str(store)]], env)
    assert "trio" in loaded and "meshlink.disk.blk.back" in loaded
    assert "serving on trio: " in err, err


def test_fast_path_with_nbd_tools_over_tcp_and_unix(
        tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """nbdinfo sees the export over TCP; qemu-io writes, reads back and verifies over Unix."""
    need("nbdinfo", "qemu-io")
    sock = tmp_path / "nbd.sock"
    tcp = subprocess.Popen(serve_cmd("tcpdisk", "--backend", "memory", "--size", "8M", "--nbd",
                                     "--listen", "127.0.0.1:0", "--description", "fast"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=_env())
    unix = subprocess.Popen(serve_cmd("unixdisk", "--backend", "memory", "--size", "8M",
                                      "--nbd", "--listen", f"unix:{sock}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    procs += [tcp, unix]
    assert tcp.stdout is not None and unix.stdout is not None
    tcp_uri = tcp.stdout.readline().split()[1]
    assert tcp_uri.startswith("nbd://127.0.0.1:") and tcp_uri.endswith("/tcpdisk")
    info = run(["nbdinfo", tcp_uri]).stdout
    assert "export-size: 8388608" in info and "fast" in info, info
    assert unix.stdout.readline().startswith("ready nbd+unix:///unixdisk")
    uri = f"nbd+unix:///unixdisk?socket={sock}"
    out = run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c",
               "read -P 0x5a 1M 64k", "-c", "read -P 0 0 64k", "-c", "flush", uri]).stdout
    assert "Pattern verification failed" not in out and "wrote 65536/65536" in out, out
    for proc in (tcp, unix):
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop too
        assert proc.wait(timeout=20) == 0, proc.communicate()[1]


def test_fast_path_blk_refuses_a_second_server_and_a_bad_hello(
        store: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """The same refusals as on trio: a name in use exits 1 with the same message; a
    client that sends garbage is refused without disturbing the server."""
    import socket

    pidfile = tmp_path / "serve.pid"
    proc = subprocess.Popen(serve_cmd("node/disk0", "--backend", "null", "--size", "1M",
                                      "--host-store", str(store), "--pidfile", str(pidfile)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    procs.append(proc)
    wait_for_file(pidfile, proc)
    second = subprocess.run(serve_cmd("node/disk1", "--backend", "null", "--size", "1M",
                                      "--host-store", str(store)),
                            capture_output=True, text=True, timeout=60, env=_env())
    assert second.returncode == 1
    assert second.stderr.startswith("error: cannot serve 'node' over the blk ring:"), \
        second.stderr
    with socket.socket(socket.AF_UNIX) as bad:
        bad.connect(str(store / "node.blk.sock"))
        bad.sendall(struct.pack(">I", 7) + b"garbage")  # framed, but not JSON
        bad.settimeout(30)
        reply = b""
        while chunk := bad.recv(4096):  # the refusal, then EOF: the server hung up
            reply += chunk
    assert b'"ok": false' in reply.replace(b'"ok":false', b'"ok": false'), reply
    info = run([*CLI, "info", "node/disk0", "--host-store", str(store)]).stdout
    assert "size: 1048576" in info
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not HostStore(store).is_live(blk_entry_name("node"))


def test_tls_choices_are_the_handshake_modes() -> None:
    from meshlink.cli.disk import TLS_MODES
    from meshlink.disk.nbd.server_handshake import TLSMode

    assert TLS_MODES == tuple(m.value for m in TLSMode)


def test_fast_path_blk_drops_a_silent_client_and_serves_others_meanwhile(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the trio-free blk server with a 1 s hello timeout.  A client that
    never says hello does not hold up another one, and is dropped in time."""
    import socket
    import threading
    import time

    import trio

    from meshlink.disk.backends import open_backend
    from meshlink.disk.blk import back_sync, open_blk
    from meshlink.disk.syncserve import SyncServer

    timeout = 1.0
    monkeypatch.setattr(back_sync, "HANDSHAKE_TIMEOUT", timeout)
    server = SyncServer()
    disk = open_backend("memory", size=1 << 20)
    back_sync.serve_blk_sync(server, "node", {"disk0": disk}, host_store=store)
    runner = threading.Thread(target=server.run)
    runner.start()
    try:
        with socket.socket(socket.AF_UNIX) as silent:
            silent.connect(str(store / "node.blk.sock"))
            started = time.monotonic()

            async def use() -> bytes:
                async with open_blk("node/disk0", host_store=store) as d:
                    await d.write(4096, b"x" * 4096)
                    return await d.read(4096, 4096)

            assert trio.run(use) == b"x" * 4096
            assert time.monotonic() - started < timeout  # not queued behind the silent one
            silent.settimeout(timeout * 10)
            assert silent.recv(1) == b""  # dropped: EOF, no reply
            assert time.monotonic() - started < timeout * 10
    finally:
        server.stop()
        runner.join(timeout=30)
        server.close()
        disk.close()
    assert not runner.is_alive()
    assert not HostStore(store).is_live(blk_entry_name("node"))  # withdrawn on stop


def test_fast_path_blk_stop_does_not_wait_for_the_ring_to_idle(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C loop must see a stop while it is busy, not only when it is about
    to sleep.  It used to look at the stop pipe only before sleeping, which a
    client that never lets the ring idle for 50 us (the spin) postpones for
    ever: ``stop()`` then waited out its whole join deadline (5 s).  Here the
    spin is made longer than the test, which stands for such a client."""
    import threading
    import time

    import trio

    from meshlink.disk import syncserve
    from meshlink.disk.backends import open_backend
    from meshlink.disk.blk import back_conn, back_sync, open_blk
    from meshlink.disk.syncserve import SyncServer

    monkeypatch.setattr(back_conn, "SPIN_SECONDS", 60.0)
    server = SyncServer()
    disk = open_backend("memory", size=1 << 20)
    back_sync.serve_blk_sync(server, "node", {"disk0": disk}, host_store=store)
    runner = threading.Thread(target=server.run)
    runner.start()
    stop_took = None
    try:
        async def use_then_stop() -> float:
            async with open_blk("node/disk0", host_store=store) as d:
                await d.write(0, b"x" * 4096)  # the server's loop now spins
                started = time.monotonic()
                server.stop()
                # run() returns once it has joined the connection threads.
                await trio.to_thread.run_sync(runner.join, 30)
                return time.monotonic() - started

        stop_took = trio.run(use_then_stop)
    finally:
        if stop_took is None:
            server.stop()
        runner.join(timeout=30)
        server.close()
        disk.close()
    assert not runner.is_alive()
    # Well under the join deadline: the loop saw the stop within a millisecond.
    assert stop_took < syncserve._JOIN_SECONDS / 2, stop_took


def test_fast_path_turns_nagle_off_on_tcp_connections() -> None:
    """Small replies (16-byte write acknowledgements) must not wait behind Nagle's
    algorithm: TCP connections get TCP_NODELAY, as on the trio path."""
    import queue
    import socket
    import threading

    from meshlink.disk.syncserve import SyncServer

    seen: queue.Queue[tuple[int, int]] = queue.Queue()

    def handler(conn: socket.socket) -> None:
        seen.put((conn.family, conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        conn.close()

    server = SyncServer()
    tcp = socket.create_server(("127.0.0.1", 0))
    server.add_listener(tcp, handler)
    runner = threading.Thread(target=server.run)
    runner.start()
    try:
        with socket.create_connection(tcp.getsockname()):
            family, nodelay = seen.get(timeout=30)
        assert family == socket.AF_INET and nodelay != 0
    finally:
        server.stop()
        runner.join(timeout=30)
        server.close()
    assert not runner.is_alive()
