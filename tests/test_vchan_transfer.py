"""Two separate processes move data over vchan: integrity across ring wraps."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Peer

# (server read_min, server write_min) chosen to force each ring order.
ORDERS = {
    "10/11": (1024, 2048),
    "11/10": (2048, 1024),
    "12/12": (4096, 4096),
    "16/16": (1 << 16, 1 << 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("orders", list(ORDERS))
def test_256mib_random_chunks(store: Path, peers: list[Peer], orders: str) -> None:
    rmin, wmin = ORDERS[orders]
    up, down = 256 << 20, 16 << 20
    server = Peer("vchan_peer.py", "serve", str(store), "bulk", "--send", str(down),
                  "--seed", "1", "--read-min", str(rmin), "--write-min", str(wmin))
    peers.append(server)
    server.expect("ready")
    client = Peer("vchan_peer.py", "connect", str(store), "bulk", "--send", str(up),
                  "--seed", "2", "--read-min", str(wmin), "--write-min", str(rmin))
    peers.append(client)
    client.expect("connected")
    s, c = server.result(), client.result()
    # The server reads the left ring and writes the right one.
    assert (s["read_size"], s["write_size"]) == (rmin, wmin)
    assert (c["write_size"], c["read_size"]) == (rmin, wmin)
    assert c["sent"] == s["received"] == up
    assert c["sent_sha"] == s["received_sha"]
    assert s["sent"] == c["received"] == down
    assert s["sent_sha"] == c["received_sha"]
