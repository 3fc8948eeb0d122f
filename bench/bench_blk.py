"""Disks over the blk ring vs single-core memcpy vs nbdkit's memory plugin, one run.

Our figures: a blk-ring client in this process against a server process
exporting ``memory`` and ``null`` disks: sequential 1 MiB writes and reads
at queue depth 8, 4 KiB random reads at queue depth 1 and 32, over the
first 256 MiB of each disk (fio's span for nbdkit).  The client is, by
default, the native load generator (:func:`meshlink.disk.blk.load.run_load`,
C, copying each request's data to or from its own buffer as fio does), so
the figures measure the ring and the server as fio's measure nbdkit;
``--client python`` drives the disk with :class:`~meshlink.disk.blk.BlkDisk`
calls from trio tasks instead (bounded by the Python client).  The write
figure runs first, so the reads find the memory disk written, as nbdkit's
is (filled by nbdcopy) before fio reads it.

Peers, measured in the same run: memcpy of the same sizes on one core (the
physical limit), and nbdkit's memory plugin over a Unix socket driven by
fio's nbd engine.  Goals (issue 15): sequential read >= 0.3x memcpy and
>= 2x nbdkit; 4 KiB QD32 random read IOPS >= 1.5x nbdkit.

Usage: python3 -m bench.bench_blk [--seconds S] [--rounds N] [--client native|python]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import trio

from meshlink.disk.backends import open_backend
from meshlink.disk.blk import BlkDisk, open_blk, serve_blk
from meshlink.disk.blk.load import run_load

from ._peers import FIO_SPAN_MIB, Child, child_argv, fio, listening, nbdkit_memory

SIZE = 1 << 30
MIB = 1 << 20
SPAN = FIO_SPAN_MIB * MIB  # the part of each disk the figures cover, ours and nbdkit's


def memcpy_rate(chunk: int, seconds: float) -> float:
    """Single-core copy rate (MiB/s) of ``chunk``-sized copies into a reused buffer."""
    src = bytearray(random.randbytes(64 * MIB))
    dst = bytearray(chunk)
    d = memoryview(dst)
    s = memoryview(src)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        off = (n * chunk) % (len(src) - chunk)
        d[:] = s[off : off + chunk]
        n += 1
    return n * chunk / (time.perf_counter() - t0) / MIB


async def seq(disk: BlkDisk, write: bool, seconds: float, qd: int = 8) -> float:
    """Sequential 1 MiB I/O with ``qd`` requests in flight (as fio's QD8 job)."""
    data = b"\x5a" * MIB
    n = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal n
        buf = bytearray(MIB)
        while time.perf_counter() < deadline:
            off = (n * MIB) % SPAN
            n += 1
            if write:
                await disk.write(off, data)
            else:
                await disk.readinto(off, buf)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(qd):
            nursery.start_soon(worker)
    return n / (time.perf_counter() - t0)


async def randread(disk: BlkDisk, qd: int, seconds: float) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        nonlocal count
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            await disk.read(rng.randrange(SPAN // 4096) * 4096, 4096)
            count += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(qd):
            nursery.start_soon(worker, i)
    return count / (time.perf_counter() - t0)


async def ours(store: str, seconds: float, client: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for kind in ("memory", "null"):
        async with open_blk(f"bench/{kind}", host_store=store, ring_order=1) as disk:
            if client == "python":
                out[(kind, "seq write 1M QD8 MiB/s")] = await seq(disk, True, seconds)
                out[(kind, "seq read 1M QD8 MiB/s")] = await seq(disk, False, seconds)
                out[(kind, "randread 4k QD1 IOPS")] = await randread(disk, 1, seconds)
                out[(kind, "randread 4k QD32 IOPS")] = await randread(disk, 32, seconds)
                continue
            for name, write, bs, qd, rand in (
                    ("seq write 1M QD8 MiB/s", True, MIB, 8, False),
                    ("seq read 1M QD8 MiB/s", False, MIB, 8, False),
                    ("randread 4k QD1 IOPS", False, 4096, 1, True),
                    ("randread 4k QD32 IOPS", False, 4096, 32, True)):
                r = run_load(disk, write=write, block_size=bs, queue_depth=qd,
                             seconds=seconds, random_offsets=rand, span=SPAN)
                out[(kind, name)] = r.mib_per_s if bs == MIB else r.iops
    return out


async def server(store: str) -> None:
    disks = {k: open_backend(k, size=SIZE) for k in ("memory", "null")}
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_blk("bench", disks, host_store=store,
                                                          task_status=task_status))
        print("ready", flush=True)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--server":
        trio.run(server, sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per figure and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, ours and the peers' alternating; medians are reported")
    p.add_argument("--client", choices=("native", "python"), default="native",
                   help="our client: the native load generator (as fio for nbdkit) or "
                        "BlkDisk calls from trio tasks")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlblk"))
    store = str(tmp / "store")
    have_nbdkit = all(shutil.which(t) for t in ("nbdkit", "fio", "nbdcopy"))
    ours_runs: dict[tuple[str, str], list[float]] = {}
    peer_runs: dict[str, list[float]] = {}
    sock = str(tmp / "nbdkit.sock")
    with ExitStack() as stack:
        srv = stack.enter_context(Child(child_argv(__spec__.name, "--server", store)))
        if have_nbdkit:
            stack.enter_context(listening(nbdkit_memory("1G", "-U", sock), socket.AF_UNIX, sock))
        uri = f"nbd+unix:///?socket={sock}"
        assert srv.first_line.strip() == "ready"
        if have_nbdkit:
            # fio reads what was written, as our reads do after our write figure.
            fill = tmp / "fill.img"
            with open(fill, "wb") as f:
                for _ in range(FIO_SPAN_MIB):
                    f.write(os.urandom(MIB))
            subprocess.run(["nbdcopy", str(fill), uri], check=True)
            fill.unlink()
        for _ in range(args.rounds):
            for key, v in trio.run(ours, store, args.seconds, args.client).items():
                ours_runs.setdefault(key, []).append(v)
            figures = {"memcpy 1M MiB/s": memcpy_rate(MIB, args.seconds),
                       "memcpy 4k MiB/s": memcpy_rate(4096, args.seconds)}
            if have_nbdkit:
                figures["nbdkit seq read 1M QD8 MiB/s"] = fio(
                    uri, "read", "1M", 8, args.seconds)["mib_s"]
                figures["nbdkit randread 4k QD1 IOPS"] = fio(
                    uri, "randread", "4k", 1, args.seconds)["iops"]
                figures["nbdkit randread 4k QD32 IOPS"] = fio(
                    uri, "randread", "4k", 32, args.seconds)["iops"]
            for name, v in figures.items():
                peer_runs.setdefault(name, []).append(v)
    res = {k: statistics.median(v) for k, v in ours_runs.items()}
    peers = {k: statistics.median(v) for k, v in peer_runs.items()}
    print(f"# blk ring ({args.client} client, this process) vs peers, same run, "
          f"medians of {args.rounds} alternating rounds, load average {os.getloadavg()[0]:.1f}")
    for (kind, name), v in res.items():
        print(f"blk {kind:6} {name:24} {v:>12,.0f}")
    for name, v in peers.items():
        print(f"peer {name:30} {v:>12,.0f}")
    for kind in ("memory", "null"):
        sr = res[(kind, "seq read 1M QD8 MiB/s")]
        print(f"ratio {kind} seq read / memcpy 1M      = {sr / peers['memcpy 1M MiB/s']:.2f}"
              "  (goal >= 0.3)")
        if "nbdkit seq read 1M QD8 MiB/s" in peers:
            print(f"ratio {kind} seq read / nbdkit         = "
                  f"{sr / peers['nbdkit seq read 1M QD8 MiB/s']:.2f}  (goal >= 2.0)")
            q1 = res[(kind, "randread 4k QD1 IOPS")] / peers["nbdkit randread 4k QD1 IOPS"]
            q32 = res[(kind, "randread 4k QD32 IOPS")] / peers["nbdkit randread 4k QD32 IOPS"]
            print(f"ratio {kind} 4k QD1 IOPS / nbdkit      = {q1:.2f}")
            print(f"ratio {kind} 4k QD32 IOPS / nbdkit     = {q32:.2f}  (goal >= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
