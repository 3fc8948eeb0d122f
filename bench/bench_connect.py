"""``meshlink.connect`` latency: from a service name to the first reply, per transport.

Starts ``meshlink serve-echo --tcp`` (vchan + mutual TLS + plain TCP, which
must be asked for) as its own process in a private host store, then, in this
process, repeats: resolve the name,
connect (vchan handshake / TCP / TLS handshake, then the bus hello), call
``echo`` once, close.  Prints p50/p99 per transport, the time of the first
call on an already open connection (the floor), and the wall time of the
``meshlink call`` command (a fresh interpreter each time) for orientation.

Usage: python3 -m bench.bench_connect [--n N] [--cli-n N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import trustme

from meshlink.service import connect
from meshlink.transport.tls import TLSConfig

from ._figures import percentile as pct
from ._peers import Child

NAME = "bench-echo"


async def measure(store: str, tls: TLSConfig, n: int) -> dict[str, list[float]]:
    cases = {
        "vchan": dict(tls=tls),
        "tls": dict(tls=tls, forbid_vchan=True, require_tls=True),
        "tcp": dict(tls=TLSConfig(), forbid_vchan=True),  # no CA: TLS not usable
    }
    out: dict[str, list[float]] = {}
    for kind, kw in cases.items():
        times = []
        for i in range(n + 3):
            t0 = time.perf_counter()
            async with connect(NAME, host_store=store, zeroconf=False, **kw) as conn:  # type: ignore[arg-type]
                await conn.call("echo", "ping")
                t1 = time.perf_counter()
                assert conn.transport == kind, (conn.transport, kind)
            if i >= 3:  # warm-up
                times.append(t1 - t0)
        out[kind] = times
        async with connect(NAME, host_store=store, zeroconf=False, **kw) as conn:  # type: ignore[arg-type]
            calls = []
            for _ in range(200):
                t0 = time.perf_counter()
                await conn.call("echo", "ping")
                calls.append(time.perf_counter() - t0)
        out[kind + " call"] = calls
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="connects per transport")
    p.add_argument("--cli-n", type=int, default=5, help="runs of the meshlink call command")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshlink-bench-") as tmp:
        d = Path(tmp)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        ca.issue_cert(NAME).private_key_and_cert_chain_pem.write_to_path(str(d / "srv.pem"))
        ca.issue_cert("bench").private_key_and_cert_chain_pem.write_to_path(str(d / "cli.pem"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
        store = str(d / "store")
        with Child([sys.executable, "-m", "meshlink.cli", "serve-echo", NAME, "--host-store",
                    store, "--tls-cert", str(d / "srv.pem"), "--tls-ca", str(d / "ca.pem"),
                    "--tcp"],
                   env=env, stop_timeout=30) as server:
            print(server.first_line.rstrip())
            tls = TLSConfig(str(d / "cli.pem"), None, str(d / "ca.pem"))
            res = trio.run(measure, store, tls, a.n)
            print(f"\nname -> first reply, {a.n} connects each (in-process, after warm-up):")
            print(f"{'transport':<12} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}")
            for kind, xs in res.items():
                print(f"{kind:<12} {pct(xs, .5) * 1e6:9.0f} {pct(xs, .99) * 1e6:9.0f} "
                      f"{statistics.mean(xs) * 1e6:9.0f}")
            base = pct(res["tcp"], .5)
            print(f"ratios (p50 connect): vchan/tcp {pct(res['vchan'], .5) / base:.2f}, "
                  f"tls/tcp {pct(res['tls'], .5) / base:.2f}")
            walls = []
            for _ in range(a.cli_n):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "meshlink.cli", "call", NAME, "echo", "x",
                                "--host-store", store], check=True, capture_output=True, env=env)
                walls.append(time.perf_counter() - t0)
            print(f"`meshlink call` command, wall (interpreter start included), vchan: "
                  f"median {statistics.median(walls) * 1e3:.0f} ms over {a.cli_n} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
