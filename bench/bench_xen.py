"""vchan over the Xen provider (emulated Xen userspace) vs the local provider.

Same run, same rings, two processes each: bulk throughput (64 KiB send_all,
one direction) and 64-byte ping-pong round trip p50/p99, then the ratios
Xen/local.  The Xen side runs over tests/xenemu (built here with gcc, by its
build script run as a program: the tests own the emulation): grants
are pages of a shared file, an event channel is a datagram socket, XenStore
is a directory tree -- so this measures meshlink's Xen provider code path,
not a real hypervisor.

Usage: python3 -m bench.bench_xen [--bulk-mib N] [--pings N] [--ring-order K] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from ._figures import percentile
from ._peers import child_argv
from ._streams import echo, ping_rtts

# Builds the emulated Xen userspace; prints where it put it (see its main()).
XENEMU_BUILD = Path(__file__).resolve().parent.parent / "tests" / "xenemu" / "build.py"
CHUNK = 64 * 1024
PING = 64


async def _child_stream(provider: str, arg: str, ring: int) -> trio.abc.HalfCloseableStream:
    deadline = time.monotonic() + 30
    while True:
        try:
            if provider == "xen":
                from meshlink.transport.vchan.xen import connect_xen_vchan

                return await connect_xen_vchan(1, arg)
            from meshlink.transport.vchan import connect_vchan

            return await connect_vchan("bench", host_store=arg, read_min=ring, write_min=ring)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await trio.sleep(0.02)


async def child(provider: str, arg: str, mode: str, amount: int, ring: int) -> None:
    stream = await _child_stream(provider, arg, ring)
    if mode == "bulk":
        block = b"\xa5" * CHUNK
        left = amount
        while left:
            n = min(left, CHUNK)
            await stream.send_all(block[:n])
            left -= n
    else:
        await echo(stream, amount, PING)
    while await stream.receive_some():
        pass
    await stream.aclose()


Served = tuple[trio.abc.HalfCloseableStream, "subprocess.Popen[bytes]"]


async def _serve(provider: str, tmp: Path, ring: int, mode: str, amount: int,
                 env: dict[str, str]) -> Served:
    if provider == "xen":
        from meshlink.transport.vchan.xen import XenVchanServer

        port = f"b{time.monotonic_ns()}"
        server = await XenVchanServer.publish(2, port, read_min=ring, write_min=ring)
        arg = port
    else:
        from meshlink.transport.vchan import open_vchan_listener

        store = tmp / f"store{time.monotonic_ns()}"
        store.mkdir(mode=0o700)
        listener = await open_vchan_listener("bench", host_store=store, read_min=ring,
                                             write_min=ring)
        arg = str(store)
    proc = subprocess.Popen(child_argv(__spec__.name, "--child", provider, arg, mode,
                                       str(amount), str(ring)), env={**os.environ, **env})
    if provider == "xen":
        stream: trio.abc.HalfCloseableStream = await server.wait_connected()
    else:
        stream = await listener.accept()
        await listener.aclose()
    return stream, proc


async def bulk(provider: str, tmp: Path, ring: int, total: int, env: dict[str, str]) -> float:
    stream, proc = await _serve(provider, tmp, ring, "bulk", total, env)
    got = 0
    t0 = 0.0
    while got < total:
        data = await stream.receive_some(1 << 20)
        if not t0:
            t0 = time.perf_counter()
        got += len(data)
    dt = time.perf_counter() - t0
    await stream.aclose()
    proc.wait(60)
    return total / dt / (1 << 20)


async def pingpong(provider: str, tmp: Path, ring: int, count: int,
                   env: dict[str, str]) -> tuple[float, float]:
    stream, proc = await _serve(provider, tmp, ring, "ping", count, env)
    rtts = await ping_rtts(stream, count, PING)
    await stream.aclose()
    proc.wait(60)
    return percentile(rtts, 0.5) * 1e6, percentile(rtts, 0.99) * 1e6


async def main(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> None:
    ring = 1 << args.ring_order
    total = args.bulk_mib << 20
    res: dict[str, dict[str, list[float]]] = {p: {"bulk": [], "p50": [], "p99": []}
                                              for p in ("local", "xen")}
    for _ in range(args.repeat):
        for provider in ("local", "xen"):  # interleaved: both see the same machine
            res[provider]["bulk"].append(await bulk(provider, tmp, ring, total, env))
            p50, p99 = await pingpong(provider, tmp, ring, args.pings, env)
            res[provider]["p50"].append(p50)
            res[provider]["p99"].append(p99)
    med = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in res.items()}
    print(f"ring {ring >> 10} KiB, bulk {args.bulk_mib} MiB in 64 KiB writes, "
          f"{args.pings} pings of {PING} B, median of {args.repeat}")
    for p in ("local", "xen"):
        m = med[p]
        print(f"  {p:5s}  bulk {m['bulk']:8.0f} MiB/s   ping p50 {m['p50']:6.1f} us "
              f"p99 {m['p99']:6.1f} us")
    print(f"  ratio xen/local: bulk {med['xen']['bulk'] / med['local']['bulk']:.2f}x, "
          f"ping p50 {med['xen']['p50'] / med['local']['p50']:.2f}x")


def _setup(tmp: Path) -> dict[str, str]:
    """Build the emulation and make this process emulated domain 1."""
    built = subprocess.run([sys.executable, str(XENEMU_BUILD), str(tmp / "emu")],
                           capture_output=True, text=True)
    if built.returncode:
        sys.exit(f"cannot build the Xen emulation: {built.stderr.strip()}")
    libdir = json.loads(built.stdout)["libdir"]
    root = tmp / "xenhost"
    root.mkdir()
    os.environ.update(MESHLINK_XEN_LIBDIR=libdir, XENEMU_DIR=str(root), XENEMU_DOMID="1")
    return {"XENEMU_DOMID": "2"}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, prov, arg, mode, amount, ring = sys.argv
        trio.run(child, prov, arg, mode, int(amount), int(ring))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bulk-mib", type=int, default=512)
    p.add_argument("--pings", type=int, default=3000)
    p.add_argument("--ring-order", type=int, default=18)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        child_env = _setup(Path(d))
        trio.run(main, a, Path(d), child_env)
