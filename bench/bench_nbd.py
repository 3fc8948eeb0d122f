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

Usage: python3 -m bench.bench_nbd [--seconds 3] [--rounds 2] [--only NAME] [--transport T]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from ._peers import fio, free_port, listening, nbdkit_memory, timed

SIZE_MIB = 256  # fio's span (_peers.FIO_SPAN_MIB) is the same: it covers each whole export


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="fio run time per figure")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per figure (best kept)")
    parser.add_argument("--only", default="", help="run only figures whose name contains this")
    parser.add_argument("--transport", choices=("unix", "tcp", "both"), default="both",
                        help="run only the figures over this transport")
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
    uris: dict[tuple[str, str], str] = {}
    results: dict[tuple[str, str, str], float] = {}
    started = time.monotonic()
    with ExitStack() as stack:
        stack.enter_context(listening(ours + ["--listen", f"unix:{socks['ours']}"],
                                      socket.AF_UNIX, socks["ours"]))
        stack.enter_context(listening(ours + ["--listen", f"127.0.0.1:{ports['ours']}"],
                                      socket.AF_INET, ("127.0.0.1", ports["ours"])))
        stack.enter_context(listening(nbdkit_memory(f"{SIZE_MIB}M", "-U", socks["nbdkit"]),
                                      socket.AF_UNIX, socks["nbdkit"]))
        stack.enter_context(listening(nbdkit_memory(f"{SIZE_MIB}M", "-i", "127.0.0.1",
                                                    "-p", str(ports["nbdkit"])),
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
        transports = ("unix", "tcp") if args.transport == "both" else (args.transport,)
        for transport in transports:
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
              for t in transports for n, _, _ in figures]
    if not ratios:
        print(f"no figure matches --only {args.only!r}", file=sys.stderr)
        return 1
    print(f"min ratio {min(ratios):.2f}x over {len(ratios)} figures "
          f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
