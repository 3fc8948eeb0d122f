"""What sessions cost and what they buy: meshlink.connect with and without a session.

Two processes: a ``meshlink.serve`` server (vchan and plain TCP, default
configuration) and this client.  In one run, alternating, it measures:

  * one-way rate of 64-byte notifies, and RPC round trip p50/p99, over vchan
    and over TCP, with ``resume=True`` (the default) against ``resume=False``
    (the bus straight on the transport);
  * time from a cut to the first answered call after it, p50 and p99:
    "local" (vchan: the server drops the transport, the client resumes over
    vchan), and over TCP and TLS (a proxy in this process resets the
    connection; TLS resumes with a full handshake: certificates from trustme,
    in the test extra).

The issue's goal: the session's steady-state cost at most 5 % on each figure.

Usage: python3 -m bench.bench_session [--messages N] [--calls N] [--cuts N] [--repeat K]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ._figures import percentile, print_load_average
from ._peers import Child, child_argv

PAYLOAD = b"m" * 64
NAME = "bench-session"


# --- the server (child process) -----------------------------------------------------


async def server(store: str) -> None:
    import meshlink
    from meshlink.bus import Handlers

    h = Handlers()
    state = {"count": 0, "first": 0.0, "last": 0.0, "target": 0}
    reached = [trio.Event()]
    holder: list[Any] = []

    async def m(payload: bytes) -> None:
        n = state["count"] = state["count"] + 1
        if n == 1:
            state["first"] = time.perf_counter()
        if n == state["target"]:
            state["last"] = time.perf_counter()
            reached[0].set()

    async def arm(count: int) -> None:
        state["target"], state["count"] = count, 0
        reached[0] = trio.Event()

    async def rate() -> float:
        await reached[0].wait()
        return (state["target"] - 1) / (state["last"] - state["first"])

    async def echo(payload: bytes) -> bytes:
        return payload

    async def cut() -> None:
        holder[0].sessions.cut()

    for fn in (m, arm, rate, echo, cut):
        h.add_method(fn.__name__, fn)
    async with trio.open_nursery() as nursery:
        srv = await nursery.start(partial(meshlink.serve, NAME, h, host_store=store,
                                          allow_plaintext=True))
        holder.append(srv)
        print(f"READY {srv.tcp_port} {srv.tls_port}", flush=True)


# --- the client -----------------------------------------------------------------------


def _connect(store: str, kind: str, resume: bool, port: int) -> Any:
    import meshlink

    if kind == "vchan":
        return meshlink.connect(NAME, host_store=store, resume=resume)
    if kind == "tls":  # certificates from the environment (main() sets them)
        return meshlink.connect(NAME, host_store=store, resume=resume,
                                pin=f"tls://127.0.0.1:{port}")
    return meshlink.connect(NAME, host_store=store, resume=resume, allow_plaintext=True,
                            pin=f"tcp://127.0.0.1:{port}")


async def oneway(store: str, kind: str, resume: bool, port: int, count: int) -> float:
    async with _connect(store, kind, resume, port) as conn:
        assert conn.transport == kind
        for n in (2000, count):  # warm-up, then the measured run
            await conn.call("arm", n)
            for _ in range(n):
                await conn.notify("m", PAYLOAD)
            result = float(await conn.call("rate"))
        return result


async def rpc(store: str, kind: str, resume: bool, port: int, calls: int) -> list[float]:
    async with _connect(store, kind, resume, port) as conn:
        for _ in range(300):
            await conn.call("echo", PAYLOAD)
        out = []
        for _ in range(calls):
            t = time.perf_counter()
            await conn.call("echo", PAYLOAD)
            out.append(time.perf_counter() - t)
        return out


async def cut_to_resumed(store: str, kind: str, port: int, cuts: int) -> list[float]:
    """Seconds from a cut to the answer of the first call made right after it."""
    import meshlink
    from tests.helpers.proxy import Proxy

    out: list[float] = []
    async with trio.open_nursery() as nursery:
        proxy: Proxy = await nursery.start(Proxy(port).run)
        target = port if kind == "vchan" else proxy.port
        async with _connect(store, kind, True, target) as conn:
            assert isinstance(conn, meshlink.MeshConnection)
            await conn.call("echo", PAYLOAD)
            for _ in range(cuts):
                t = time.perf_counter()
                if kind == "vchan":
                    await conn.notify("cut")
                else:
                    proxy.cut()
                await conn.call("echo", PAYLOAD)
                out.append(time.perf_counter() - t)
            assert conn.resumes == cuts, (conn.resumes, cuts)
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--cuts", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child is not None:
        trio.run(server, args.child[0])
        return
    sys.path.insert(0, os.getcwd())  # the proxy lives in tests/helpers
    print_load_average("start")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        os.mkdir(store, 0o700)
        try:
            from tests.helpers.connect_certs import make_certs

            certs = make_certs(Path(tmp) / "certs", NAME)
        except ImportError:
            certs = None  # no trustme: no TLS figure
        env = {**os.environ, **(certs.env("server") if certs else {})}
        child = Child(child_argv(__spec__.name, "--child", store), env=env)
        if certs is not None:
            os.environ.update(certs.env("client"))
        try:
            port, tls_port = (int(x) for x in child.first_line.split()[1:3])
            rate: dict[tuple[str, bool], list[float]] = {}
            p50: dict[tuple[str, bool], list[float]] = {}
            p99: dict[tuple[str, bool], list[float]] = {}
            for _ in range(args.repeat):
                for kind in ("vchan", "tcp"):
                    for resume in (True, False):  # alternating, same run
                        key = (kind, resume)
                        rate.setdefault(key, []).append(trio.run(
                            oneway, store, kind, resume, port, args.messages))
                        lat = trio.run(rpc, store, kind, resume, port, args.calls)
                        p50.setdefault(key, []).append(percentile(lat, 0.5))
                        p99.setdefault(key, []).append(percentile(lat, 0.99))
            print(f"\nsteady state, medians of {args.repeat} alternating runs "
                  f"(64-byte messages, default configuration)")
            print(f"{'figure':34} {'no session':>12} {'session':>12} {'ratio':>7}  goal")
            for kind in ("vchan", "tcp"):
                off, on = (kind, False), (kind, True)
                r_off, r_on = statistics.median(rate[off]), statistics.median(rate[on])
                print(f"{'one-way ' + kind + ', k msg/s':34} {r_off / 1e3:12.1f} "
                      f"{r_on / 1e3:12.1f} {r_on / r_off:7.3f}  >= 0.95")
                for label, table in (("p50", p50), ("p99", p99)):
                    a, b = statistics.median(table[off]), statistics.median(table[on])
                    goal = "<= 1.05" if label == "p50" else ""
                    print(f"{'RPC ' + label + ' ' + kind + ', us':34} {a * 1e6:12.1f} "
                          f"{b * 1e6:12.1f} {b / a:7.3f}  {goal}")
            print(f"\ncut to first answered call after it ({args.cuts} cuts each)")
            for kind, what, to in (
                    ("vchan", "local: server drops the vchan, resume on vchan", port),
                    ("tcp", "TCP: a proxy resets the connection", port),
                    ("tls", "TLS: a proxy resets the connection", tls_port)):
                if kind == "tls" and not tls_port:
                    print("  TLS: skipped (trustme not installed)")
                    continue
                lat = trio.run(cut_to_resumed, store, kind, to, args.cuts)
                print(f"  {what}: p50 {percentile(lat, 0.5) * 1e3:.2f} ms, "
                      f"p99 {percentile(lat, 0.99) * 1e3:.2f} ms")
        finally:
            child.stop()
    print_load_average("end")


if __name__ == "__main__":
    main()
