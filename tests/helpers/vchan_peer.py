"""A vchan peer run as a separate process by the tests.

Usage: vchan_peer.py ROLE STORE SERVICE [options]

ROLE is ``serve`` (listen, accept one client) or ``connect``.  The peer then
sends ``--send`` bytes of a seeded pseudo-random stream in random chunk
sizes while receiving until EOF with random read sizes, and prints one JSON
line: bytes sent/received and SHA-256 of each direction.  ``serve`` prints
``ready`` once it is listening.  ``--hold`` makes it stop after sending
(without closing) so the test can kill it mid-transfer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys

import trio

from meshlink.transport.vchan import connect_vchan, open_vchan_listener

BLOCK = random.Random(1234).randbytes((1 << 20) + 4093)


def stream_bytes(total: int, seed: int):
    """Yield chunks of the test stream in random sizes (crossing ring wraps)."""
    rng = random.Random(seed)
    off = 0
    sent = 0
    while sent < total:
        sizes = (1, 7, 100, 1000, 4096, 65536, 200_000, rng.randint(1, 300_000))
        n = min(total - sent, rng.choice(sizes))
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(BLOCK) - off)
            out += BLOCK[off : off + take]
            off = (off + take) % len(BLOCK)
        sent += n
        yield bytes(out)


async def run(args: argparse.Namespace) -> None:
    sizes = dict(read_min=args.read_min, write_min=args.write_min)
    if args.role == "serve":
        listener = await open_vchan_listener(args.service, host_store=args.store, **sizes)
        print("ready", flush=True)
        stream = await listener.accept()
        await listener.aclose()
    else:
        stream = await connect_vchan(args.service, host_store=args.store, **sizes)
        print("connected", flush=True)
    result: dict[str, object] = {"read_size": stream.read_size, "write_size": stream.write_size}

    async def sender() -> None:
        h = hashlib.sha256()
        n = 0
        for chunk in stream_bytes(args.send, args.seed):
            await stream.send_all(chunk)
            h.update(chunk)
            n += len(chunk)
        result["sent"] = n
        result["sent_sha"] = h.hexdigest()
        if args.hold:
            print("sent", flush=True)
            await trio.sleep_forever()
        await stream.send_eof()

    async def receiver() -> None:
        rng = random.Random(args.seed + 1)
        h = hashlib.sha256()
        n = 0
        while True:
            data = await stream.receive_some(rng.randint(1, 300_000))
            if not data:
                break
            h.update(data)
            n += len(data)
        result["received"] = n
        result["received_sha"] = h.hexdigest()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
    await stream.aclose()
    print(json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["serve", "connect"])
    p.add_argument("store")
    p.add_argument("service")
    p.add_argument("--send", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--read-min", type=int, default=1 << 18)
    p.add_argument("--write-min", type=int, default=1 << 18)
    p.add_argument("--hold", action="store_true")
    trio.run(run, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
