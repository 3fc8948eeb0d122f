"""The handler set the bus tests serve, in-process or from a peer process.

Test-only module: the per-process dictionaries below hold what handlers
observed (started, cancelled), keyed by a per-test string.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from meshlink.bus import Handlers, MessageStream, current_connection


class Observations:
    """Events the handlers set, so tests synchronise without sleeping."""

    def __init__(self) -> None:
        self.started: dict[str, trio.Event] = {}
        self.cancelled: dict[str, trio.Event] = {}
        self.notes: list[Any] = []
        self.notes_changed = trio.Event()

    def event(self, table: dict[str, trio.Event], key: str) -> trio.Event:
        if key not in table:
            table[key] = trio.Event()
        return table[key]


def make_handlers(obs: Observations | None = None) -> Handlers:
    obs = obs or Observations()
    h = Handlers()

    @h.method
    async def add(a: int, b: int) -> int:
        return a + b

    @h.method
    async def echo(*args: Any) -> list[Any]:
        return list(args)

    @h.method
    async def fail(kind: str, message: str) -> None:
        exc = {"KeyError": KeyError, "ValueError": ValueError}[kind]
        raise exc(message)

    @h.method
    async def unpackable() -> object:
        return object()

    @h.method
    async def block(key: str) -> None:
        obs.event(obs.started, key).set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            obs.event(obs.cancelled, key).set()
            raise

    @h.method
    async def wait_started(key: str) -> bool:
        await obs.event(obs.started, key).wait()
        return True

    @h.method
    async def wait_cancelled(key: str) -> bool:
        await obs.event(obs.cancelled, key).wait()
        return True

    @h.method
    async def note(value: Any) -> None:
        obs.notes.append(value)
        obs.notes_changed.set()
        obs.notes_changed = trio.Event()

    @h.method
    async def notes(count: int) -> list[Any]:
        while len(obs.notes) < count:
            await obs.notes_changed.wait()
        taken = obs.notes[:count]
        del obs.notes[:count]
        return taken

    @h.method
    async def publish_n(topic: str, count: int, size: int = 0) -> int:
        conn = current_connection()
        pad = b"x" * size
        for i in range(count):
            await conn.publish(topic, [i, pad] if size else i)
        return count

    @h.method
    async def pid() -> int:
        return os.getpid()

    @h.stream
    async def echo_stream(stream: MessageStream, factor: int) -> None:
        async for message in stream:
            await stream.send(message * factor)

    @h.stream
    async def sink(stream: MessageStream) -> None:
        total = 0
        count = 0
        async for message in stream:
            total += len(message)
            count += 1
        await stream.send([count, total])

    @h.stream
    async def source(stream: MessageStream, count: int, size: int) -> None:
        chunk = b"y" * size
        for _ in range(count):
            await stream.send(chunk)

    @h.stream
    async def broken_stream(stream: MessageStream) -> None:
        await stream.send("first")
        raise ValueError("stream handler failed")

    @h.stream
    async def stream_block(stream: MessageStream, key: str) -> None:
        await block(key)

    return h
