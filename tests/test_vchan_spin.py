"""How long a vchan reader spins: not for a slow peer, again once it is quick.

The spin policy (``VchanStream._read_spin_budget``) decides what a loaded
machine pays: a reader that spins while its peer takes milliseconds takes the
CPU that peer needs.  These tests drive a real pair through a host store, with
the peer's think time as the thing under test, and read the policy's budget.
"""

from __future__ import annotations

from pathlib import Path

import trio

from meshlink.transport.vchan.stream import MAX_READ_SPIN, PROBE_EVERY, VchanStream

from .test_vchan import vchan_pair

SLOW = 0.002  # the peer's think time: well beyond MAX_READ_SPIN


async def _exchange(reader: VchanStream, peer: VchanStream, think: float, count: int) -> None:
    """``count`` requests from ``reader``; ``peer`` answers each after ``think`` seconds."""

    async def answer() -> None:
        for _ in range(count):
            assert await peer.receive_some(1) == b"q"
            if think:
                await trio.sleep(think)
            await peer.send_all(b"a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        for _ in range(count):
            await reader.send_all(b"q")
            assert await reader.receive_some(1) == b"a"


async def test_no_spin_for_a_slow_peer_but_a_probe(store: Path) -> None:
    client, server = await vchan_pair(store)
    async with client, server:
        await _exchange(client, server, SLOW, 12)
        assert client._read_wait_avg > MAX_READ_SPIN
        budgets = [client._read_spin_budget() for _ in range(2 * PROBE_EVERY)]
        # Two probes in 2 x PROBE_EVERY waits, none of them longer than the cap.
        assert sum(1 for b in budgets if b) == 2, budgets
        assert max(budgets) <= MAX_READ_SPIN


async def test_a_peer_quick_again_is_spun_for_again(store: Path) -> None:
    client, server = await vchan_pair(store)
    async with client, server:
        await _exchange(client, server, SLOW, 12)
        assert client._read_wait_avg > MAX_READ_SPIN
        await _exchange(client, server, 0, 8 * PROBE_EVERY)
        assert client._read_wait_avg <= MAX_READ_SPIN
        assert client._read_spin_budget() > 0
