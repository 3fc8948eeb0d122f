"""XenStore paths of a vchan as libxenvchan reads them: absolute, relative to
our own domain's home, or (one word only) a port name under the conventional
data/vchan/<client>/ directory.  Checked against the real libxenvchan over the
emulated Xen (tests/xenemu)."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import trio

from meshlink import LocalProtocolError
from meshlink.transport.vchan.xen import XenVchanServer, connect_xen_vchan, resolve_xs_path

from .xenemu.fixtures import PEER_DOMID, PY_DOMID, XenHost, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]

CLI = [sys.executable, "-m", "meshlink.cli.vchan"]


def test_resolve_xs_path_rules() -> None:
    kw = {"own": 3, "server_domid": 3, "client_domid": 8}
    assert resolve_xs_path("/local/domain/0/x", **kw) == "/local/domain/0/x"
    # Relative: under our own home, as XenStore reads it for libxenvchan.
    assert resolve_xs_path("data/vchan/0/9", **kw) == "/local/domain/3/data/vchan/0/9"
    # One word: the port name form.
    assert resolve_xs_path("demo", **kw) == "/local/domain/3/data/vchan/8/demo"
    client = {"own": 8, "server_domid": 3, "client_domid": 8}
    assert resolve_xs_path("demo", **client) == "/local/domain/3/data/vchan/8/demo"
    assert resolve_xs_path("a/b", **client) == "/local/domain/8/a/b"
    for bad in ("", "/", "a//b", "a/", "a/../b", "a b", "x" * 401, "a/./b", "a.b"):
        with pytest.raises(LocalProtocolError):
            resolve_xs_path(bad, **kw)


def xs_read(path: str) -> str | None:
    from meshlink._native import ffi, lib

    xs = lib.ml_xs_open()
    try:
        buf = ffi.new("char[64]")
        n = lib.ml_xs_read(xs, 0, path.encode(), buf, 64)
        return None if n < 0 else ffi.string(buf, n).decode()
    finally:
        lib.ml_xs_close(xs)


async def test_relative_path_lands_where_libxenvchan_puts_it(xen_host: XenHost) -> None:
    # libxenvchan's server, in domain 2, with a relative path...
    peer = xen_host.peer("server", str(PY_DOMID), "data/vchan/1/rel", "stream", "--send", "5",
                         "--hold")
    await trio.to_thread.run_sync(peer.expect_ready)
    assert xs_read(f"/local/domain/{PEER_DOMID}/data/vchan/{PY_DOMID}/rel/ring-ref")
    stream = await connect_xen_vchan(PEER_DOMID, f"/local/domain/{PEER_DOMID}/data/vchan/1/rel")
    assert (await trio.to_thread.run_sync(peer.readline_json))["sent"] == 5
    assert len(await stream.receive_some()) > 0
    await stream.aclose()
    peer.kill()
    # ...and ours, in domain 1, with the same kind of path: the same rule.
    server = await XenVchanServer.publish(PEER_DOMID, "data/vchan/2/rel")
    try:
        assert server.xs_path == f"/local/domain/{PY_DOMID}/data/vchan/{PEER_DOMID}/rel"
        assert xs_read(f"{server.xs_path}/ring-ref")
        # Not under data/vchan/<client>/ as the port-name form would have it.
        assert xs_read(f"/local/domain/{PY_DOMID}/data/vchan/{PEER_DOMID}/data") is None
    finally:
        await server.aclose()


def test_cli_server_relative_path_against_libxenvchan_client(xen_host: XenHost) -> None:
    """``meshlink vchan server --xen --path data/vchan/0/9`` publishes at
    /local/domain/<self>/data/vchan/0/9, where a libxenvchan client finds it."""
    size = 100_000
    s = subprocess.Popen([*CLI, "server", "--xen", "--domid", str(PEER_DOMID), "--path",
                          "data/vchan/0/9"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, **xen_host.env(PY_DOMID)})
    try:
        peer = xen_host.peer("client", str(PY_DOMID), f"/local/domain/{PY_DOMID}/data/vchan/0/9",
                             "stream", "--send", str(size), "--expect", "6")
        assert s.stdin is not None and s.stdout is not None
        s.stdin.write(b"hello\n")
        s.stdin.flush()
        out = b""
        while len(out) < size and (chunk := s.stdout.read1(1 << 16)):
            out += chunk
        s.stdin.close()
        out += s.stdout.read()
        assert s.wait(60) == 0, s.stderr.read() if s.stderr else b""
        theirs = peer.result()
        assert len(out) == size and zlib.crc32(out) == theirs["sent_crc"]
        assert theirs["recv_crc"] == zlib.crc32(b"hello\n")
    finally:
        if s.poll() is None:
            s.kill()
            s.communicate()
