"""vchan vs TCP loopback vs Unix socketpair, and vchan's zero-copy path vs memcpy; one run.

Prints bulk throughput (64 KiB ``send_all``, 64 KiB ``receive_some``) and
64-byte ping-pong round trip p50/p99 for each transport, all through trio
streams; then vchan's zero-copy path (``send_all`` of memoryview slices of a
64 MiB buffer, ``receive_into`` slices of another: one copy into the ring and
one out of it, nothing else) against a single-core memcpy of the same 64 KiB
pieces between two 64 MiB buffers (into DRAM).  The ratios are issue 15's
goals: bulk >= 3x TCP, zero-copy >= 1.0x memcpy, ping-pong p50 <= 0.12x Unix.
With gcc at hand it also builds and runs ``ring_ceiling.c``: the same pieces
through a ring of the same size between two C threads that busy-poll (no
Python, no trio, no notifications), which is as fast as any ring can go on
this machine, against a memcpy measured in that run.
Absolute figures drift on shared machines; the ratios measured in one run
are what count.

Usage: python3 -m bench.bench_vchan [--bulk-mib N] [--pings N] [--ring-order K] [--repeat R]
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

import trio

from meshlink.transport.vchan import VchanStream, connect_vchan, open_vchan_listener

from ._figures import percentile
from ._peers import child_argv
from ._streams import echo, ping_rtts

CHUNK = 64 * 1024
BIG = 64 << 20  # the zero-copy path's buffers, far larger than any cache
PING = 64


async def _child_stream(kind: str, arg: str, ring: int) -> trio.abc.Stream:
    if kind == "vchan":
        return await connect_vchan("bench", host_store=arg, read_min=ring, write_min=ring)
    if kind == "tcp":
        return await trio.open_tcp_stream("127.0.0.1", int(arg))
    sock = socket.socket(fileno=int(arg))
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def child(kind: str, arg: str, mode: str, amount: int, ring: int) -> None:
    """The far end: sink bulk data, or echo pings."""
    stream = await _child_stream(kind, arg, ring)
    if mode == "bulk":
        got = 0
        while got < amount:
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            got += len(data)
        await stream.send_all(b"k")
    elif mode == "zc":
        assert isinstance(stream, VchanStream)
        dst = memoryview(bytearray(b"\x01") * BIG)  # every page touched: no faults timed
        got = 0
        while got < amount:
            off = got % BIG
            n = await stream.receive_into(dst[off : off + min(CHUNK, BIG - off)])
            if not n:
                break
            got += n
        await stream.send_all(b"k")
    else:
        await echo(stream, amount, PING)
    await stream.aclose()


Opened = tuple[trio.abc.Stream, subprocess.Popen[bytes], list[trio.abc.AsyncResource]]


async def _open(kind: str, mode: str, amount: int, ring: int) -> Opened:
    closers: list[trio.abc.AsyncResource] = []

    def argv(arg: str) -> list[str]:
        return child_argv(__spec__.name, "--child", kind, arg, mode, str(amount), str(ring))

    if kind == "vchan":
        store = tempfile.mkdtemp(prefix="mlbench")
        listener = await open_vchan_listener("bench", host_store=store, read_min=ring,
                                             write_min=ring)
        closers.append(listener)
        proc = subprocess.Popen(argv(store))
        stream: trio.abc.Stream = await listener.accept()
    elif kind == "tcp":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        closers.extend(listeners)
        proc = subprocess.Popen(argv(str(listeners[0].socket.getsockname()[1])))
        stream = await listeners[0].accept()
    else:
        a, b = socket.socketpair()
        proc = subprocess.Popen(argv(str(b.fileno())), pass_fds=[b.fileno()])
        b.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    return stream, proc, closers


async def bulk(kind: str, total: int, ring: int, zero_copy: bool = False) -> float:
    """MiB/s of ``total`` bytes sent in 64 KiB pieces to a child over ``kind``.

    ``zero_copy`` (vchan): memoryview slices of a 64 MiB buffer, received by
    the child with ``receive_into`` slices of another; else one ``bytes``
    sent again and again, received with ``receive_some``.
    """
    stream, proc, closers = await _open(kind, "zc" if zero_copy else "bulk", total, ring)
    src = memoryview(bytearray(random.randbytes(BIG)) if zero_copy else b"\xa5" * CHUNK)
    size = len(src)
    t0 = time.perf_counter()
    for i in range(total // CHUNK):
        off = (i * CHUNK) % size
        await stream.send_all(src[off : off + CHUNK])
    assert await stream.receive_some(1) == b"k"
    dt = time.perf_counter() - t0
    await stream.aclose()
    for c in closers:
        await c.aclose()
    proc.wait()
    return total / dt / (1 << 20)


def memcpy_rate(total: int) -> float:
    """Single-core copies of 64 KiB pieces between two 64 MiB buffers (MiB/s)."""
    src = memoryview(bytearray(random.randbytes(BIG)))
    dst = memoryview(bytearray(b"\x01") * BIG)  # every page touched: faults are not memcpy
    t0 = time.perf_counter()
    for i in range(total // CHUNK):
        off = (i * CHUNK) % BIG
        dst[off : off + CHUNK] = src[off : off + CHUNK]
    return total / (time.perf_counter() - t0) / (1 << 20)


def ring_ceiling(ring: int, total_mib: int) -> tuple[float, float] | None:
    """(memcpy, C ring) MiB/s from ``ring_ceiling.c`` (best of three runs), or None
    without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or ring % (64 << 10):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "ring_ceiling")
        subprocess.run([cc, "-std=c11", "-O2", "-pthread", os.path.join(here, "ring_ceiling.c"),
                        "-o", exe], check=True)
        # Best of three: two threads that busy-poll need both cores, and one
        # run in which another process takes a core collapses (seen: 0.2x).
        runs = [subprocess.run([exe, str(ring), str(total_mib)], check=True,
                               capture_output=True, text=True).stdout.split()
                for _ in range(3)]
    return max(float(r[0]) for r in runs), max(float(r[1]) for r in runs)


