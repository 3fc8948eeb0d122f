"""Serve disks over the blk ring from a separate process, for the tests.

Usage: blk_server.py STORE SERVICE KIND:NAME[:PATH[:SIZE]] ...

Prints "ready" once listening; serves until killed.
"""

from __future__ import annotations

import sys

import trio

from meshlink.disk.backends import open_backend
from meshlink.disk.blk import serve_blk


async def main(store: str, service: str, specs: list[str]) -> None:
    disks = {}
    for spec in specs:
        kind, name, *rest = spec.split(":")
        path = rest[0] if rest and rest[0] else None
        size = int(rest[1]) if len(rest) > 1 else None
        disks[name] = open_backend(kind, path=path, size=size)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_blk(service, disks, host_store=store,
                                                          task_status=task_status))
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
