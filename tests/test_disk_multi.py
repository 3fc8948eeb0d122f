"""One process serving several disks, over the blk ring and NBD at once.

``meshlink.disk.serve({"a": ..., "b": ...})`` and ``meshlink disk serve
SERVICE --disk ... --disk ...`` serve every disk on both transports, each
with its own size and contents; bad tables (duplicate names, mixed forms,
zeroconf where nothing can be advertised) are refused before anything is
served or created.
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
import trio

from meshlink import LocalProtocolError
from meshlink.disk import BlkDisk, FileBackend, MemoryBackend, NullBackend, list_exports, serve
from meshlink.disk import open as open_disk
from meshlink.disk.advertise import nbd_advertisement
from meshlink.disk.nbd import open_listeners
from resolver import ZeroconfConfig

A_SIZE, B_SIZE = 1 << 20, 3 << 20


async def _check_both(sock: str, store: Path, service: str) -> None:
    """Disk a and b: written over one transport, read over the other, sizes as served."""
    pattern_a, pattern_b = os.urandom(8192), os.urandom(8192)
    async with open_disk(f"{service}/a", host_store=store) as blk_a, \
            open_disk(f"{service}/b", host_store=store) as blk_b:
        assert isinstance(blk_a, BlkDisk) and isinstance(blk_b, BlkDisk)
        assert (blk_a.size, blk_b.size) == (A_SIZE, B_SIZE)
        await blk_a.write(4096, pattern_a)
        await blk_a.flush()
    async with open_disk(f"nbd+unix:///a?socket={sock}") as nbd_a, \
            open_disk(f"nbd+unix:///b?socket={sock}") as nbd_b:
        assert (nbd_a.size, nbd_b.size) == (A_SIZE, B_SIZE)
        assert await nbd_a.read(4096, 8192) == pattern_a
        await nbd_b.write(B_SIZE - 8192, pattern_b)
        await nbd_b.flush()
        assert await nbd_b.read(4096, 8192) == bytes(8192)  # a's write went to a only
    async with open_disk(f"{service}/b", host_store=store) as blk_b:
        assert await blk_b.read(B_SIZE - 8192, 8192) == pattern_b


async def test_python_serve_mapping_on_both_transports(store: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    backend_b = FileBackend(str(tmp_path / "b.img"), size=B_SIZE)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(
            {"a": MemoryBackend(A_SIZE), "b": backend_b}, f"unix:{sock}", service="multi",
            host_store=store, zeroconf=False, task_status=task_status))
        assert sorted(await list_exports(unix_path=sock)) == [("a", ""), ("b", "")]
        await _check_both(sock, store, "multi")
        nursery.cancel_scope.cancel()
    backend_b.close()


@pytest.fixture
def cli_server(store: Path, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlink.cli", "disk", "serve", "multi",
         "--disk", f"a:memory:size={A_SIZE}",
         "--disk", f"b:file:path={tmp_path / 'b.img'},size=3M,description=the file one",
         "--nbd", "--blk", "--listen", f"unix:{sock}", "--host-store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip() for _ in range(4)]
    try:
        yield sock, lines
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        _, err = proc.communicate()
        assert not (store / "multi.blk.sock").exists(), err


def test_cli_two_disks_over_blk_and_nbd(cli_server: tuple[str, list[str]],
                                        store: Path) -> None:
    sock, lines = cli_server
    assert lines == [f"ready blk://multi/a (host store {store})",
                     f"ready blk://multi/b (host store {store})",
                     f"ready nbd+unix:///a?socket={sock}",
                     f"ready nbd+unix:///b?socket={sock}"]
    if shutil.which("nbdinfo"):  # a standard client sees both exports
        out = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"],
                             capture_output=True, text=True, timeout=60, check=True)
        exports = {e["export-name"]: e for e in json.loads(out.stdout)["exports"]}
        assert sorted(exports) == ["a", "b"]
        assert exports["a"]["export-size"] == A_SIZE and exports["b"]["export-size"] == B_SIZE
        assert exports["b"]["description"] == "the file one"
    trio.run(_check_both, sock, store, "multi")


def _serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshlink.cli", "disk", "serve", *args],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "MESHLINK_ZEROCONF"})


@pytest.mark.parametrize(("args", "message"), [
    (["s", "--disk", "a:memory:size=1M", "--disk", "a:null:size=1M"], "'a' is given twice"),
    (["s", "--disk", "a:memory:size=1M", "--backend", "null"], "--backend describe"),
    (["s/x", "--disk", "a:memory:size=1M"], "NAME is the SERVICE alone"),
    (["s", "--disk", "a:floppy"], "unknown backend 'floppy'"),
    (["s", "--disk", "a:memory:size=1M,colour=red"], "unknown option 'colour=red'"),
    (["s", "--disk", "a:memory:size=1M,size=2M"], "size given twice"),
    (["s", "--disk", "a"], "expected NAME:BACKEND"),
    (["s", "--disk", "a:memory:path=/x"], "disk 'a'"),  # check_options, named
    (["s", "--disk", "a:memory:size=1M,description=x"], "--description applies to NBD"),
    (["s"], "give --backend"),
    (["s", "--backend", "memory", "--size", "1M", "--zeroconf", "127.0.0.1"], "add --nbd"),
    (["s", "--backend", "memory", "--size", "1M", "--nbd", "--blk", "--listen", "unix:/tmp/x.sock",
      "--zeroconf", "127.0.0.1"], "Unix sockets are not advertised"),
])
def test_cli_refuses_bad_disk_tables(args: list[str], message: str, tmp_path: Path) -> None:
    out = _serve_cli(*args, "--host-store", str(tmp_path / "store"))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was created


def test_cli_duplicate_names_create_no_file(tmp_path: Path) -> None:
    img = tmp_path / "never.img"
    out = _serve_cli("s", "--disk", f"a:file:path={img},size=1M", "--disk", "a:null:size=1M")
    assert out.returncode == 2 and "given twice" in out.stderr
    assert not img.exists()


async def test_python_serve_refusals(tmp_path: Path) -> None:
    sock = f"unix:{tmp_path / 's.sock'}"
    with pytest.raises(LocalProtocolError, match="at least one export"):
        await serve({}, sock)
    with pytest.raises(LocalProtocolError, match="without '/'"):
        await serve({"a/b": NullBackend(512)}, sock)
    with pytest.raises(LocalProtocolError, match="needs service="):
        await serve({"a": NullBackend(512)}, "127.0.0.1:0", zeroconf=True)
    with pytest.raises(LocalProtocolError, match="Unix sockets are not advertised"):
        await serve({"a": NullBackend(512)}, sock, service="s", blk=False, zeroconf=True)
    with pytest.raises(LocalProtocolError, match="no listen="):
        await serve({"a": NullBackend(512)}, service="s", zeroconf=True)
    assert not (tmp_path / "s.sock").exists()


async def test_advertisement_follows_the_tls_mode() -> None:
    listeners = await open_listeners("127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    cfg = ZeroconfConfig(("10.1.2.3",))
    try:
        def ad(tls: str, **kw: object) -> tuple[object, ...]:
            a = nbd_advertisement("st", listeners, tls=tls, config=cfg, host_id="h",
                                  fingerprint="ab" * 32, **kw)  # type: ignore[arg-type]
            return a.name, a.transports, a.addresses, a.tls_port, a.tcp_port, a.fingerprint

        assert ad("required") == ("st.nbd", ("tls",), ("127.0.0.1",), port, 0, "ab" * 32)
        assert ad("off") == ("st.nbd", ("tcp",), ("127.0.0.1",), 0, port, None)
        assert ad("optional") == ("st.nbd", ("tls", "tcp"), ("127.0.0.1",), port, port,
                                  "ab" * 32)
        assert ad("off", advertise=["10.9.9.9"])[2] == ("10.9.9.9",)
        with pytest.raises(LocalProtocolError, match="not IPv4"):
            ad("off", advertise=["::1"])
    finally:
        for lst in listeners:
            await lst.aclose()
    wild = await open_listeners("0.0.0.0:0")
    try:
        assert nbd_advertisement("st", wild, tls="off", config=cfg,
                                 host_id="h").addresses == ("10.1.2.3",)
        with pytest.raises(LocalProtocolError, match="every address"):
            nbd_advertisement("st", wild, tls="off", config=ZeroconfConfig(), host_id="h")
    finally:
        for lst in wild:
            await lst.aclose()
