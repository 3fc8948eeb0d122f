"""ivshmem vchan vs the same guest's NIC (user-mode networking), host<->guest, one run.

Boots one TCG guest (tests/helpers/ivshmem_guest.py: Debian kernel, busybox
initramfs, the static C peer) with an ivshmem-plain device over a host file
and an e1000 NIC on QEMU user-mode networking, then measures, in the same
boot and in alternation:

* bulk throughput guest->host and host->guest: ivshmem vchan vs TCP to the
  host through the NIC (the guest connects to 10.0.2.2, QEMU's alias for the
  host's loopback);
* ping-pong round trips of 64 bytes: p50 and p99.

The host end is trio (meshlink.transport.vchan.ivshmem, trio TCP), the guest
end is the same C program for both transports (modes ``source`` and
``drain``: constant bytes, no checksum, so the guest's TCG-emulated CPU
spends its time on the transport).  Under TCG the absolute
figures are slow; the ratios of one run are what count.  Guest->host is
timed on the host from the first byte to end of stream; host->guest from
the first write to the guest's "RECV" console line (a few ms of console
latency included, hence large transfers).

Usage: python3 -m bench.bench_ivshmem [--bulk-mib N] [--pings N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import trio

from meshlink.transport.vchan.ivshmem import IvshmemRegion, connect_ivshmem, open_ivshmem_listener

# The guest builder lives with the tests that boot the same guests.
from tests.helpers.ivshmem_guest import Guest, build_guest_files, missing

from ._figures import percentile, print_load_average
from ._streams import ping_rtts

PING = 64
CHUNK = 64 * 1024


async def _drain(stream: trio.abc.ReceiveStream) -> tuple[int, float]:
    """Bytes until EOF and seconds from the first byte to EOF."""
    first = await stream.receive_some(1 << 20)
    t0 = time.perf_counter()
    total = len(first)
    while data := await stream.receive_some(1 << 20):
        total += len(data)
    return total, time.perf_counter() - t0


async def _push(stream: trio.abc.SendStream, total: int) -> float:
    payload = b"\xa5" * CHUNK
    t0 = time.perf_counter()
    for _ in range(total // CHUNK):
        await stream.send_all(payload)
    return t0


async def run(args: argparse.Namespace) -> None:
    why = missing()
    if why:
        print(f"skipped: {why}")
        return
    work = Path(tempfile.mkdtemp(prefix="mlbench-ivshmem"))
    initramfs = build_guest_files(work)
    region_path = work / "region"
    region = IvshmemRegion.create(region_path, "bench-host", size=16 << 20)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    total = args.bulk_mib << 20
    tcp_total = args.tcp_mib << 20
    block = [
        ["auto", "listen", "g2h", "source", str(total)],
        ["auto", "connect", "h2g", "drain"],
        ["auto", "connect", "ping", "echo"],
        ["tcp", "10.0.2.2", str(port), "source", str(tcp_total)],
        ["tcp", "10.0.2.2", str(port), "drain"],
        ["tcp", "10.0.2.2", str(port), "echo"],
    ]
    guest = Guest(initramfs, region_path, block * args.repeat, net=True)

    async def line(prefix: str) -> str:
        return await trio.to_thread.run_sync(guest.expect, prefix, 600)

    rates: dict[str, list[float]] = {k: [] for k in ("ivs g2h", "ivs h2g", "tcp g2h", "tcp h2g")}
    rtts: dict[str, list[float]] = {"ivshmem": [], "tcp": []}
    booted = time.perf_counter()
    print_load_average("start")
    try:
        for _ in range(args.repeat):
            # ivshmem: guest->host, host->guest, ping-pong.
            s = await connect_ivshmem(region, "g2h", wait=300)
            n, dt = await _drain(s)
            await s.aclose()
            assert n == total, (n, total)
            rates["ivs g2h"].append(n / dt / (1 << 20))
            lis = await open_ivshmem_listener(region, "h2g")
            s = await lis.accept()
            t0 = await _push(s, total)
            await s.send_eof()
            await line("IVSPEER RECV")
            rates["ivs h2g"].append(total / (time.perf_counter() - t0) / (1 << 20))
            await s.aclose()
            await lis.aclose()
            lis = await open_ivshmem_listener(region, "ping")
            s = await lis.accept()
            rtts["ivshmem"] += (await ping_rtts(s, args.pings, PING))[args.pings // 10:]
            await s.aclose()
            await lis.aclose()
            # The same three over the NIC.
            t = await listeners[0].accept()
            n, dt = await _drain(t)
            await t.aclose()
            assert n == tcp_total, (n, tcp_total)
            rates["tcp g2h"].append(n / dt / (1 << 20))
            t = await listeners[0].accept()
            t0 = await _push(t, tcp_total)
            await t.send_eof()
            await line("IVSPEER RECV")
            rates["tcp h2g"].append(tcp_total / (time.perf_counter() - t0) / (1 << 20))
            await t.aclose()
            t = await listeners[0].accept()
            rtts["tcp"] += (await ping_rtts(t, args.pings, PING))[args.pings // 10:]
            await t.aclose()
        await line("IVSGUEST DONE")
    finally:
        guest.kill()
        for lst in listeners:
            await lst.aclose()
        region.close()
        shutil.rmtree(work, ignore_errors=True)
    print_load_average("end")
    took = time.perf_counter() - booted
    print(f"# one TCG guest (no KVM), 1 vCPU; {args.repeat} rounds in {took:.0f} s; "
          f"ivshmem bulk {args.bulk_mib} MiB, NIC bulk {args.tcp_mib} MiB, {args.pings} pings of "
          f"{PING} B; medians of rounds; host end trio, guest end the static C peer")
    print(f"{'transport':<26}{'g2h MiB/s':>11}{'h2g MiB/s':>11}"
          f"{'ping p50 us':>13}{'ping p99 us':>13}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, key, rkey in (("ivshmem vchan (poll)", "ivs", "ivshmem"),
                            ("e1000 + user-mode net", "tcp", "tcp")):
        p50, p99 = percentile(rtts[rkey], 0.5), percentile(rtts[rkey], 0.99)
        print(f"{name:<26}{med[key + ' g2h']:>11.1f}{med[key + ' h2g']:>11.1f}"
              f"{p50 * 1e6:>13.0f}{p99 * 1e6:>13.0f}")
    print(f"ratio bulk g2h ivshmem/net = {med['ivs g2h'] / med['tcp g2h']:.1f}")
    print(f"ratio bulk h2g ivshmem/net = {med['ivs h2g'] / med['tcp h2g']:.1f}")
    print(f"ratio p50 ivshmem/net      = "
          f"{percentile(rtts['ivshmem'], 0.5) / percentile(rtts['tcp'], 0.5):.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--bulk-mib", type=int, default=128, help="ivshmem bulk size each way")
    p.add_argument("--tcp-mib", type=int, default=16, help="NIC bulk size each way (slower)")
    p.add_argument("--pings", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trio.run(run, p.parse_args())
