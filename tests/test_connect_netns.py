"""Two hosts on one machine: network namespaces joined by a veth pair.

Namespace A runs the server (its own host store, TLS and zeroconf restricted
to the veth); a client in namespace B, with another host store, must get TLS
over the link, and a client sharing A's host store must get vchan.  mDNS only
ever travels on the test veth (both ends are in private namespaces); the
addresses 10.213.7.0/24 exist only on it.  Everything is created and deleted
by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlink import connect

from .helpers.connect_certs import Certs, make_certs
from .helpers.netns import Hosts, veth_pair

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (CI has both)"),
]

HELPERS = Path(__file__).parent / "helpers"
NAME = "storage-node"
ADDR_A, ADDR_B = "10.213.7.1", "10.213.7.2"


@pytest.fixture
def pair() -> Iterator[Hosts]:
    with veth_pair(ADDR_A, ADDR_B) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
    return {**env, **(extra or {})}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def _cli(pair: Hosts, ns: str, *args: str, env: dict[str, str] | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pair.cmd(ns, sys.executable, "-m", "meshlink.cli", *args),
                          capture_output=True, text=True, timeout=60, env=_env(env), input=stdin)


async def test_remote_client_gets_tls_over_the_veth_colocated_gets_vchan(
    pair: Hosts, certs: Certs, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"
    server = subprocess.Popen(
        pair.cmd(pair.a, sys.executable, "-m", "meshlink.cli", "serve-echo", NAME,
                 "--host-store", str(store_a), "--bind", ADDR_A, "--zeroconf", ADDR_A,
                 "--allow-name", "client-1", "--tcp"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(certs.env("server")))
    procs.append(server)
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith(f"serving {NAME}:"), server.stderr and server.stderr.read()
    assert f"tls://{ADDR_A}:" in line and f"tcp://{ADDR_A}:" in line

    # another host (namespace B, its own host store): found by zeroconf, TLS over the link
    zc = ["--host-store", str(store_b), "--zeroconf", ADDR_B]
    out = _cli(pair, pair.b, "connect", NAME, *zc, env=certs.env("client"),
               stdin="hello from domU\nsecond line\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["HELLO FROM DOMU", "SECOND LINE"]
    assert f"over tls (tls://{ADDR_A}:" in out.stderr

    why = _cli(pair, pair.b, "resolve", NAME, "--explain", *zc, env=certs.env("client"))
    assert why.returncode == 0, why.stderr
    first = why.stdout.splitlines()[0]
    assert first.startswith(f"1. tls://{ADDR_A}:")
    assert "not co-located" in why.stdout  # the advertised vchan endpoint, rejected

    # a client whose certificate name is not allowed is refused
    bad = _cli(pair, pair.b, "call", NAME, "echo", "x", *zc, "--require-tls",
               env=certs.env("other_client"))
    assert bad.returncode == 1 and "error:" in bad.stderr

    # a client sharing namespace A's host store: co-located, vchan
    async with connect(NAME, host_store=store_a, zeroconf=False) as conn:
        assert conn.transport == "vchan"
        assert await conn.call("echo", "hello from dom0") == "HELLO FROM DOM0"

    server.terminate()
    assert server.wait(timeout=30) == 0
    assert list(store_a.iterdir()) == []


def test_zeroconf_register_browse_withdraw_on_the_veth(
    pair: Hosts, procs: list[subprocess.Popen[str]]
) -> None:
    helper = str(HELPERS / "connect_zeroconf.py")
    reg = subprocess.Popen(
        pair.cmd(pair.a, sys.executable, helper, "register", ADDR_A, "zc-svc", "host-a", "7001"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env())
    procs.append(reg)
    assert reg.stdout is not None and reg.stdin is not None
    assert reg.stdout.readline().strip() == "ready"

    def helper_json(*args: str) -> object:
        out = subprocess.run(pair.cmd(pair.b, sys.executable, helper, *args),
                             capture_output=True, text=True, timeout=60, env=_env())
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert helper_json("browse", ADDR_B) == [
        {"name": "zc-svc", "transports": ["vchan", "tls"], "addresses": [ADDR_A], "tls": 7001}]
    assert helper_json("lookup", ADDR_B, "zc-svc") == [
        {"url": "vchan://host-store/zc-svc", "host_id": "host-a", "fp": None},
        {"url": f"tls://{ADDR_A}:7001", "host_id": "host-a", "fp": "ab" * 32}]
    assert helper_json("lookup", ADDR_B, "no-such") == []
    reg.stdin.close()
    assert reg.stdout.readline().strip() == "gone"
    assert reg.wait(timeout=30) == 0
    assert helper_json("lookup", ADDR_B, "zc-svc") == []  # the goodbye was heard