async def pingpong(kind: str, count: int, ring: int) -> tuple[float, float]:
    stream, proc, closers = await _open(kind, "ping", count, ring)
    lat = await ping_rtts(stream, count, PING)
    await stream.aclose()
    for c in closers:
        await c.aclose()
    proc.wait()
    lat = lat[count // 10:]  # drop warm-up
    return percentile(lat, 0.5) * 1e6, percentile(lat, 0.99) * 1e6


async def main(args: argparse.Namespace) -> None:
    ring = 1 << args.ring_order
    kinds = ["vchan", "tcp", "unix"]
    total = args.bulk_mib << 20
    print(f"# two processes, trio on both ends; vchan rings 2^{args.ring_order} B; "
          f"median of {args.repeat} runs")
    rates = {k: statistics.median([await bulk(k, total, ring) for _ in range(args.repeat)])
             for k in kinds}
    zc = statistics.median([await bulk("vchan", total, ring, True) for _ in range(args.repeat)])
    mc = statistics.median([memcpy_rate(total) for _ in range(args.repeat)])
    pings = {}
    for k in kinds:
        runs = [await pingpong(k, args.pings, ring) for _ in range(args.repeat)]
        pings[k] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    print(f"{'transport':<10}{'bulk MiB/s':>12}{'ping p50 us':>14}{'ping p99 us':>14}")
    for k in kinds:
        print(f"{k:<10}{rates[k]:>12.0f}{pings[k][0]:>14.1f}{pings[k][1]:>14.1f}")
    print(f"vchan zero-copy {zc:.0f} MiB/s; single-core memcpy 64 KiB pieces {mc:.0f} MiB/s")
    print(f"ratio bulk vchan/tcp  = {rates['vchan'] / rates['tcp']:.2f}  (goal >= 3.0)")
    print(f"ratio bulk vchan/unix = {rates['vchan'] / rates['unix']:.2f}  (goal >= 1.5)")
    print(f"ratio zero-copy/memcpy = {zc / mc:.2f}  (goal >= 1.0)")
    print(f"ratio p50 vchan/unix  = {pings['vchan'][0] / pings['unix'][0]:.2f}  (goal <= 0.12)")
    ceiling = ring_ceiling(ring, args.bulk_mib)
    if ceiling is None:
        print("C ring ceiling: skipped (no C compiler, or a ring below 64 KiB)")
    else:
        c_mc, c_ring = ceiling
        print(f"C ring ceiling (ring_ceiling.c, two threads, no Python): {c_ring:.0f} MiB/s, "
              f"memcpy in that run {c_mc:.0f} MiB/s, ratio {c_ring / c_mc:.2f}; "
              f"vchan zero-copy reaches {zc / c_ring:.2f}x of that ring")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, arg, mode, amount, ring = sys.argv[2:7]
        trio.run(child, kind, arg, mode, int(amount), int(ring))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bulk-mib", type=int, default=1024)
    p.add_argument("--pings", type=int, default=5000)
    p.add_argument("--ring-order", type=int, default=18)
    p.add_argument("--repeat", type=int, default=3)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trio.run(main, p.parse_args())
