"""A disk served in one network namespace, opened by name from another through zeroconf.

``meshlink.disk.serve(..., service=, zeroconf=)`` and ``meshlink disk serve
--zeroconf`` advertise ``SERVICE.nbd`` on the test veth only (the namespaces
and addresses of :mod:`tests.test_connect_netns`); ``meshlink.disk.open``
in the other namespace, with its own host store, finds the TLS endpoint,
writes, flushes and reads back.  Stopping the server withdraws the record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers.connect_certs import Certs, make_certs
from .helpers.netns import Hosts as Pair
from .test_connect_netns import ADDR_A, ADDR_B, HELPERS, _env, pair, procs

__all__ = ["pair", "procs"]  # fixtures shared with the connect tests

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (CI has both)"),
]

NAME = "storage-node"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), NAME)


def _in(pair: Pair, ns: str, *args: str) -> list[str]:
    return pair.cmd(ns, sys.executable, *args)


def _open_from_b(pair: Pair, certs: Certs, store_b: Path) -> dict[str, object]:
    out = subprocess.run(
        _in(pair, pair.b, str(HELPERS / "disk_zeroconf.py"), "open", ADDR_B, str(store_b),
            certs.client, certs.ca),
        capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def _lookup_from_b(pair: Pair) -> object:
    out = subprocess.run(
        _in(pair, pair.b, str(HELPERS / "connect_zeroconf.py"), "lookup", ADDR_B, NAME + ".nbd"),
        capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_python_serve_advertises_and_open_finds_it_over_tls(
    pair: Pair, certs: Certs, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    server = subprocess.Popen(
        _in(pair, pair.a, str(HELPERS / "disk_zeroconf.py"), "serve", ADDR_A,
            str(tmp_path / "store-a"), certs.server, certs.ca),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env())
    procs.append(server)
    assert server.stdout is not None and server.stdin is not None
    line = server.stdout.readline()
    assert line.strip() == "ready", server.stderr and server.stderr.read()

    result = _open_from_b(pair, certs, tmp_path / "store-b")
    urls = result["urls"]
    assert isinstance(urls, list) and len(urls) == 1
    assert urls[0].startswith(f"tls://{ADDR_A}:")  # TLS required: no tcp endpoint offered
    assert result == {"urls": urls, "size": 4 << 20, "same": True, "again": True}

    server.stdin.close()
    assert server.stdout.readline().strip() == "gone"
    assert server.wait(timeout=30) == 0
    assert _lookup_from_b(pair) == []  # withdrawn: the goodbye was heard


def test_cli_serve_zeroconf_several_disks(
    pair: Pair, certs: Certs, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    server = subprocess.Popen(
        _in(pair, pair.a, "-m", "meshlink.cli", "disk", "serve", NAME,
            "--disk", "disk0:memory:size=4M", "--disk", "disk1:null:size=1M", "--nbd",
            "--listen", f"{ADDR_A}:0", "--tls", "required", "--tls-cert", certs.server,
            "--tls-key", certs.server, "--tls-ca", certs.ca, "--zeroconf", ADDR_A),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    procs.append(server)
    assert server.stdout is not None
    lines = [server.stdout.readline().strip() for _ in range(3)]
    assert lines[0].startswith(f"ready nbd://{ADDR_A}:"), server.stderr and server.stderr.read()
    assert lines[0].endswith("/disk0") and lines[1].endswith("/disk1")
    port = lines[0].split(":")[2].split("/")[0]
    assert lines[2] == f"advertised {NAME}.nbd on zeroconf: tls://{ADDR_A}:{port}"

    result = _open_from_b(pair, certs, tmp_path / "store-b")
    assert result["urls"] == [f"tls://{ADDR_A}:{port}"]
    assert result["same"] is True and result["again"] is True

    server.terminate()
    assert server.wait(timeout=30) == 0  # SIGTERM: a clean stop, the record withdrawn
    assert _lookup_from_b(pair) == []
