"""A bus peer in its own process, for the bus tests and benchmark.

Usage: python bus_peer.py serve [--heartbeat INTERVAL TIMEOUT]
  Serves tests/helpers/bus_service.py on 127.0.0.1 (an ephemeral port) and
  prints ``PORT <n>`` on stdout, then serves until killed.

Usage: python bus_peer.py serve-vchan STORE [--heartbeat INTERVAL TIMEOUT]
  The same over vchan: publishes service ``bus-test`` in host store STORE and
  prints ``READY``.

Usage: python bus_peer.py rss-publisher PORT COUNT
  Connects to PORT, serves a ``go`` method that publishes COUNT messages on
  topic ``t`` (64-byte payload) to the caller's subscriptions and returns
  ``[baseline_rss, max_rss]`` in bytes (current RSS sampled every 10,000).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshlink.bus import BusConfig, Connection, Handlers, current_connection  # noqa: E402
from tests.helpers.bus_service import make_handlers  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def serve(args: list[str]) -> None:
    config = BusConfig()
    if args[:1] == ["--heartbeat"]:
        config = BusConfig(heartbeat_interval=float(args[1]), heartbeat_timeout=float(args[2]))
    from meshlink.bus import serve_bus_listeners

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"PORT {port}", flush=True)
    await serve_bus_listeners(make_handlers(), listeners, name="test-peer", config=config)


async def serve_vchan(args: list[str]) -> None:
    from meshlink.bus import serve_bus_listeners
    from meshlink.transport.vchan import open_vchan_listener

    store, rest = args[0], args[1:]
    config = BusConfig()
    if rest[:1] == ["--heartbeat"]:
        config = BusConfig(heartbeat_interval=float(rest[1]), heartbeat_timeout=float(rest[2]))
    listener = await open_vchan_listener("bus-test", host_store=store)
    print("READY", flush=True)
    await serve_bus_listeners(make_handlers(), [listener], name="test-peer", config=config)


async def rss_publisher(port: int, count: int) -> None:
    h = Handlers()

    @h.method
    async def go() -> list[int]:
        conn = current_connection()
        payload = b"p" * 64
        baseline = 0
        peak = 0
        for i in range(count):
            await conn.publish("t", payload)
            if i % 10_000 == 0:
                now = rss()
                if i == 10_000:
                    baseline = now
                peak = max(peak, now)
        return [baseline, max(peak, rss())]

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with Connection.open(stream, h, name="rss-publisher") as conn:
        await conn.wait_closed()


def main() -> None:
    mode = sys.argv[1]
    if mode == "serve":
        trio.run(serve, sys.argv[2:])
    elif mode == "serve-vchan":
        trio.run(serve_vchan, sys.argv[2:])
    elif mode == "rss-publisher":
        trio.run(rss_publisher, int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
