"""The ping-pong both vchan benchmarks measure, over any trio stream.

``bench_vchan`` (vchan vs TCP vs Unix) and ``bench_xen`` (Xen vs local
provider) compare the same round trip, so both sides of it live here: one
end sends a fixed-size message and waits for it to come back (``ping_rtts``),
the other echoes (``echo``).
"""

from __future__ import annotations

import time

import trio


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """The next ``size`` bytes of ``stream``, however the transport splits them."""
    got = b""
    while len(got) < size:
        got += await stream.receive_some(size - len(got))
    return got


async def echo(stream: trio.abc.Stream, count: int, size: int) -> None:
    """Send back each of ``count`` messages of ``size`` bytes."""
    for _ in range(count):
        await stream.send_all(await receive_exactly(stream, size))


async def ping_rtts(stream: trio.abc.Stream, count: int, size: int) -> list[float]:
    """Round-trip times (seconds) of ``count`` messages of ``size`` bytes, one at a time."""
    msg = b"p" * size
    rtts: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        await stream.send_all(msg)
        await receive_exactly(stream, size)
        rtts.append(time.perf_counter() - t0)
    return rtts
