"""Helpers for the NBD tests: spawn our server as a real process, wait until ready.

Synchronisation is by the server's ``ready <uri>`` line on stdout, never by
sleeping.  Every process is registered for cleanup before anything can fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVE = [sys.executable, "-m", "meshlink.disk", "serve"]


def need(*tools: str) -> None:
    """Skip the test if a tool is missing (CI installs them all)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


@dataclass
class Server:
    """A running ``meshlink.disk serve`` process."""

    proc: subprocess.Popen[bytes]
    uri: str
    socket: str | None
    port: int | None

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far (call after it exited)."""
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


@contextlib.contextmanager
def nbd_server(tmp: Path, name: str = "disk", backend: str = "memory", *,
               size: str | None = "64M", extra: Sequence[str] = (), tcp: bool = False,
               path: Path | None = None) -> Iterator[Server]:
    """Run our NBD server on a fresh Unix socket (or a free TCP port); yield when ready."""
    args = [*SERVE, name, "--backend", backend, "--nbd"]
    if size is not None:
        args += ["--size", size]
    if path is not None:
        args += ["--path", str(path)]
    sock: str | None = None
    if tcp:
        args += ["--listen", "127.0.0.1:0"]
    else:
        sock = str(tmp / f"{name}-{os.getpid()}-{len(os.listdir(tmp))}.sock")
        args += ["--listen", f"unix:{sock}"]
    args += list(extra)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("ready "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"server did not start: {line!r} {err.decode()}")
        uri = line.split(None, 1)[1].strip()
        port = int(uri.rsplit(":", 1)[1].split("/")[0]) if tcp else None
        yield Server(proc, uri, sock, port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run(args: Sequence[str], *, timeout: float = 120, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool, capture text output, fail with its stderr on error."""
    proc = subprocess.run(list(args), capture_output=True, timeout=timeout, input=input)
    result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                         proc.stdout.decode(errors="replace"),
                                         proc.stderr.decode(errors="replace"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def random_image(path: Path, size: int, *, seed: bytes = b"img", holes: bool = True) -> Path:
    """A file of ``size`` bytes: pseudo-random data with zero holes every other MiB."""
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, mib)):
            if holes and i % 2:
                continue
            f.seek(off)
            f.write(hashlib.shake_256(seed + off.to_bytes(8, "big")).digest(min(mib,
                                                                                   size - off)))
    return path
