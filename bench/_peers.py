"""Starting and stopping the processes a benchmark measures, and the peer tools.

Every figure is taken between processes, as meshlink is used, so each script
starts its far ends: itself again as a child (``child_argv``), our servers,
nbdkit.  Readiness is a line the child prints (``Child``) or, for servers that
print nothing such as ``nbdkit --foreground``, a socket that accepts
(``listening``); never a sleep.  fio and nbdcopy are the clients that drive
both our servers and nbdkit, so both sides are measured by the same code.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType

# fio works over the first 256 MiB of an export (all of each of bench_nbd's disks).
FIO_SPAN_MIB = 256


def child_argv(module: str, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    """The command that runs bench module ``module`` (its ``__spec__.name``) again.

    ``prefix`` goes between the interpreter and ``-m`` (interpreter options).
    """
    return [sys.executable, *prefix, "-m", module, *args]


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Ask ``proc`` to end (SIGTERM); kill it if it has not within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Child:
    """A process with stdout piped whose first line says it is ready.

    The constructor returns once that line is read (``first_line``); leaving the
    ``with`` block, or ``stop()``, ends the process.  With ``stdin=True`` its
    stdin is a pipe too, for :meth:`write` (a start signal, say).
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 stop_timeout: float = 10, stdin: bool = False) -> None:
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True, env=env,
                                     stdin=subprocess.PIPE if stdin else None)
        self.stop_timeout = stop_timeout
        self.first_line = self.readline()

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def write(self, text: str) -> None:
        """Write ``text`` to the child's stdin (made with ``stdin=True``) and flush."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def stop(self) -> None:
        stop(self.proc, self.stop_timeout)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_accepting(family: int, addr: str | tuple[str, int], proc: subprocess.Popen[bytes]
                   ) -> None:
    """Block until ``addr`` accepts a connection; exit if ``proc`` dies or 30 s pass."""
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.args!r})")
        with socket.socket(family) as s:
            try:
                s.connect(addr)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"nothing accepted on {addr}") from None
        time.sleep(0.02)  # no readiness signal from nbdkit -f; retry the socket


@contextmanager
def listening(args: list[str], family: int, addr: str | tuple[str, int]) -> Iterator[None]:
    """Run a server that prints nothing; yield once it accepts on ``addr``."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_accepting(family, addr, proc)
        yield
    finally:
        stop(proc)


def nbdkit_memory(size: str, *listen: str) -> list[str]:
    """The nbdkit command exporting a RAM disk of ``size`` on ``listen`` (-U / -i -p)."""
    return ["nbdkit", "--foreground", "--exit-with-parent", *listen, "memory", size]


def fio(uri: str, rw: str, bs: str, qd: int, seconds: float) -> dict[str, float]:
    """One time-based fio job (nbd engine) on ``uri``: its ``iops`` and ``mib_s``."""
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={qd}", f"--size={FIO_SPAN_MIB}M", "--time_based", f"--runtime={seconds}",
         "--ramp_time=0.5", "--output-format=json"],
        capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"iops": float(side["iops"]), "mib_s": float(side["bw"]) / 1024}


def timed(cmd: list[str]) -> float:
    """Seconds ``cmd`` takes to run to completion (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start
