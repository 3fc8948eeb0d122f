"""The ``disk serve`` / ``disk info`` command line: help, exit codes, stdio mode."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

from meshlink.cli.disk import add_disk_commands, parse_size
from meshlink.disk.nbd import wire as c
from meshlink.disk.nbd.client_transmission import Reply
from tests.helpers.nbd import SERVE, RawClient, nbd_server, run

DISK = [sys.executable, "-m", "meshlink.disk"]


def test_help_and_usage_errors() -> None:
    assert run([*DISK, "--help"]).returncode == 0
    assert "--backend" in run([*SERVE, "--help"]).stdout
    bad = run([*SERVE, "x", "--backend", "tape", "--nbd"], check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = run([*SERVE, "x", "--backend", "memory", "--nbd"], check=False)
    assert missing.returncode == 2 and "needs a size" in missing.stderr
    # The blk ring is the default front end; --blk only adds it to --nbd.
    blk_alone = run([*SERVE, "x", "--backend", "null", "--size", "1M", "--blk"], check=False)
    assert blk_alone.returncode == 1 and "--nbd" in blk_alone.stderr
    no_file = run([*SERVE, "x", "--backend", "file", "--path", "/nonexistent/x", "--nbd"],
                  check=False)
    assert no_file.returncode == 1 and "error:" in no_file.stderr


def test_address_in_use_is_exit_1(tmp_path: Path) -> None:
    with nbd_server(tmp_path, "a") as srv:
        assert srv.socket is not None
        again = run([*SERVE, "b", "--backend", "null", "--size", "1M", "--nbd",
                     "--listen", f"unix:{srv.socket}"], check=False)
    assert again.returncode == 1 and "already listening" in again.stderr


def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    with nbd_server(tmp_path, "t") as srv:
        srv.proc.terminate()
        assert srv.proc.wait(timeout=30) == 0


def test_stdio_mode_serves_one_client() -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([*SERVE, "s", "--backend", "memory", "--size", "1M", "--nbd",
                             "--stdio"], stdin=theirs, stdout=theirs)
    theirs.close()
    try:
        client = RawClient(ours)
        client.greet()
        client.go("s")
        client.request(c.CMD_WRITE, 0, 5, payload=b"hello")
        assert isinstance(reply := client.reply(), Reply) and reply.error == 0
        client.request(c.CMD_READ, 0, 5)
        assert isinstance(reply := client.reply(), Reply) and reply.data == b"hello"
        client.request(c.CMD_DISC)
        assert proc.wait(timeout=30) == 0  # one client, then exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ours.close()


def test_info_command(tmp_path: Path) -> None:
    with nbd_server(tmp_path, "inf", size="2M", extra=["--read-only"]) as srv:
        out = run([*DISK, "info", "--json", srv.uri]).stdout
    assert '"size": 2097152' in out and '"read_only": true' in out
    bad = run([*DISK, "info", "nbd+unix:///x?socket=/nonexistent.sock"], check=False)
    assert bad.returncode == 1 and "error:" in bad.stderr


def test_add_disk_commands_registers_under_a_parent() -> None:
    parser = argparse.ArgumentParser(prog="meshlink")
    add_disk_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["disk", "serve", "n", "--backend", "null", "--size", "1G",
                              "--nbd", "--listen", "unix:/tmp/x.sock"])
    assert args.size == 1 << 30 and callable(args.func)
    assert parse_size("64k") == 65536 and parse_size("2GiB") == 2 << 30
