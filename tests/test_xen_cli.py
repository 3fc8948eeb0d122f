"""meshlink.cli.vchan (xencat-like) and provider selection: help and exit
codes, CLI <-> CLI over the emulated Xen and over the host store, CLI <->
libxenvchan, and the clear error when Xen is forced where there is none."""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from .xenemu.fixtures import PEER_DOMID, PY_DOMID, XenHost, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]

CLI = [sys.executable, "-m", "meshlink.cli.vchan"]


def no_xen_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("MESHLINK_XEN_LIBDIR", "XENEMU_DIR", "XENEMU_DOMID", "MESHLINK_PROVIDER"):
        env.pop(var, None)
    return env


def xen_libraries_load() -> bool:
    """Whether the dynamic loader finds the first Xen library the provider opens."""
    try:
        ctypes.CDLL("libxenevtchn.so.1")
    except OSError:
        return False
    return True


def test_help_and_usage_errors() -> None:
    out = subprocess.run([*CLI, "server", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--domid" in out.stdout and "--xen" in out.stdout
    out = subprocess.run(CLI, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr
    out = subprocess.run([*CLI, "client", "--domid", "x", "--path", "p"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "not a domain id" in out.stderr


@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="this machine runs Xen")
def test_forcing_xen_without_xen_is_a_clear_error() -> None:
    env = no_xen_env()
    out = subprocess.run([*CLI, "client", "--xen", "--domid", "0", "--path", "p"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert "Xen provider unavailable" in out.stderr
    # What is missing depends on the machine: the Xen libraries (a bare
    # Python + gcc machine: name the library and its Debian package), or,
    # with them installed, the Xen device.
    if xen_libraries_load():
        assert "/dev/xen" in out.stderr, out.stderr
    else:
        assert "libxenevtchn.so.1" in out.stderr and "libxenevtchn1" in out.stderr, out.stderr
    # The environment variable forces it too; the default stays local.
    code = ("import meshlink.transport.vchan.xen as x\n"
            "assert x.select_provider() == 'local'\n"
            "import os; os.environ['MESHLINK_PROVIDER'] = 'xen'\n"
            "try:\n    x.select_provider()\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ProviderUnavailable Xen provider unavailable")


def test_missing_xen_libraries_are_named() -> None:
    env = {**no_xen_env(), "MESHLINK_XEN_LIBDIR": "/nonexistent"}
    code = ("import meshlink\nfrom meshlink.transport.vchan.xen import require_xen\n"
            "try:\n    require_xen()\nexcept meshlink.ProviderUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert "libxenevtchn.so.1" in out.stdout and "libxenevtchn1" in out.stdout, out


def run_pair(server: list[str], client: list[str], env_s: dict[str, str],
             env_c: dict[str, str], data_s: bytes, data_c: bytes) -> tuple[bytes, bytes]:
    s = subprocess.Popen([*CLI, "server", *server], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_s)
    c = subprocess.Popen([*CLI, "client", "--wait", "30", *client], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_c)
    try:
        # communicate() feeds stdin, closes it (EOF -> half-close), reads all.
        import threading

        res: dict[str, tuple[bytes, bytes]] = {}
        t = threading.Thread(target=lambda: res.setdefault("s", s.communicate(data_s, 60)))
        t.start()
        out_c, err_c = c.communicate(data_c, 60)
        t.join(60)
        out_s, err_s = res["s"]
        assert s.returncode == 0, err_s.decode()
        assert c.returncode == 0, err_c.decode()
        return out_s, out_c
    finally:
        for p in (s, c):
            if p.poll() is None:
                p.kill()


def test_cli_to_cli_over_emulated_xen(xen_host: XenHost) -> None:
    a = random.Random(1).randbytes(3 << 20)
    b = random.Random(2).randbytes(1 << 20)
    out_s, out_c = run_pair(
        ["--xen", "--domid", str(PEER_DOMID), "--path", "demo"],
        ["--xen", "--domid", str(PY_DOMID), "--path", "demo"],
        xen_host.env(PY_DOMID), xen_host.env(PEER_DOMID), a, b)
    assert out_c == a and out_s == b


def test_cli_to_cli_local(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    common = ["--local", "--host-store", str(store), "--path", "/x/y"]
    a, b = b"hello from the server\n" * 1000, b"and from the client\n"
    out_s, out_c = run_pair(["--domid", "1", *common], ["--domid", "0", *common],
                            no_xen_env(), no_xen_env(), a, b)
    assert out_c == a and out_s == b


def test_cli_client_against_libxenvchan_server(xen_host: XenHost) -> None:
    size = 2 << 20
    path = xen_host.path(PEER_DOMID, PY_DOMID)
    peer = xen_host.peer("server", str(PY_DOMID), path, "stream", "--send", str(size),
                         "--expect", "6")
    peer.expect_ready()
    # stdin stays open until the server's data is in: libxenvchan stops
    # writing once our live byte drops, which is what EOF on stdin does.
    c = subprocess.Popen([*CLI, "client", "--xen", "--domid", str(PEER_DOMID), "--path", path],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **xen_host.env(PY_DOMID)})
    assert c.stdin is not None and c.stdout is not None
    c.stdin.write(b"hello\n")
    c.stdin.flush()
    out = b""
    while len(out) < size and (chunk := c.stdout.read1(1 << 16)):
        out += chunk
    c.stdin.close()  # now half-close: libxenvchan already wrote everything
    out += c.stdout.read()
    assert c.wait(60) == 0, c.stderr.read() if c.stderr else b""
    theirs = peer.result()
    assert len(out) == size and zlib.crc32(out) == theirs["sent_crc"]
    assert theirs["recv_crc"] == zlib.crc32(b"hello\n")
