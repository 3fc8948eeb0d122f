"""``meshlink disk serve|info|cp`` over the blk ring, as a user runs them."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def disk_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "meshlink.disk", *args],
                         capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture
def served(store: Path) -> object:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlink.disk", "serve", "storage-node/disk0", "--backend",
         "memory", "--size", "16M", "--host-store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready blk://storage-node/disk0"), proc.stderr.read()
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0  # a clean stop withdraws the service
    assert not (store / "storage-node.blk.sock").exists()


def test_info(served: object, store: Path) -> None:
    out = disk_cli("info", "storage-node/disk0", "--host-store", str(store))
    assert "size: 16777216" in out.stdout
    assert "transport: blk ring" in out.stdout


def test_cp_both_ways_with_progress(served: object, store: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 << 20))
    up = disk_cli("cp", str(src), "blk://storage-node/disk0", "--host-store", str(store),
                  "--block-size", "1M")
    assert "100.0%" in up.stderr and "MiB/s" in up.stderr
    back = tmp_path / "back.img"
    disk_cli("cp", "storage-node/disk0", str(back), "--host-store", str(store))
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_errors_exit_1_with_message(store: Path, tmp_path: Path) -> None:
    out = disk_cli("info", "nowhere/disk0", "--host-store", str(store), check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("error:") and "no live blk service" in out.stderr
    missing = disk_cli("cp", str(tmp_path / "missing.img"), str(tmp_path / "x.img"),
                       check=False)
    assert missing.returncode == 1 and "error:" in missing.stderr


def test_usage_errors_exit_2() -> None:
    out = disk_cli("serve", "x", check=False)
    assert out.returncode == 2 and "--backend" in out.stderr
    assert disk_cli("--help").stdout.count("cp") >= 1
