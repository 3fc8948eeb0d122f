"""Chaos: two processes exchange 10^5 numbered notifies and calls (25,000 per
case at least, and on until the session was resumed 10 times) while the
transport under their session is cut at random moments about every 100 ms:
the vchan torn down, a TCP connection reset, the proxy in between killed and
restarted, a network namespace's link set down under TLS.
Every message must arrive exactly once and in order, and no call may run or
be answered twice (tests/helpers/session_chaos.py checks both ends)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers.connect_certs import Certs, make_certs
from .helpers.netns import ip, veth_pair

pytestmark = pytest.mark.slow

NAME = "chaos-node"
COUNT = 25_000
HELPER = [sys.executable, "-m", "tests.helpers.session_chaos"]
ROOT = Path(__file__).resolve().parent.parent


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    return {**env, **(extra or {})}


class Procs:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.started.append(proc)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    for proc in p.started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


def _exchange(client: subprocess.Popen[str], cut: Callable[[], None], seed: int) -> dict:
    """Cut every 50-150 ms until the client is done; return its verdict."""
    rng = random.Random(seed)
    deadline = time.monotonic() + 240
    cuts = 0
    while client.poll() is None:
        assert time.monotonic() < deadline, "the exchange did not finish in 240 s"
        time.sleep(rng.uniform(0.05, 0.15))  # the chaos schedule, not a synchronisation
        if client.poll() is None:
            cut()
            cuts += 1
    assert client.stdout is not None
    lines = client.stdout.read().strip().splitlines()
    assert client.returncode == 0 and lines, lines
    verdict = json.loads(lines[-1])
    verdict["cuts"] = cuts
    assert verdict["ok"], verdict
    assert verdict["resumes"] >= 10 and verdict["messages"] >= COUNT, verdict
    print("chaos verdict:", verdict)
    return verdict


def test_vchan_torn_down_again_and_again(procs: Procs, store: Path, certs: Certs) -> None:
    server, line = procs.start([*HELPER, "server", str(store), NAME, "127.0.0.1"],
                               _env(certs.env("server")))
    assert line.startswith("ready"), line
    client, line = procs.start([*HELPER, "client", str(store), NAME, str(COUNT)],
                               _env(certs.env("client")))
    assert line == "connected vchan"
    verdict = _exchange(client, lambda: server.send_signal(signal.SIGUSR1), 1)
    assert verdict["resumes"] >= 1 and verdict["sessions"] == 1


def _proxy(procs: Procs, listen: int, target: int) -> tuple[subprocess.Popen[str], int]:
    proxy, line = procs.start([sys.executable, "-m", "tests.helpers.proxy", str(listen),
                               str(target)], _env())
    assert line.startswith("ready"), line
    return proxy, int(line.split()[1])


def test_tcp_resets_and_a_proxy_killed_and_restarted(procs: Procs, store: Path,
                                                     certs: Certs) -> None:
    server, line = procs.start([*HELPER, "server", str(store), NAME, "127.0.0.1"],
                               _env(certs.env("server")))
    tcp_port = int(line.split()[2])
    # Resets: the proxy resets both of its sockets (SIGUSR1).
    proxy, port = _proxy(procs, 0, tcp_port)
    client, line = procs.start([*HELPER, "client", str(store), NAME, str(COUNT),
                                f"tcp://127.0.0.1:{port}"], _env())
    assert line == "connected tcp"
    _exchange(client, lambda: proxy.send_signal(signal.SIGUSR1), 2)
    # Killed and restarted: SIGKILL, then a new proxy on the same port.
    current = [proxy]

    def kill_and_restart() -> None:
        current[0].kill()
        current[0].wait()
        current[0] = _proxy(procs, port, tcp_port)[0]

    client, line = procs.start([*HELPER, "client", str(store), NAME, str(COUNT),
                                f"tcp://127.0.0.1:{port}"], _env())
    assert line == "connected tcp"
    _exchange(client, kill_and_restart, 3)


ADDR_A, ADDR_B = "10.213.9.1", "10.213.9.2"
needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 (CI has both)")


@pytest.fixture
def hosts() -> Iterator[tuple[str, str, str]]:
    """Two namespaces joined by a veth: (namespace A, namespace B, B's device)."""
    with veth_pair(ADDR_A, ADDR_B, "c") as h:
        yield h.a, h.b, h.dev_b


@needs_netns
def test_failover_and_upgrade_across_namespaces(procs: Procs, tmp_path: Path, certs: Certs,
                                                hosts: tuple[str, str, str]) -> None:
    """The client in namespace B shares A's host store (co-located): vchan.  The
    server withdraws vchan: the session moves to TLS over the veth.  It offers
    vchan again: the session moves back.  Calls run throughout."""
    ns_a, ns_b, _ = hosts
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    server, line = procs.start(["ip", "netns", "exec", ns_a, *HELPER, "server", str(store),
                                NAME, ADDR_A], _env(certs.env("server")))
    tls_port = int(line.split()[1])
    rules = tmp_path / "rules.toml"
    rules.write_text(f'[names]\n"{NAME}" = ["tls://{ADDR_A}:{tls_port}"]\n')
    client, line = procs.start(["ip", "netns", "exec", ns_b, *HELPER, "mover", str(store),
                                NAME, str(rules)], _env(certs.env("client")))
    assert line == "connected vchan"
    assert client.stdout is not None and server.stdout is not None
    server.send_signal(signal.SIGUSR2)
    assert server.stdout.readline().strip() == "vchan off"
    assert client.stdout.readline().strip() == "moved tls"
    server.send_signal(signal.SIGUSR2)
    assert server.stdout.readline().strip() == "vchan on"
    assert client.stdout.readline().strip() == "moved vchan"
    verdict = json.loads(client.stdout.readline())
    assert verdict["ok"] and verdict["moves"] == 2, verdict
    print("failover/upgrade verdict:", verdict)


@needs_netns
def test_tls_across_namespaces_with_the_link_set_down(procs: Procs, tmp_path: Path,
                                                      certs: Certs,
                                                      hosts: tuple[str, str, str]) -> None:
    ns_a, ns_b, dev_b = hosts
    addr_a = ADDR_A
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    store_a.mkdir(mode=0o700)
    store_b.mkdir(mode=0o700)
    server, line = procs.start(["ip", "netns", "exec", ns_a, *HELPER, "server",
                                str(store_a), NAME, addr_a], _env(certs.env("server")))
    tls_port = int(line.split()[1])
    client, line = procs.start(["ip", "netns", "exec", ns_b, *HELPER, "client",
                                str(store_b), NAME, str(COUNT),
                                f"tls://{addr_a}:{tls_port}"], _env(certs.env("client")))
    assert line == "connected tls"

    def link_down_then_up() -> None:
        # Longer than the keepalive timeout (0.4 s), so the session must
        # notice a silent link, not just ride out TCP retransmissions.
        ip("-n", ns_b, "link", "set", dev_b, "down")
        time.sleep(0.6)  # the length of the outage, not a synchronisation
        ip("-n", ns_b, "link", "set", dev_b, "up")

    verdict = _exchange(client, link_down_then_up, 4)
    assert verdict["resumes"] >= 1
