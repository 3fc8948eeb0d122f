"""vchan vs TCP loopback vs Unix socketpair, two processes, one run.

Prints bulk throughput (64 KiB send_all) and 64-byte ping-pong round trip
p50/p99 for each transport, then the ratios the vchan issue sets as goals:
bulk >= 3x TCP and >= 1.5x Unix; ping-pong p50 <= 0.6x Unix.  All three go
through trio streams; absolute figures drift on shared machines, the ratios
measured in one run are what count.

Usage: python3 -m bench.bench_vchan [--bulk-mib N] [--pings N] [--ring-order K] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import trio

from meshlink.transport.vchan import connect_vchan, open_vchan_listener

from ._figures import percentile
from ._peers import child_argv
from ._streams import echo, ping_rtts

CHUNK = 64 * 1024
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
            data = await stream.receive_some(1 << 20)
            if not data:
                break
            got += len(data)
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


async def bulk(kind: str, total: int, ring: int) -> float:
    stream, proc, closers = await _open(kind, "bulk", total, ring)
    payload = b"\xa5" * CHUNK
    t0 = time.perf_counter()
    for _ in range(total // CHUNK):
        await stream.send_all(payload)
    assert await stream.receive_some(1) == b"k"
    dt = time.perf_counter() - t0
    await stream.aclose()
    for c in closers:
        await c.aclose()
    proc.wait()
    return total / dt / (1 << 20)


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
    pings = {}
    for k in kinds:
        runs = [await pingpong(k, args.pings, ring) for _ in range(args.repeat)]
        pings[k] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    print(f"{'transport':<10}{'bulk MiB/s':>12}{'ping p50 us':>14}{'ping p99 us':>14}")
    for k in kinds:
        print(f"{k:<10}{rates[k]:>12.0f}{pings[k][0]:>14.1f}{pings[k][1]:>14.1f}")
    print(f"ratio bulk vchan/tcp  = {rates['vchan'] / rates['tcp']:.2f}  (goal >= 3.0)")
    print(f"ratio bulk vchan/unix = {rates['vchan'] / rates['unix']:.2f}  (goal >= 1.5)")
    print(f"ratio p50 vchan/unix  = {pings['vchan'][0] / pings['unix'][0]:.2f}  (goal <= 0.6)")


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
