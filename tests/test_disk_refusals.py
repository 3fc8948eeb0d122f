"""Bad disk sizes, dangerous overlays, shrinking and ignored options are refused.

Issue 12: every refusal is a typed error in Python (LocalProtocolError for what
the caller asked, DiskError for what is on disk) and exit 2 with one message on
the command line, never a traceback, and nothing on disk changes on the way.
Real files and real ``meshlink.disk serve`` processes throughout.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from meshlink import DiskError, LocalProtocolError
from meshlink.disk import check_listen_address, serve
from meshlink.disk import open as open_disk
from meshlink.disk.backends import (
    MAX_SIZE,
    CowBackend,
    FileBackend,
    MemoryBackend,
    MmapBackend,
    NullBackend,
    open_backend,
)

from .helpers.nbd import SERVE, nbd_server

MIB = 1 << 20


def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``meshlink.disk serve`` expecting a refusal (it must exit by itself)."""
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=60)


def refused(out: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    """The command failed with ``code``, said ``words``, and printed no traceback."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert words in out.stderr, out.stderr


def digest(path: Path) -> tuple[int, str]:
    return path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def image(path: Path, size: int, seed: bytes = b"img") -> Path:
    path.write_bytes(hashlib.shake_256(seed).digest(size))
    return path


# --- 1. sizes ----------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 511, -512, MAX_SIZE, MAX_SIZE + 1, 1 << 64,
                                  1.5, True, "4096"])
def test_ram_backends_refuse_bad_sizes(size: object) -> None:
    for cls in (NullBackend, MemoryBackend):
        with pytest.raises(LocalProtocolError, match="size"):
            cls(size)  # type: ignore[arg-type]


def test_largest_size_is_accepted() -> None:
    largest = MAX_SIZE - MAX_SIZE % 512  # 2**63 - 512
    for cls in (NullBackend, MemoryBackend):
        disk = cls(largest)
        assert disk.size == largest
        disk.close()


@pytest.mark.parametrize("cls", [FileBackend, MmapBackend])
def test_file_backends_refuse_bad_sizes_and_create_nothing(cls: type[FileBackend],
                                                           tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    for size in (1000, MAX_SIZE + 1, -512):
        with pytest.raises(LocalProtocolError):
            cls(path, size=size)
        assert not path.exists()


@pytest.mark.parametrize("cls", [FileBackend, MmapBackend])
def test_image_of_partial_sectors_is_a_disk_error(cls: type[FileBackend],
                                                  tmp_path: Path) -> None:
    path = image(tmp_path / "odd.img", 1000)
    before = digest(path)
    with pytest.raises(DiskError, match="512-byte sectors") as info:
        cls(path)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DiskError):
        cls(path, read_only=True)
    assert digest(path) == before
    disk = cls(path, size=1024)  # growing to whole sectors is the way out
    assert disk.size == 1024
    assert bytes(disk.read(0, 1000)) == path.read_bytes()[:1000]
    disk.close()


def test_cow_over_partial_sector_image_is_refused(tmp_path: Path) -> None:
    gold = image(tmp_path / "gold.img", 4096 + 7)
    with pytest.raises(DiskError, match="sectors"):
        open_backend("cow", path=gold)


def test_cli_sizes_are_usage_errors(tmp_path: Path) -> None:
    for size in ("1000", "8E", "9999E", str(MAX_SIZE), str(1 << 64)):
        out = serve_cli("d", "--backend", "memory", "--size", size, "--nbd")
        refused(out, 2, "--size")
    odd = image(tmp_path / "odd.img", 1000)
    out = serve_cli("d", "--backend", "file", "--path", str(odd), "--nbd",
                    "--listen", f"unix:{tmp_path / 's.sock'}")
    refused(out, 1, "not a whole number of 512-byte sectors")
    assert odd.stat().st_size == 1000


# --- 2. cow overlays ---------------------------------------------------------


def _links(tmp: Path, gold: Path) -> dict[str, Path]:
    sym = tmp / "sym.img"
    sym.symlink_to(gold)
    hard = tmp / "hard.img"
    os.link(gold, hard)
    return {"itself": gold, "symlink": sym, "hard link": hard,
            "dotted path": tmp / "." / gold.name}


def test_overlay_that_is_the_gold_image_is_refused(tmp_path: Path) -> None:
    gold = image(tmp_path / "gold.img", 64 * 1024)
    before = digest(gold)
    for how, overlay in _links(tmp_path, gold).items():
        for reset in (False, True):
            with pytest.raises(LocalProtocolError, match="gold image itself"):
                open_backend("cow", path=gold, overlay_path=overlay, reset=reset)
            assert digest(gold) == before, how
    # also when the gold image is served by mmap under the cow layer
    lower = MmapBackend(gold, read_only=True)
    with pytest.raises(LocalProtocolError, match="gold image itself"):
        CowBackend(lower, overlay_path=tmp_path / "hard.img", reset=True)
    lower.close()
    assert digest(gold) == before


def test_cli_overlay_on_gold_image_is_refused(tmp_path: Path) -> None:
    gold = image(tmp_path / "gold.img", 64 * 1024)
    before = digest(gold)
    for overlay in _links(tmp_path, gold).values():
        out = serve_cli("d", "--backend", "cow", "--path", str(gold), "--overlay",
                        str(overlay), "--overlay-reset", "--nbd",
                        "--listen", f"unix:{tmp_path / 's.sock'}")
        refused(out, 2, "gold image itself")
    assert digest(gold) == before


def test_existing_overlay_is_kept_unless_reset(tmp_path: Path) -> None:
    gold = image(tmp_path / "gold.img", 64 * 1024)
    same = image(tmp_path / "same.ov", 64 * 1024, b"someone's data")
    other = image(tmp_path / "other.ov", 8192, b"other data")
    kept = {p: digest(p) for p in (same, other)}
    with pytest.raises(LocalProtocolError, match="already holds data"):
        open_backend("cow", path=gold, overlay_path=same)
    with pytest.raises(LocalProtocolError, match="not the gold image's size"):
        open_backend("cow", path=gold, overlay_path=other)
    assert {p: digest(p) for p in kept} == kept
    for overlay in (same, other):  # asked for explicitly: the old blocks are dropped
        disk = open_backend("cow", path=gold, overlay_path=overlay, reset=True)
        assert overlay.stat().st_size == 64 * 1024
        assert bytes(disk.read(0, 64 * 1024)) == gold.read_bytes()
        disk.write(512, b"new")
        disk.close()
    empty = tmp_path / "empty.ov"
    empty.touch()
    disk = open_backend("cow", path=gold, overlay_path=empty)  # nothing to lose
    assert bytes(disk.read(0, 64 * 1024)) == gold.read_bytes()
    disk.close()


def test_overlay_must_be_a_regular_file(tmp_path: Path) -> None:
    gold = image(tmp_path / "gold.img", 4096)
    with pytest.raises(LocalProtocolError, match="regular file"):
        open_backend("cow", path=gold, overlay_path="/dev/null", reset=True)
    with pytest.raises(DiskError):
        open_backend("cow", path=gold, overlay_path=tmp_path)  # a directory


def test_cli_overlay_reset(tmp_path: Path) -> None:
    gold = image(tmp_path / "gold.img", MIB)
    overlay = image(tmp_path / "old.ov", MIB, b"old overlay")
    before = digest(overlay)
    out = serve_cli("d", "--backend", "cow", "--path", str(gold), "--overlay", str(overlay),
                    "--nbd", "--listen", f"unix:{tmp_path / 's.sock'}")
    refused(out, 2, "--overlay-reset")
    assert digest(overlay) == before
    with nbd_server(tmp_path, "d", "cow", size=None, path=gold,
                    extra=["--overlay", str(overlay), "--overlay-reset"]):
        assert overlay.stat().st_size == MIB
        assert not any(overlay.read_bytes())  # reset: the old blocks are gone


# --- 3. file backend never shrinks by accident -------------------------------


@pytest.mark.parametrize("cls", [FileBackend, MmapBackend])
def test_smaller_size_does_not_shrink_without_asking(cls: type[FileBackend],
                                                     tmp_path: Path) -> None:
    path = image(tmp_path / "disk.img", MIB)
    before = digest(path)
    with pytest.raises(LocalProtocolError, match="shrink"):
        cls(path, size=MIB // 2)
    assert digest(path) == before
    disk = cls(path, size=2 * MIB)  # growing stays allowed and keeps the data
    assert disk.size == 2 * MIB
    disk.close()
    assert path.read_bytes()[:MIB] == image(tmp_path / "again.img", MIB).read_bytes()
    disk = cls(path, size=MIB // 2, shrink=True)
    assert disk.size == MIB // 2 and path.stat().st_size == MIB // 2
    disk.close()


def test_cli_shrink(tmp_path: Path) -> None:
    path = image(tmp_path / "disk.img", 2 * MIB)
    before = digest(path)
    out = serve_cli("d", "--backend", "file", "--path", str(path), "--size", "1M", "--nbd",
                    "--listen", f"unix:{tmp_path / 's.sock'}")
    refused(out, 2, "--shrink")
    assert digest(path) == before
    with nbd_server(tmp_path, "d", "file", size="1M", path=path, extra=["--shrink"]):
        assert path.stat().st_size == MIB


# --- 4. options a backend would ignore ----------------------------------------


@pytest.mark.parametrize("kind, kwargs, words", [
    ("memory", {"size": 4096, "path": "x.img"}, "--path does not apply"),
    ("null", {"size": 4096, "overlay_path": "x.ov"}, "--overlay does not apply"),
    ("file", {"path": "x.img", "overlay_path": "x.ov"}, "--overlay does not apply"),
    ("mmap", {"path": "x.img", "reset": True}, "--overlay-reset does not apply"),
    ("cow", {"path": "x.img", "size": 4096}, "--size does not apply"),
    ("cow", {"path": "x.img", "shrink": True}, "--shrink does not apply"),
    ("memory", {"size": 4096, "shrink": True}, "--shrink does not apply"),
    ("file", {"path": "x.img", "shrink": True}, "--shrink needs --size"),
    ("cow", {"path": "x.img", "reset": True}, "--overlay-reset needs --overlay"),
    ("file", {"path": "x.img", "size": 4096, "read_only": True}, "--read-only"),
    ("mmap", {"path": "x.img", "size": 4096, "read_only": True}, "--read-only"),
    ("cow", {"path": "x.img", "overlay_path": "x.ov", "read_only": True}, "--read-only"),
    ("file", {}, "needs a path"),
])
def test_ignored_options_are_refused(kind: str, kwargs: dict[str, object], words: str,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocalProtocolError, match=words.replace("-", r"\-")):
        open_backend(kind, **kwargs)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []  # refused before anything was created
    flags = {"path": "--path", "size": "--size", "overlay_path": "--overlay",
             "shrink": "--shrink", "reset": "--overlay-reset", "read_only": "--read-only"}
    argv = ["d", "--backend", kind, "--nbd", "--listen", f"unix:{tmp_path / 's.sock'}"]
    for key, value in kwargs.items():
        argv += [flags[key]] if value is True else [flags[key], str(value)]
    if "size" not in kwargs and kind in ("null", "memory"):
        argv += ["--size", "4096"]
    refused(serve_cli(*argv), 2, words)
    assert os.listdir(tmp_path) == []


def test_constructors_refuse_what_they_would_ignore(tmp_path: Path) -> None:
    path = image(tmp_path / "disk.img", 4096)
    with pytest.raises(LocalProtocolError, match="read-only"):
        FileBackend(path, size=8192, read_only=True)
    assert path.stat().st_size == 4096
    lower = FileBackend(path, read_only=True)
    with pytest.raises(LocalProtocolError, match="read-only"):
        CowBackend(lower, overlay_path=tmp_path / "ov", read_only=True)
    with pytest.raises(LocalProtocolError, match="overlay"):
        CowBackend(lower, reset=True)
    assert not (tmp_path / "ov").exists()
    lower.close()


def test_cli_front_end_options_need_their_front_end(tmp_path: Path, store: Path) -> None:
    base = ["d", "--backend", "null", "--size", "1M"]
    for extra, words in [
        (["--listen", "127.0.0.1:10809"], "--listen applies to NBD only"),
        (["--stdio"], "--stdio applies to NBD only"),
        (["--description", "x"], "--description applies to NBD only"),
        (["--nbd", "--host-store", str(store)], "--host-store applies to the blk ring"),
        (["--nbd", "--tls-ca", "ca.pem"], "need --tls optional"),
    ]:
        refused(serve_cli(*base, *extra), 2, words)


# --- 5. listen ports ------------------------------------------------------------


@pytest.mark.parametrize("addr", ["127.0.0.1:65536", "127.0.0.1:99999999999",
                                  "[::1]:70000", "tcp:localhost:123456", "host:\u0661",
                                  "host:", "unix:"])
def test_bad_listen_addresses(addr: str) -> None:
    with pytest.raises(LocalProtocolError, match="listen address"):
        check_listen_address(addr)
    refused(serve_cli("d", "--backend", "null", "--size", "1M", "--nbd", "--listen", addr),
            2, "--listen")


async def test_serve_refuses_bad_port_before_serving() -> None:
    with pytest.raises(LocalProtocolError, match="65536"):
        await serve({"d": NullBackend(MIB)}, "127.0.0.1:65536")
    with trio.fail_after(30):  # a free port (0) still works and reports the real one
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, {"d": NullBackend(MIB)}, "127.0.0.1:0")
            assert server is not None
            nursery.cancel_scope.cancel()


def test_cp_block_size_zero_is_refused(tmp_path: Path) -> None:
    src = image(tmp_path / "a.img", 4096)
    out = subprocess.run([sys.executable, "-m", "meshlink.disk", "cp", str(src),
                          str(tmp_path / "b.img"), "--block-size", "0"],
                         capture_output=True, text=True, timeout=60)
    refused(out, 2, "block size")


@pytest.mark.parametrize("value", [0, -1, 1025, True])
async def test_open_refuses_max_in_flight_out_of_range(value: int, tmp_path: Path) -> None:
    # 0 made every request wait forever on an empty semaphore; checked before connecting.
    with trio.fail_after(30), pytest.raises(LocalProtocolError, match="max_in_flight"):
        async with open_disk(f"nbd+unix:///d?socket={tmp_path / 'none.sock'}",
                             max_in_flight=value):
            pass
