"""Observability: the built-in stats method, ``meshlink stats``/``top``, Prometheus metrics.

A real server process (``meshlink serve-echo --metrics``) is called N times
by a real client process; its counters are then read over the bus by the
CLI and scraped over HTTP, parsed by prometheus_client's own parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import meshlink
from meshlink.bus import Handlers
from meshlink.metrics import metrics_address
from meshlink.stats import STATS_METHOD

prometheus_parser = pytest.importorskip("prometheus_client.parser")

NAME = "stats-svc"
N = 25


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("MESHLINK_"):
            monkeypatch.delenv(var)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
    return subprocess.run([sys.executable, "-m", "meshlink.cli", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def served(store: Path) -> Iterator[str]:
    """``serve-echo NAME --metrics 127.0.0.1:0`` in its own process, called N times
    by ``meshlink connect``; yields the metrics URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlink.cli", "serve-echo", NAME, "--host-store", str(store),
         "--metrics", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {NAME}:"), (line, proc.stderr.read()
                                                     if proc.poll() is not None else "")
        url = proc.stdout.readline().strip().removeprefix("metrics: ")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
        done = _cli("connect", NAME, "--host-store", str(store),
                    stdin="".join(f"hello {i}\n" for i in range(N)))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"HELLO {i}" for i in range(N)]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
        proc.stderr.close()


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: dict[str, float] = {}
    for fam in prometheus_parser.text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())
                                   if k != "service")
            samples[key] = s.value
    return samples


def test_stats_json_and_metrics_match_the_calls_made(served: str, store: Path) -> None:
    out = _cli("stats", NAME, "--json", "--host-store", str(store))
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["service"] == NAME
    totals = snap["totals"]
    # The N echo calls are done; our own stats call is still running when counted.
    assert totals["calls_done"] == N
    assert totals["errors"] == 0
    assert totals["messages_in"] >= N + 1 and totals["messages_out"] >= N
    assert totals["bytes_in"] > 0 and totals["bytes_out"] > 0
    assert totals["resumes"] == 0 and totals["transport_moves"] == 0
    assert snap["transports"]["vchan"] == {"open": 1, "total": 2, "refused": 0}
    [conn] = snap["connections"]  # ours: the stats client
    assert conn["transport"] == "vchan" and conn["peer"] == "meshlink-cli"
    assert conn["calls_in_flight"] == 1  # the stats call itself
    assert set(conn["ring"]) == {"readable", "free"} and conn["ring"]["free"] > 0

    # The scrape sees the same counters, the stats call now done too.
    samples = _scrape(served)
    assert samples["meshlink_calls_done_total"] == N + 1
    assert samples["meshlink_errors_total"] == 0
    assert samples["meshlink_bytes_in_total"] >= totals["bytes_in"]
    assert samples["meshlink_connections_total,transport=vchan"] == 2
    assert samples["meshlink_connections_open,transport=vchan"] == 0
    assert samples["meshlink_connections_total,transport=tls"] == 0

    # Anything but /metrics is a 404, and the counters did not move for it.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(served.replace("/metrics", "/nope"), timeout=10)
    assert err.value.code == 404
    assert _scrape(served)["meshlink_calls_done_total"] == N + 1


def test_stats_table_without_name_and_top(served: str, store: Path) -> None:
    out = _cli("stats", "--host-store", str(store))
    assert out.returncode == 0, out.stderr
    first, svc = out.stdout.splitlines()[:2]
    assert first.startswith("SERVICE/PEER")
    assert svc.split()[0] == NAME and svc.split()[1] == "vchan:1"

    out = _cli("top", NAME, "--iterations", "2", "--interval", "0.1",
               "--host-store", str(store))
    assert out.returncode == 0, out.stderr
    tables = out.stdout.split("\x1b[H\x1b[2J")
    assert tables[0] == "" and len(tables) == 3
    for table in tables[1:]:
        assert table.splitlines()[1].startswith(NAME)
        assert "meshlink-cli" in table


def test_stats_of_an_unknown_name_fails(store: Path) -> None:
    out = _cli("stats", "nobody-here", "--host-store", str(store))
    assert out.returncode == 1 and "error:" in out.stderr
    out = _cli("stats", "--host-store", str(store))
    assert out.returncode == 1 and "no live service" in out.stderr


async def test_stats_method_in_process(store: Path) -> None:
    handlers = Handlers()

    async def echo(x: Any) -> Any:
        return x

    async def boom() -> None:
        raise ValueError("no")

    handlers.add_method("echo", echo)
    handlers.add_method("boom", boom)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: meshlink.serve(
            "inproc", handlers, host_store=store, handle_sigterm=False,
            task_status=task_status))
        assert server.metrics_address is None  # nothing listens unless asked
        assert STATS_METHOD not in handlers.methods  # the caller's handlers are untouched
        async with meshlink.connect("inproc", host_store=store, client_name="t") as conn:
            for i in range(7):
                assert await conn.call("echo", i) == i
            with pytest.raises(meshlink.RemoteError):
                await conn.call("boom")
            snap = await conn.call(STATS_METHOD)
        assert snap["totals"]["calls_done"] == 8 and snap["totals"]["errors"] == 1
        [row] = snap["connections"]
        assert row["peer"] == "t" and row["transport"] == "vchan" and row["calls_done"] == 8
        assert row["messages_in"] >= 9  # 8 calls + the stats call (+ heartbeat frames)
        # Closed connections are folded into the totals, which never go back.
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.snapshot()["connections"] == []
        assert server.stats.totals()["calls_done"] == 9
        server.stop()


async def test_reserved_name_and_bad_metrics_refused(store: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    handlers = Handlers()

    async def mine() -> None:
        return None

    handlers.add_method(STATS_METHOD, mine)
    with pytest.raises(meshlink.LocalProtocolError, match="reserved"):
        await meshlink.serve("x", handlers, host_store=store)
    with pytest.raises(meshlink.LocalProtocolError, match="HOST:PORT"):
        await meshlink.serve("x", Handlers(), host_store=store, metrics="localhost:http")
    with pytest.raises(meshlink.LocalProtocolError, match="0..65535"):
        await meshlink.serve("x", Handlers(), host_store=store, metrics=70000)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(meshlink.LocalProtocolError, match=r"meshlink\[metrics\]"):
        await meshlink.serve("x", Handlers(), host_store=store, metrics=0)
    assert os.listdir(store) == []  # refused before anything was published


def test_metrics_address_forms() -> None:
    assert metrics_address("9100") == ("127.0.0.1", 9100)
    assert metrics_address(":9100") == ("127.0.0.1", 9100)
    assert metrics_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert metrics_address("[::1]:9100") == ("::1", 9100)
    assert metrics_address(("10.0.0.1", 1)) == ("10.0.0.1", 1)
