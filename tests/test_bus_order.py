"""The ordering of notifications and calls on one bus connection.

The guarantee (docs/bus-wire.md, "Ordering"): a call's handler starts only
after the handlers of every notification sent before it on that connection
have returned; calls still run concurrently with each other, and a
notification sent after a call does not wait for that call.
"""

from __future__ import annotations

import contextvars
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from meshlink import ConnectionLost
from meshlink.bus import BusConfig, Connection, Handlers, RemoteError
from meshlink.bus.connection import CURRENT

TRIALS = 200
NOTIFIES = 300

#: Set by a notify handler; a call handler must never see it (handlers do not
#: share a context with the notify runner that started them).
LEAK: contextvars.ContextVar[str] = contextvars.ContextVar("test_bus_order_leak")


def _pair(kind: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


@asynccontextmanager
async def _connected(
    kind: str, handlers: Handlers, config: BusConfig | None = None
) -> AsyncIterator[tuple[Connection, Connection]]:
    """(client, server): the server serves ``handlers``; both close at the end."""
    a, b = _pair(kind)
    async with trio.open_nursery() as nursery:
        server_conn: list[Connection] = []
        server_up = trio.Event()
        done = trio.Event()

        async def server() -> None:
            async with Connection.open(b, handlers, name="srv", config=config) as s:
                server_conn.append(s)
                server_up.set()
                await done.wait()

        nursery.start_soon(server)
        async with Connection.open(a, name="client", config=config) as client:
            await server_up.wait()
            try:
                yield client, server_conn[0]
            finally:
                done.set()


@pytest.mark.parametrize("kind", ["memory", "socketpair"])
async def test_call_starts_after_every_earlier_notification(kind: str) -> None:
    returned = 0  # notify handlers that have returned
    violations: list[tuple[int, int]] = []
    conns: list[Connection] = []

    async def note(i: int) -> None:
        nonlocal returned
        LEAK.set("notify")
        # Awaits inside: the runner must not start the call while this is parked.
        await trio.lowlevel.checkpoint()
        if i % 7 == 0:
            await trio.lowlevel.checkpoint()
        returned += 1

    async def check(expected: int) -> list[Any]:
        if returned != expected:
            violations.append((expected, returned))
        return [returned, CURRENT.get() is conns[0], LEAK.get("unset")]

    handlers = Handlers()
    handlers.add_method("note", note)
    handlers.add_method("check", check)
    async with _connected(kind, handlers) as (client, server):
        conns.append(server)
        with trio.fail_after(120):
            for trial in range(TRIALS):
                for i in range(NOTIFIES):
                    await client.notify("note", i)
                expected = (trial + 1) * NOTIFIES
                got, current_ok, leak = await client.call("check", expected)
                assert current_ok, "CURRENT is not the serving connection in a call handler"
                assert leak == "unset", "a notify handler's context leaked into a call handler"
    # All trials run before the verdict, so a failure says how often it happened.
    assert violations == [], (
        f"{len(violations)} of {TRIALS} calls started before every earlier notification"
        f" had run (expected, returned): {violations[:5]}"
    )


class _Gate:
    """Server handlers: a ``gate`` notification that holds the notify runner
    until released, and calls that record whether they ran."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        self.ran: list[str] = []
        self.b_started = trio.Event()
        self.marked = trio.Event()
        self.block_started = trio.Event()
        self.unblock = trio.Event()
        self.handlers = Handlers()
        for name in ("gate", "work", "a", "b", "mark", "block", "ping"):
            self.handlers.add_method(name, getattr(self, "_" + name))

    async def _gate(self) -> None:
        self.entered.set()
        await self.release.wait()

    async def _work(self) -> str:
        self.ran.append("work")
        return "worked"

    async def _a(self) -> str:
        # Runs concurrently with b: waits for b, which was queued after it.
        await self.b_started.wait()
        return "a"

    async def _b(self) -> str:
        self.b_started.set()
        return "b"

    async def _mark(self) -> None:
        self.marked.set()

    async def _block(self) -> str:
        self.block_started.set()
        await self.unblock.wait()
        return "unblocked"

    async def _ping(self) -> str:
        return "pong"


async def _queued_behind_gate(
    client: Connection, server: Connection, gate: _Gate, call: Callable[[], Any]
) -> None:
    """Hold the server's notify runner in ``gate``, then make ``call`` (in the
    caller's nursery) and wait until its request sits at the server."""
    await client.notify("gate")
    await gate.entered.wait()
    call()
    await trio.testing.wait_all_tasks_blocked()
    assert server._proto.requests_in_flight >= 1


async def test_calls_queued_behind_a_notification_still_run_concurrently() -> None:
    gate = _Gate()
    results: dict[str, str] = {}
    async with _connected("memory", gate.handlers) as (client, server):
        async with trio.open_nursery() as nursery:

            async def call(name: str) -> None:
                results[name] = await client.call(name)

            await _queued_behind_gate(client, server, gate, lambda: nursery.start_soon(call, "a"))
            nursery.start_soon(call, "b")
            await trio.testing.wait_all_tasks_blocked()
            assert results == {} and not gate.b_started.is_set()
            gate.release.set()
    assert results == {"a": "a", "b": "b"}


async def test_cancelling_a_queued_call_answers_it_and_never_runs_it() -> None:
    gate = _Gate()
    async with _connected("memory", gate.handlers) as (client, server):
        slots = client._rpc.call_slots.value
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()

            async def call() -> None:
                with cancelled:
                    await client.call("work")

            await _queued_behind_gate(client, server, gate, lambda: nursery.start_soon(call))
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
        # Answered while the notify runner is still held: slot free on both ends.
        assert server._proto.requests_in_flight == 0
        assert client._rpc.call_slots.value == slots
        assert server._rpc.served_errors == 1
        gate.release.set()
        assert await client.call("ping") == "pong"  # runs after the gate returned
        assert gate.ran == []  # the cancelled handler never ran


async def test_many_cancelled_queued_calls_stay_bounded() -> None:
    """Requests cancelled while queued leave no growing residue."""
    gate = _Gate()
    async with _connected("memory", gate.handlers) as (client, server):
        await client.notify("gate")
        await gate.entered.wait()
        for _ in range(500):
            async with trio.open_nursery() as nursery:
                cancel = trio.CancelScope()

                async def call(cancel: trio.CancelScope = cancel) -> None:
                    with cancel:
                        await client.call("work")

                nursery.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                cancel.cancel()
            await trio.testing.wait_all_tasks_blocked()
        assert server._proto.requests_in_flight == 0
        assert len(server._rpc.notify_queue) < 200  # the dead entries were compacted
        gate.release.set()
        assert await client.call("ping") == "pong"
        assert gate.ran == []


async def test_close_with_queued_calls_fails_them_like_running_ones() -> None:
    gate = _Gate()
    errors: list[BaseException] = []
    async with _connected("memory", gate.handlers) as (client, server):
        async with trio.open_nursery() as nursery:

            async def call(name: str) -> None:
                try:
                    await client.call(name)
                except (ConnectionLost, trio.ClosedResourceError, RemoteError) as exc:
                    errors.append(exc)

            nursery.start_soon(call, "block")  # in flight, running
            await gate.block_started.wait()
            await _queued_behind_gate(
                client, server, gate, lambda: nursery.start_soon(call, "work")
            )
            await server.aclose()  # the server ends with one call running, one queued
    assert len(errors) == 2
    assert all(isinstance(e, ConnectionLost) for e in errors), errors
    assert gate.ran == []


async def test_notification_after_a_call_does_not_wait_for_it() -> None:
    gate = _Gate()
    async with _connected("memory", gate.handlers) as (client, server):
        async with trio.open_nursery() as nursery:
            result: list[str] = []

            async def call() -> None:
                result.append(await client.call("block"))

            nursery.start_soon(call)
            await gate.block_started.wait()
            await client.notify("mark")
            with trio.fail_after(10):  # fails, rather than hangs, if mark waits for block
                await gate.marked.wait()
            assert result == []
            gate.unblock.set()
    assert result == ["unblocked"]
