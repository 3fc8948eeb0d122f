"""Benchmark: meshlink's NBD server vs nbdkit's memory plugin, same clients, same run.

Both servers export a 256 MiB RAM disk, prefilled with the same data (so
neither can answer reads from holes), over a Unix socket and over TCP on
loopback.  The clients are the same binaries for both: fio's nbd engine
(libnbd) and nbdcopy.  Figures:

* fio 4 KiB random read IOPS at queue depth 1 and 32;
* fio 1 MiB sequential read and write throughput (QD 8);
* nbdcopy of the whole export to ``null:`` and from a file into the export.

Each figure is measured ``--rounds`` times, alternating servers, and the best
round of each server is kept (the machines this runs on are noisy; the best
round is the least disturbed).  Ratios are ours / nbdkit; >= 1.0 means we are
at least as fast.  Run time: about two minutes with the defaults.

Usage: python bench/bench_nbd.py [--seconds 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

SIZE_MIB = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_accepting(family: int, addr: str | tuple[str, int], proc: subprocess.Popen[bytes]
                   ) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.args})")
        with socket.socket(family) as s:
            try:
                s.connect(addr)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"nothing accepted on {addr}") from None
        time.sleep(0.02)  # no readiness signal from nbdkit -f; retry the socket


@contextmanager
def spawn(args: list[str], family: int, addr: str | tuple[str, int]) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_accepting(family, addr, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fio(uri: str, rw: str, bs: str, qd: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={qd}", f"--size={SIZE_MIB}M", "--time_based", f"--runtime={seconds}",
         "--ramp_time=0.5", "--output-format=json"],
        capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"iops": float(side["iops"]), "mib_s": float(side["bw"]) / 1024}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="fio run time per figure")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per figure (best kept)")
    parser.add_argument("--only", default="", help="run only figures whose name contains this")
    args = parser.parse_args()
    for tool in ("fio", "nbdcopy", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"missing {tool}; install libnbd-bin, fio, nbdkit", file=sys.stderr)
            return 1

    tmp = Path(tempfile.mkdtemp(prefix="bench-nbd-"))
    src = tmp / "src.img"
    with open(src, "wb") as f:
        for _ in range(SIZE_MIB):
            f.write(os.urandom(1 << 20))
    ports = {"ours": free_port(), "nbdkit": free_port()}
    socks = {"ours": str(tmp / "ours.sock"), "nbdkit": str(tmp / "nbdkit.sock")}
    ours = [sys.executable, "-m", "meshlink.disk", "serve", "bench", "--backend", "memory",
            "--size", f"{SIZE_MIB}M", "--nbd"]
    nbdkit = ["nbdkit", "--foreground", "--exit-with-parent", "memory", f"{SIZE_MIB}M"]
    uris: dict[tuple[str, str], str] = {}
    results: dict[tuple[str, str, str], float] = {}
    started = time.monotonic()
    with ExitStack() as stack:
        stack.enter_context(spawn(ours + ["--listen", f"unix:{socks['ours']}"],
                                  socket.AF_UNIX, socks["ours"]))
        stack.enter_context(spawn(ours + ["--listen", f"127.0.0.1:{ports['ours']}"],
                                  socket.AF_INET, ("127.0.0.1", ports["ours"])))
        stack.enter_context(spawn(nbdkit[:3] + ["-U", socks["nbdkit"]] + nbdkit[3:],
                                  socket.AF_UNIX, socks["nbdkit"]))
        stack.enter_context(spawn(nbdkit[:3] + ["-i", "127.0.0.1", "-p",
                                                str(ports["nbdkit"])] + nbdkit[3:],
                                  socket.AF_INET, ("127.0.0.1", ports["nbdkit"])))
        for server in ("ours", "nbdkit"):
            uris[(server, "unix")] = f"nbd+unix:///bench?socket={socks[server]}"
            uris[(server, "tcp")] = f"nbd://127.0.0.1:{ports[server]}/bench"
        # The Unix and TCP servers of each kind are separate processes: fill both.
        for uri in uris.values():
            subprocess.run(["nbdcopy", str(src), uri], check=True)

        figures: list[tuple[str, str, Callable[[str], float]]] = [
            ("4k randread QD1", "IOPS",
             lambda u: fio(u, "randread", "4k", 1, args.seconds)["iops"]),
            ("4k randread QD32", "IOPS",
             lambda u: fio(u, "randread", "4k", 32, args.seconds)["iops"]),
            ("1M seq read QD8", "MiB/s",
             lambda u: fio(u, "read", "1M", 8, args.seconds)["mib_s"]),
            ("1M seq write QD8", "MiB/s",
             lambda u: fio(u, "write", "1M", 8, args.seconds)["mib_s"]),
            ("nbdcopy export->null", "MiB/s",
             lambda u: SIZE_MIB / timed(["nbdcopy", u, "null:"])),
            ("nbdcopy file->export", "MiB/s",
             lambda u: SIZE_MIB / timed(["nbdcopy", str(src), u])),
        ]
        figures = [f for f in figures if args.only in f[0]]
        for transport in ("unix", "tcp"):
            for name, unit, measure in figures:
                for _ in range(args.rounds):
                    for server in ("ours", "nbdkit"):
                        value = measure(uris[(server, transport)])
                        key = (transport, name, server)
                        results[key] = max(results.get(key, 0.0), value)
                o, k = results[(transport, name, "ours")], results[(transport, name, "nbdkit")]
                print(f"{transport:4} {name:22} ours {o:>10,.0f} {unit:5}  nbdkit {k:>10,.0f} "
                      f"{unit:5}  ratio {o / k:5.2f}x", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    ratios = [results[(t, n, "ours")] / results[(t, n, "nbdkit")]
              for t in ("unix", "tcp") for n, _, _ in figures]
    print(f"min ratio {min(ratios):.2f}x over {len(ratios)} figures "
          f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
