"""Two processes hammer the vchan notify/arm/re-check path in both directions.

Each side is tests/helpers/stress_vchan_peer.py: many small transfers with
random chunk sizes and random short sleeps, while its reader alternates
between draining and sleeping, over small rings so that "ring full" and
"ring empty" (and so every arm, re-check and notify) happen thousands of
times.  A lost wakeup would stall a side: each peer bounds its own run with
trio.fail_after and reports the bytes it reached, and the test bounds the
whole exchange too.  Checksums of both directions must match.

native/sanitize-tests.sh runs this file against the ASan+UBSan build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from .conftest import Peer

# (server read_min, server write_min): in-page rings (orders 10/11 and
# 11/10), one page each, and a lopsided pair.
RINGS = {"10/11": (1024, 2048), "11/10": (2048, 1024), "12/12": (4096, 4096),
         "11/14": (2048, 1 << 14)}
CHUNKS = 6000
DEADLINE = 45  # per peer; the test's own bound is a little longer


async def _finish(peer: Peer) -> dict[str, object]:
    """Wait for a peer without blocking trio; its JSON result line."""
    def wait() -> tuple[str, str]:
        return peer.proc.communicate()

    out, err = await trio.to_thread.run_sync(wait, abandon_on_cancel=True)
    assert peer.proc.returncode == 0, f"peer failed ({peer.proc.returncode}):\n{err}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("rings", list(RINGS))
async def test_stress_both_directions(store: Path, peers: list[Peer], rings: str) -> None:
    rmin, wmin = RINGS[rings]
    seed = list(RINGS).index(rings) * 10 + 1
    common = ["--chunks", str(CHUNKS), "--deadline", str(DEADLINE)]
    server = Peer("stress_vchan_peer.py", "serve", str(store), "stress", "--seed", str(seed),
                  "--read-min", str(rmin), "--write-min", str(wmin), *common)
    peers.append(server)
    await trio.to_thread.run_sync(server.expect, "ready")
    client = Peer("stress_vchan_peer.py", "connect", str(store), "stress",
                  "--seed", str(seed + 1), "--read-min", str(wmin), "--write-min", str(rmin),
                  *common)
    peers.append(client)
    try:
        with trio.fail_after(DEADLINE + 15):
            await trio.to_thread.run_sync(client.expect, "connected", abandon_on_cancel=True)
            s = await _finish(server)
            c = await _finish(client)
    except trio.TooSlowError:
        for p in peers:
            p.proc.kill()
        raise
    assert (s["read_size"], s["write_size"]) == (rmin, wmin)
    assert (c["read_size"], c["write_size"]) == (wmin, rmin)
    assert c["sent"] == s["received"] and c["sent_sha"] == s["received_sha"]
    assert s["sent"] == c["received"] and s["sent_sha"] == c["received_sha"]
    # Many ring-fulls each way, or the test did not exercise what it claims.
    assert int(s["received"]) > 20 * rmin and int(c["received"]) > 20 * wmin

