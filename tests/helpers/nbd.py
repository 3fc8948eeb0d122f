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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
               path: Path | None = None,
               preexec_fn: Callable[[], None] | None = None) -> Iterator[Server]:
    """Run our NBD server on a fresh Unix socket (or a free TCP port); yield when ready.

    ``preexec_fn`` runs in the child before exec (e.g. to lower its rlimits).
    """
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
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec_fn)
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


class RawClient:
    """A blocking NBD client that can also send malformed bytes (for hostile tests).

    It drives our sans-io client core for the well-formed parts, so replies
    are parsed by the same code the real client uses.
    """

    def __init__(self, socket_path: str | Any) -> None:
        import socket

        if isinstance(socket_path, str):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(socket_path)
        else:
            self.sock = socket_path  # an already connected socket
        self.sock.settimeout(30)
        self.tx: object = None

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return out

    def greet(self, flags: int = 3) -> None:
        """Read the greeting and send client flags (fixed newstyle + no zeroes)."""
        import struct

        magic, opt, _ = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == 0x4E42444D41474943 and opt == 0x49484156454F5054
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"", *, magic: int = 0x49484156454F5054,
               length: int | None = None) -> None:
        import struct

        self.sock.sendall(struct.pack(">QII", magic, option,
                                      len(data) if length is None else length) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """Read one option reply: (option, reply type, data)."""
        import struct

        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == 0x3E889045565A9
        return option, rtype, self.recv_exact(length)

    def go(self, name: str = "", *, structured: bool = True) -> int:
        """Negotiate structured replies (+ base:allocation) and GO; return the flags."""
        import struct

        from meshlink.disk.nbd.client_handshake import Negotiated
        from meshlink.disk.nbd.client_transmission import ClientTransmission

        contexts: dict[int, str] = {}
        if structured:
            self.option(8)
            assert self.option_reply()[1] == 1
            raw = name.encode()
            q = b"base:allocation"
            self.option(10, struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(q))
                        + q)
            while True:
                _, rtype, data = self.option_reply()
                if rtype == 1:
                    break
                contexts[struct.unpack(">I", data[:4])[0]] = data[4:].decode()
        raw = name.encode()
        self.option(7, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = -1
        while True:
            _, rtype, data = self.option_reply()
            if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
                _, size, flags = struct.unpack(">HQH", data)
            elif rtype == 1:
                break
            else:
                raise AssertionError(f"GO failed: {rtype:#x} {data!r}")
        self.tx = ClientTransmission(Negotiated(name, size, flags, structured, contexts))
        return flags

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", *, send: bool = True) -> tuple[int, bytes]:
        """Register a request with the core; send header + payload unless told not to."""
        from meshlink.disk.nbd.client_transmission import ClientTransmission

        assert isinstance(self.tx, ClientTransmission)
        cookie, header = self.tx.request(cmd, offset, length, flags)
        if send:
            self.sock.sendall(header + payload)
        return cookie, header

    def reply(self) -> object:
        """Block until the next complete reply (a ``Reply``)."""
        from meshlink.disk.nbd.client_transmission import ClientTransmission
        from meshlink.disk.nbd.sansio import NEED_DATA

        assert isinstance(self.tx, ClientTransmission)
        while True:
            ev = self.tx.next_event()
            if ev is not NEED_DATA:
                return ev
            data = self.sock.recv(1 << 20)
            self.tx.receive_data(data)
            if not data:
                raise EOFError("server closed the connection")


def wait_until_accepting(path: str, proc: subprocess.Popen[bytes] | None = None,
                         timeout: float = 30) -> None:
    """Block until a Unix socket accepts a connection (for servers that print nothing).

    Raises:
        AssertionError: the process exited, or nothing accepted within ``timeout``.
    """
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before accepting")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing accepted on {path}") from None
            # The event we wait for (bind+listen) has no notification; retry on the socket.
            time.sleep(0.01)
        finally:
            probe.close()


# --- looking at a server process from outside (Linux /proc) ----------------------------

#: writev's number in /proc/PID/task/TID/syscall, per machine.
_WRITEV = {"x86_64": 20, "aarch64": 66}


def vm_rss(pid: int) -> int:
    """The process's resident set size in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def fd_count(pid: int) -> int:
    """How many file descriptors the process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads_in_writev(pid: int) -> int:
    """How many of the process's threads are blocked in ``writev`` right now.

    Skips the test on machines whose syscall number we do not know.
    """
    number = _WRITEV.get(os.uname().machine)
    if number is None:
        pytest.skip(f"writev's syscall number unknown on {os.uname().machine}")
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                first = f.read().split(None, 1)[0]
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        count += first == str(number)
    return count


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll a condition on another process's state until it holds, or fail after ``timeout``.

    For states that have no notification (a thread blocking, a descriptor
    closing); the short pause between checks is a poll interval, not a guess.
    """
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
