"""``meshlink disk serve`` driven by a harness: ``--pidfile``, ``--exit-with-parent``, start-up.

Real processes throughout: the server is the ``meshlink`` command, the
harness a helper process killed with SIGKILL; readiness is the pidfile
appearing, as a harness would wait for it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resolver import HostStore, blk_entry_name

HELPERS = Path(__file__).parent / "helpers"

#: Modules the blk ring and plain NBD never need: trio (the trio-free path
#: serves them, see meshlink/disk/syncserve.py), zeroconf (with its asyncio
#: and attrs users), the bus and its msgpack, the dialer, the NBD client;
#: and two stdlib modules that cost start-up 5-8 ms together (dataclasses with
#: the inspect module it loads, json), which the serving path does not need.
NOT_FOR_SERVING = ("trio", "zeroconf", "meshlink.bus", "msgpack", "meshlink.session",
                   "meshlink.transport.dial", "meshlink.transport.vchan",
                   "meshlink.disk.nbd.client", "resolver._resolver", "resolver.dnssrv",
                   "cryptography", "dataclasses", "inspect", "json")


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshlink.cli", "disk", "serve", *args]


def wait_for_file(path: Path, proc: subprocess.Popen[str] | None = None,
                  timeout: float = 30) -> None:
    """Wait until ``path`` exists (a harness's readiness check); fail if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) before writing {path}: "
                                 f"{proc.communicate()[1]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.005)


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit (pidfd); True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def test_pidfile_holds_the_pid_once_ready_and_goes_on_exit(
        store: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    pidfile = tmp_path / "serve.pid"
    proc = subprocess.Popen(serve_cmd("node/disk0", "--backend", "memory", "--size", "1M",
                                      "--host-store", str(store), "--pidfile", str(pidfile)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    wait_for_file(pidfile, proc)
    assert pidfile.read_text() == f"{proc.pid}\n"
    # Ready means serving: the service is live in the host store already.
    assert HostStore(store).is_live(blk_entry_name("node"))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not pidfile.exists()
    assert not HostStore(store).is_live(blk_entry_name("node"))


def test_pidfile_over_nbd_replaces_a_stale_one(
        tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    pidfile = tmp_path / "nbd.pid"
    pidfile.write_text("999999\n")  # left by a server that crashed
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(serve_cmd("export", "--backend", "memory", "--size", "1M", "--nbd",
                                      "--listen", f"unix:{sock}", "-f", "-P", str(pidfile)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("ready nbd+unix:///export")
    deadline = time.monotonic() + 30
    # Replaced atomically: one read sees the old pid or the new one, never a mix
    # (one read per turn: the file may change between two).
    while (text := pidfile.read_text()) != f"{proc.pid}\n":
        assert text == "999999\n"
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    assert sock.exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not pidfile.exists()


def test_symlinked_pidfile_is_refused(store: Path, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    link = tmp_path / "serve.pid"
    link.symlink_to(target)
    out = subprocess.run(serve_cmd("node/disk0", "--backend", "memory", "--size", "1M",
                                   "--host-store", str(store), "--pidfile", str(link)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: --pidfile") and "symbolic link" in out.stderr
    assert target.read_text() == "precious\n" and link.is_symlink()
    assert not HostStore(store).is_live(blk_entry_name("node"))  # refused before serving


def test_pidfile_in_a_missing_directory_is_refused(store: Path, tmp_path: Path) -> None:
    out = subprocess.run(serve_cmd("node/disk0", "--backend", "memory", "--size", "1M",
                                   "--host-store", str(store),
                                   "--pidfile", str(tmp_path / "nowhere" / "p.pid")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "error: --pidfile" in out.stderr, out.stderr


@pytest.mark.parametrize("front", ["blk", "nbd"])
def test_exit_with_parent_withdraws_the_service(
        store: Path, tmp_path: Path, procs: list[subprocess.Popen[str]], front: str) -> None:
    pidfile = tmp_path / "serve.pid"
    where = (["node/disk0", "--host-store", str(store)] if front == "blk" else
             ["export", "--nbd", "--listen", f"unix:{tmp_path / 'nbd.sock'}"])
    parent = subprocess.Popen(
        [sys.executable, str(HELPERS / "disk_parent.py"), *where, "--backend", "memory",
         "--size", "1M", "--pidfile", str(pidfile), "--exit-with-parent"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(parent)
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    try:
        wait_for_file(pidfile, parent)
        assert pidfile.read_text() == f"{server_pid}\n"
        if front == "blk":
            assert HostStore(store).is_live(blk_entry_name("node"))
        parent.kill()  # SIGKILL: the parent gets no chance to stop its child
        parent.wait(timeout=10)
        assert wait_exit(server_pid, timeout=20), "the server outlived its parent"
    finally:
        if not wait_exit(server_pid, 0):
            os.kill(server_pid, signal.SIGKILL)
    assert not HostStore(store).is_live(blk_entry_name("node"))
    assert not (store / "node.blk.sock").exists()
    assert not pidfile.exists()


def test_serving_loads_no_zeroconf_bus_or_client(store: Path, tmp_path: Path) -> None:
    """The start-up guard: what ``disk serve`` imports with the default options and NBD."""
    runs = {
        "blk": ("node/disk0", "--backend", "memory", "--size", "1M", "--host-store", str(store)),
        "nbd": ("export", "--backend", "memory", "--size", "1M", "--nbd", "--listen",
                f"unix:{tmp_path / 'nbd.sock'}"),
    }
    env = {k: v for k, v in os.environ.items() if k != "MESHLINK_ZEROCONF"}
    for label, args in runs.items():
        pidfile = tmp_path / f"{label}.pid"
        modules = tmp_path / f"{label}.modules"
        proc = subprocess.Popen([sys.executable, str(HELPERS / "disk_modules.py"), str(modules),
                                 "disk", "serve", *args, "--pidfile", str(pidfile)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env)
        try:
            wait_for_file(pidfile, proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, proc.communicate()[1]
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        loaded = modules.read_text().split()
        assert "meshlink.disk.backends.memory" in loaded  # it did serve, in this process
        unwanted = [m for m in loaded if m.startswith(NOT_FOR_SERVING)]
        assert unwanted == [], f"disk serve ({label}) imported {unwanted}"
