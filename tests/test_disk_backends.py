"""Every disk backend behaves like a plain bytearray (hypothesis-driven model test)."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlink import DiskError, LocalProtocolError
from meshlink.disk.backends import (
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    CowBackend,
    FileBackend,
    MemoryBackend,
    MmapBackend,
    NullBackend,
    open_backend,
)
from meshlink.disk.backends import memory as memory_mod

SIZE = 256 * 1024 + 1536  # whole sectors, deliberately not a multiple of cow's 4 KiB blocks

Factory = Callable[[Path], Backend]


def _gold(tmp: Path, size: int = SIZE) -> Path:
    gold = tmp / "gold.img"
    if not gold.exists():
        data = bytearray(hashlib.shake_256(b"gold").digest(size))
        data[64 * 1024 : 128 * 1024] = bytes(64 * 1024)  # a zero region
        gold.write_bytes(data)
    return gold


FACTORIES: dict[str, Factory] = {
    "memory": lambda tmp: MemoryBackend(SIZE),
    "memory-chunked": lambda tmp: MemoryBackend(SIZE, mapped=False),
    "file": lambda tmp: FileBackend(tmp / "disk.img", size=SIZE),
    "mmap": lambda tmp: MmapBackend(tmp / "disk.img", size=SIZE),
    "cow-ram": lambda tmp: CowBackend(FileBackend(_gold(tmp), read_only=True)),
    "cow-file": lambda tmp: CowBackend(FileBackend(_gold(tmp), read_only=True),
                                       overlay_path=tmp / "overlay"),
    "cow-memory-512": lambda tmp: CowBackend(MemoryBackend(SIZE), block_size=512),
}


@pytest.fixture(params=sorted(FACTORIES))
def backend_case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
        tuple[str, Backend, Path]]:
    name = request.param
    backend = FACTORIES[name](tmp_path)
    try:
        yield name, backend, tmp_path
    finally:
        backend.close()


offsets = st.integers(min_value=0, max_value=SIZE - 1)
ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "discard", "zero", "zero-nohole", "flush",
                         "write-fua"]),
        offsets,
        st.integers(min_value=1, max_value=70_000),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=25,
)


def _check_extents(backend: Backend, model: bytearray) -> None:
    """Extents tile the disk; anything flagged ZERO really reads as zeroes."""
    pos = 0
    while pos < backend.size:
        ext = backend.extents(pos, backend.size - pos)
        assert ext and all(n > 0 for n, _ in ext)
        for n, flags in ext:
            n = min(n, backend.size - pos)
            if flags & STATE_ZERO:
                assert model[pos : pos + n] == bytes(n)
            pos += n


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops)
def test_backend_matches_bytearray(backend_case: tuple[str, Backend, Path],
                                   script: list[tuple[str, int, int, int]]) -> None:
    name, backend, tmp = backend_case
    # hypothesis reuses the fixture across examples: each one starts from whatever
    # the backend holds now (the gold image or zeroes the first time).
    model = bytearray(backend.read(0, SIZE))
    if name in ("cow-ram", "cow-file") and not tmp.joinpath("seen").exists():
        assert model == _gold(tmp).read_bytes()
        tmp.joinpath("seen").touch()
    assert backend.size == SIZE
    for op, offset, length, byte in script:
        length = min(length, SIZE - offset)
        if op in ("write", "write-fua"):
            data = bytes([byte]) * length
            backend.write(offset, data, fua=op == "write-fua")
            model[offset : offset + length] = data
        elif op == "read":
            assert bytes(backend.read(offset, length)) == model[offset : offset + length]
        elif op == "discard":
            backend.discard(offset, length)
            model[offset : offset + length] = bytes(length)
        elif op.startswith("zero"):
            backend.write_zeroes(offset, length, may_trim=op == "zero")
            model[offset : offset + length] = bytes(length)
        else:
            backend.flush()
    assert bytes(backend.read(0, SIZE)) == model
    _check_extents(backend, model)


def test_null_reads_zero_and_drops_writes() -> None:
    disk = NullBackend(1 << 30)
    disk.write(0, b"x" * 4096)
    assert bytes(disk.read(0, 4096)) == bytes(4096)
    assert bytes(disk.read(5, 3 << 20)) == bytes(3 << 20)
    assert disk.extents(10, 100) == [((1 << 30) - 10, STATE_HOLE | STATE_ZERO)]


@pytest.mark.parametrize("size", [1 << 40, 1 << 45])  # mapped (on Linux), chunked
def test_memory_is_sparse(size: int) -> None:
    disk = MemoryBackend(size)  # terabytes cost nothing until written
    assert disk.mapped == (size <= memory_mod.MAP_MAX and sys.platform.startswith("linux"))
    disk.write((1 << 39) + 5, b"hello")
    assert disk.allocated_bytes == 64 * 1024
    assert bytes(disk.read((1 << 39) + 5, 5)) == b"hello"
    ext = disk.extents(0, 1 << 40)
    assert ext[0] == (1 << 39, STATE_HOLE | STATE_ZERO)
    assert ext[1] == (64 * 1024, 0)
    disk.discard(1 << 39, 64 * 1024)
    assert disk.allocated_bytes == 0
    assert bytes(disk.read((1 << 39) + 5, 5)) == bytes(5)


def test_memory_zeroing_frees_whole_chunks_and_clears_partial_ones() -> None:
    for mapped in (None, False):
        disk = MemoryBackend(1 << 20, mapped=mapped)
        disk.write(0, b"\xaa" * (1 << 20))
        # 1000 bytes into chunk 1 .. 1000 bytes into chunk 4: frees chunks 2 and 3.
        disk.discard(65536 + 1000, 3 * 65536)
        assert disk.allocated_bytes == 14 * 65536
        data = bytes(disk.read(0, 1 << 20))
        assert data[: 65536 + 1000] == b"\xaa" * (65536 + 1000)
        assert data[65536 + 1000 : 4 * 65536 + 1000] == bytes(3 * 65536)
        assert data[4 * 65536 + 1000 :] == b"\xaa" * ((1 << 20) - 4 * 65536 - 1000)
        disk.close()
        assert disk.allocated_bytes == 0 and bytes(disk.read(0, 4096)) == bytes(4096)


def test_cow_never_modifies_gold_image(tmp_path: Path) -> None:
    gold = _gold(tmp_path)
    before = hashlib.sha256(gold.read_bytes()).hexdigest()
    mtime = gold.stat().st_mtime_ns
    for overlay in (None, tmp_path / "ov"):
        disk = CowBackend(FileBackend(gold, read_only=True), overlay_path=overlay)
        disk.write(1000, b"A" * 10_000)
        disk.write_zeroes(0, 512)
        disk.discard(200_000, 30_000)
        disk.flush()
        expect = bytearray(gold.read_bytes())
        expect[1000:11_000] = b"A" * 10_000
        expect[0:512] = bytes(512)
        expect[200_000:230_000] = bytes(30_000)
        assert bytes(disk.read(0, SIZE)) == expect
        disk.close()
    assert hashlib.sha256(gold.read_bytes()).hexdigest() == before
    assert gold.stat().st_mtime_ns == mtime


def test_cow_reports_gold_extents(tmp_path: Path) -> None:
    gold = tmp_path / "sparse.img"
    with open(gold, "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 * 1024)
        f.write(b"x" * 4096)
    disk = CowBackend(FileBackend(gold, read_only=True))
    ext = disk.extents(0, 1 << 20)
    assert ext[0] == (512 * 1024, STATE_HOLE | STATE_ZERO)
    disk.write(0, b"y" * 4096)
    assert disk.extents(0, 1 << 20)[0] == (4096, 0)


def test_file_fast_zero_and_punch(tmp_path: Path) -> None:
    disk = FileBackend(tmp_path / "f.img", size=1 << 20)
    disk.write(0, b"z" * (1 << 20))
    try:
        disk.write_zeroes(0, 1 << 19, fast=True)
    except DiskError as exc:  # a filesystem without hole punching: must say ENOTSUP
        assert exc.errno == errno.ENOTSUP
    else:
        assert bytes(disk.read(0, 1 << 19)) == bytes(1 << 19)
        assert disk.extents(0, 1 << 20)[0][1] & STATE_ZERO
    disk.close()


def test_file_errors_are_disk_errors(tmp_path: Path) -> None:
    with pytest.raises(DiskError) as info:
        FileBackend(tmp_path / "missing.img")
    assert info.value.errno == errno.EIO  # ENOENT is not an NBD errno


def test_read_only_file_open(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"abc" * 1024)
    os.chmod(path, 0o444)
    disk = open_backend("file", path=path, read_only=True)
    assert disk.read_only and disk.size == 3072
    assert bytes(disk.read(0, 3)) == b"abc"
    disk.close()


def test_open_backend_rejects_unknown() -> None:
    with pytest.raises(LocalProtocolError, match="unknown backend"):
        open_backend("tape", size=512)
    with pytest.raises(LocalProtocolError, match="needs a size"):
        open_backend("memory")
