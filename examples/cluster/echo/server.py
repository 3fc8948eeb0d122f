"""The capitalising echo service ("hello from dom0" -> "HELLO FROM DOM0").

Serves one service name over vchan through the host store until stopped.
Each line a client sends comes back upper-cased.

    python3 examples/cluster/echo/server.py NAME [--host-store DIR]
"""

from __future__ import annotations

import argparse
import signal

import trio

from meshlink.vchan import VchanStream, open_vchan_listener


async def echo(stream: VchanStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data.upper())


async def main(name: str, host_store: str | None) -> None:
    listener = await open_vchan_listener(name, host_store=host_store)
    print(f"echo server {name!r} listening in {listener.store.path}", flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, echo, [listener])
            async for _ in signals:
                break  # withdraw the service cleanly on SIGTERM / Ctrl-C
            nursery.cancel_scope.cancel()
    await listener.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="capitalising echo service over vchan")
    p.add_argument("name")
    p.add_argument("--host-store", default=None)
    a = p.parse_args()
    trio.run(main, a.name, a.host_store)
