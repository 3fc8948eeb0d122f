"""The service that tests/test_blocking.py calls, as a process of its own.

``STORE NAME [--heartbeat S] [--tls CERT CA [ALLOW_NAME]]``: ``meshlink.serve``
on vchan (STORE), plain TCP and, with ``--tls``, TLS, all on 127.0.0.1;
prints ``ready TLS_PORT TCP_PORT``.  With ``--heartbeat S`` it pings every S
seconds and drops a connection silent for 3 S (0: neither).  Each connection that ends
with an error (a client that stopped answering, one that vanished) prints
``lost N``, N counting them; the ``sleep`` handler prints ``sleeping`` as it
starts.
"""

from __future__ import annotations

import mmap
import struct
import sys
from functools import partial
from typing import Any

import trio

import meshlink
from meshlink._native import lib
from meshlink.bus import BusConfig, Handlers, RemoteError, current_connection
from meshlink.transport.tls import TLSConfig


async def main(argv: list[str]) -> None:
    store, name, *rest = argv
    config = BusConfig()
    tls = None
    while rest:
        flag = rest.pop(0)
        if flag == "--heartbeat":
            every = float(rest.pop(0))
            if every == 0:  # no pings at all
                config = BusConfig(heartbeat_interval=None)
            else:
                config = BusConfig(heartbeat_interval=every, heartbeat_timeout=3 * every)
        elif flag == "--tls":
            cert, ca = rest.pop(0), rest.pop(0)
            allow = frozenset([rest.pop(0)]) if rest and not rest[0].startswith("--") else None
            tls = TLSConfig(cert, None, ca, allow)
    notes: list[Any] = []
    noted = trio.Event()
    cancelled = trio.Event()
    h = Handlers()

    async def echo(value: Any) -> Any:
        return value

    def fail(message: str) -> None:
        raise ValueError(message)

    slept = 0

    async def sleep(seconds: float) -> float:
        nonlocal slept
        print("sleeping", flush=True)
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            cancelled.set()
            raise
        slept += 1
        return seconds

    def sleeps_finished() -> int:
        return slept

    async def was_cancelled() -> bool:
        with trio.move_on_after(10):
            await cancelled.wait()
        return cancelled.is_set()

    async def note(value: Any) -> None:
        nonlocal noted
        notes.append(value)
        noted.set()
        noted = trio.Event()

    async def take_notes(count: int) -> list[Any]:
        while len(notes) < count:
            await noted.wait()
        taken = notes[:count]
        del notes[:count]
        return taken

    async def call_back() -> str:
        # The bus is symmetric: ask the client to serve something.
        try:
            await current_connection().call("anything", 1)
        except RemoteError as exc:
            return exc.remote_type
        return "answered"

    async def notify_back(count: int) -> int:
        conn = current_connection()
        for i in range(count):
            await conn.notify("anything", i)
        return count

    heal = trio.Event()
    corrupted = trio.Event()

    async def corrupt_my_ring() -> None:
        # A hostile server: push right.prod (docs/vchan.md section 1: offset
        # 12, the index of the ring the client reads) far past right.cons, as
        # if it had written ten rings' worth, and signal.  The reader of that
        # ring must refuse it.  Once told to (heal_rings), put the true index
        # back, as the next write would: a client that went on reading this
        # ring would then find nothing wrong.  (Test-only reach into the
        # connection: the bus hides its transport, as it should.)
        stream = current_connection()._stream
        vchan = getattr(stream, "stream", stream)  # a client without sessions: PrefixedStream
        ring = vchan._ring
        with mmap.mmap(ring.memfd, 4096) as page:
            cons, prod = struct.unpack_from("<II", page, 8)
            struct.pack_into("<I", page, 12, (cons + 10 * ring.read_size) & 0xFFFFFFFF)
            lib.ml_vchan_notify(ring._v)
            corrupted.set()
            await heal.wait()
            struct.pack_into("<I", page, 12, prod)
        await trio.sleep_forever()

    def heal_rings() -> None:
        heal.set()

    async def ring_corrupted() -> None:
        await corrupted.wait()

    for fn in (echo, fail, sleep, sleeps_finished, was_cancelled, note, take_notes, call_back,
               notify_back, corrupt_my_ring, heal_rings, ring_corrupted):
        h.add_method(fn.__name__, fn)
    async with trio.open_nursery() as nursery:
        srv = await nursery.start(partial(
            meshlink.serve, name, h, host_store=store, bind="127.0.0.1", tls=tls,
            allow_plaintext=True, config=config))
        print(f"ready {srv.tls_port} {srv.tcp_port}", flush=True)
        lost = 0
        while True:
            # Polling a counter the server keeps: there is no event for it.
            await trio.sleep(0.01)
            if srv.stats.failed != lost:
                lost = srv.stats.failed
                print(f"lost {lost}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
