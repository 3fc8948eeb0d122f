"""One side of the vchan stress test, run as its own process.

Usage: stress_vchan_peer.py ROLE STORE SERVICE --seed N --chunks N
       [--read-min B] [--write-min B] [--deadline S]

ROLE is ``serve`` (prints ``ready`` once listening, accepts one client) or
``connect`` (prints ``connected``).  Both sides then, at once:

- send ``--chunks`` chunks of a seeded byte stream, mostly tiny (1..64
  bytes), some up to the ring size, some up to three rings (so send_all
  must wait for space), with random short sleeps between chunks: none,
  a bare checkpoint, or up to 2 ms;
- receive until EOF, alternating between draining bursts (random read
  sizes, ``receive_some`` and ``receive_into``) and sleeping up to 3 ms, so
  that the writer keeps finding the ring full and the reader keeps finding
  it empty: every pass goes through arm, re-check and the peer's notify.

The sleeps are the workload (they create the full/empty interleavings), not
synchronisation.  Everything runs under ``trio.fail_after(--deadline)``: a
lost wakeup shows up as this process exiting non-zero with "stalled" and the
byte counts reached, never as a hang.  Prints one JSON line at the end:
bytes and SHA-256 of each direction, and the number of ring sizes seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys

import trio
import trio.lowlevel

from meshlink.transport.vchan import connect_vchan, open_vchan_listener


def chunk_sizes(rng: random.Random, ring: int, count: int) -> list[int]:
    sizes = []
    for _ in range(count):
        r = rng.random()
        if r < 0.7:
            sizes.append(rng.randint(1, 64))
        elif r < 0.9:
            sizes.append(rng.randint(65, ring))
        else:
            sizes.append(rng.randint(ring, 3 * ring))
    return sizes


async def maybe_sleep(rng: random.Random, longest: float) -> None:
    r = rng.random()
    if r < 0.4:
        return
    if r < 0.7:
        await trio.lowlevel.checkpoint()
    else:
        await trio.sleep(rng.uniform(0, longest))


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

    progress = {"sent": 0, "received": 0}
    result: dict[str, object] = {"read_size": stream.read_size,
                                 "write_size": stream.write_size}

    async def sender() -> None:
        rng = random.Random(args.seed)
        data_rng = random.Random(args.seed * 7919 + 1)
        h = hashlib.sha256()
        for n in chunk_sizes(rng, stream.write_size, args.chunks):
            chunk = data_rng.randbytes(n)
            await stream.send_all(chunk)
            h.update(chunk)
            progress["sent"] += n
            await maybe_sleep(rng, 0.002)
        await stream.send_eof()
        result["sent"] = progress["sent"]
        result["sent_sha"] = h.hexdigest()

    async def receiver() -> None:
        rng = random.Random(args.seed + 1)
        h = hashlib.sha256()
        buf = bytearray(3 * stream.read_size)
        while True:
            # Drain a burst...
            for _ in range(rng.randint(1, 40)):
                want = rng.randint(1, 2 * stream.read_size)
                if rng.random() < 0.5:
                    data = await stream.receive_some(want)
                else:
                    view = memoryview(buf)[: min(want, len(buf))]
                    n = await stream.receive_into(view)
                    data = bytes(view[:n])
                if not data:
                    result["received"] = progress["received"]
                    result["received_sha"] = h.hexdigest()
                    return
                h.update(data)
                progress["received"] += len(data)
            # ...then let the writer run into a full ring.
            await trio.sleep(rng.uniform(0, 0.003))

    try:
        with trio.fail_after(args.deadline):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(receiver)
    except trio.TooSlowError:
        print(f"stalled after {args.deadline}s: {json.dumps(progress)}", file=sys.stderr,
              flush=True)
        sys.exit(3)
    await stream.aclose()
    print(json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["serve", "connect"])
    p.add_argument("store")
    p.add_argument("service")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--chunks", type=int, default=3000)
    p.add_argument("--read-min", type=int, default=1024)
    p.add_argument("--write-min", type=int, default=2048)
    p.add_argument("--deadline", type=float, default=60)
    trio.run(run, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
