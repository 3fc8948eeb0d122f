"""An ivshmem vchan end in its own process (Python side), for tests/test_ivshmem*.py.

    ivshmem_peer.py REGION listen|connect NAME recv|send N|echo

Prints ``CONNECTED`` once the channel is up, then one JSON line at the end:
``{"bytes": n, "crc": crc32}`` (recv, send) or ``{"bytes": n}`` (echo).
``send`` writes N bytes of a fixed pattern (N = -1: until killed).
"""

from __future__ import annotations

import json
import sys
import zlib

import trio

from meshlink.transport.vchan.ivshmem import IvshmemRegion, connect_ivshmem, open_ivshmem_listener


async def main(path: str, role: str, name: str, mode: str, arg: str | None) -> None:
    region = IvshmemRegion.open(path)
    if role == "listen":
        listener = await open_ivshmem_listener(region, name)
        print("LISTENING", flush=True)
        stream = await listener.accept()
        await listener.aclose()
    else:
        stream = await connect_ivshmem(region, name, wait=10)
    print("CONNECTED", flush=True)
    total = crc = 0
    if mode == "recv":
        while data := await stream.receive_some():
            total += len(data)
            crc = zlib.crc32(data, crc)
    elif mode == "send":
        n = int(arg or "0")
        block = bytes(range(256)) * 256
        while n < 0 or total < n:
            chunk = block if n < 0 else block[: n - total]
            await stream.send_all(chunk)
            total += len(chunk)
            crc = zlib.crc32(chunk, crc)
        await stream.send_eof()
    elif mode == "echo":
        while data := await stream.receive_some():
            await stream.send_all(data)
            total += len(data)
    await stream.aclose()
    print(json.dumps({"bytes": total, "crc": crc}), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    trio.run(main, a[0], a[1], a[2], a[3], a[4] if len(a) > 4 else None)
