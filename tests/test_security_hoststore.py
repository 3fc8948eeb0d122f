"""Issue 12: a same-host attacker against the host store and the rendezvous.

The attacker is the real user ``nobody`` (tests/helpers/as_nobody.py drops to
it); those tests need root and skip otherwise.  Covered: who may own and write
the store directory, planted symlinks and FIFOs, withdrawing only our own
entries, whole-string service names, ``meshlink ls`` being read-only, and the
rendezvous servers (vchan and blk) facing hostile or silent clients and
clients of a uid they do not allow.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from meshlink import AuthError, HandshakeError
from meshlink.cli import main
from meshlink.disk.backends import MemoryBackend
from meshlink.disk.blk import open_blk
from meshlink.disk.blk.back import serve_blk
from meshlink.transport import rendezvous
from meshlink.transport.vchan import VchanStream, connect_vchan, local, open_vchan_listener
from resolver import HostStore, InvalidName, Publication, StoreError
from resolver.hoststore import HostStoreSource, ServiceRecord, remove_record, write_record
from resolver.names import validate_service_name

from .conftest import HELPERS

ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="needs root to act as the user nobody")
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch directory ``nobody`` can traverse (pytest's tmp_path is private)."""
    d = Path(tempfile.mkdtemp(prefix="meshlink-sec-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nobody(*args: str) -> object:
    """Run one as_nobody.py action as the user nobody; its JSON answer."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run([sys.executable, str(HELPERS / "as_nobody.py"), *args], env=env,
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the store directory -------------------------------------------------------------


@as_root
def test_store_owned_by_another_user_is_refused(base: Path) -> None:
    d = base / "store"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(StoreError, match="not private"):
        HostStore(d)


def test_group_or_world_writable_store_needs_an_explicit_group(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLINK_HOST_STORE_GROUP", raising=False)
    d = base / "shared"
    d.mkdir()
    gid = os.getgid()
    for mode in (0o770, 0o777, 0o707):
        os.chmod(d, mode)
        # An explicit path is vetted like a default one.
        with pytest.raises(StoreError, match="not private"):
            HostStore(d)
    os.chmod(d, 0o770)
    assert HostStore(d, group=gid).group == gid
    monkeypatch.setenv("MESHLINK_HOST_STORE_GROUP", str(gid))
    assert HostStore(d).group == gid
    os.chmod(d, 0o777)  # others may write: never acceptable
    with pytest.raises(StoreError, match="not safe for group"):
        HostStore(d)
    with pytest.raises(StoreError, match="not safe for group"):
        HostStore(d, group=gid + 1)


def test_group_store_entries_are_usable_by_the_group(base: Path) -> None:
    gid = os.getgid()
    store = HostStore(base / "g", group=gid)
    st = store.path.stat()
    assert (st.st_mode & 0o7777, st.st_gid) == (0o2770, gid)
    pub = store.claim("svc")
    sock = _bind(pub)
    write_record(store, ServiceRecord("svc", "host", ("vchan",)))
    for entry in ("svc.lock", "svc.sock", "svc.meshlink.json"):
        assert (store.path / entry).stat().st_mode & 0o777 == 0o660, entry
    sock.close()
    pub.withdraw()
    remove_record(store, "svc")


@as_root
def test_default_store_planted_by_another_user_is_refused(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = base / "run"  # a sticky, world-writable parent, like /tmp
    run.mkdir()
    os.chmod(run, 0o1777)
    victim = base / "victim"
    victim.mkdir(mode=0o700)
    (victim / "precious").write_text("keep")
    monkeypatch.delenv("MESHLINK_HOST_STORE", raising=False)
    monkeypatch.delenv("MESHLINK_HOST_STORE_GROUP", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))

    assert nobody("plant-symlink", str(run / "meshlink"), str(victim)) == "planted"
    with pytest.raises(StoreError, match="symlink"):
        HostStore()
    assert os.listdir(victim) == ["precious"]  # never followed, nothing created there

    os.unlink(run / "meshlink")
    assert nobody("plant-dir", str(run / "meshlink")) == "planted"
    with pytest.raises(StoreError, match="not private"):
        HostStore()


# -- entries ------------------------------------------------------------------------


def _bind(pub: Publication) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(pub.bind_path)
    pub.bound()
    s.listen()
    return s


@as_root
def test_another_user_cannot_hijack_a_name_in_a_correct_store(base: Path) -> None:
    store = HostStore(base / "store")
    pub = store.claim("svc")
    sock = _bind(pub)
    try:
        for name in ("svc", "unclaimed"):
            tried = nobody("try-entries", str(store.path), name)
            assert isinstance(tried, dict)
            assert set(tried.values()) == {"PermissionError"}, tried
        assert store.is_live("svc")
        assert sorted(os.listdir(store.path)) == ["svc.lock", "svc.sock"]
    finally:
        sock.close()
        pub.withdraw()


def test_planted_symlinks_never_redirect_a_write(base: Path) -> None:
    store = HostStore(base / "store")
    victim = base / "victim.txt"
    victim.write_text("precious")
    os.chmod(victim, 0o644)
    for entry in ("svc.lock", "svc.sock", "svc.meshlink.json"):
        os.symlink(victim, store.path / entry)

    with pytest.raises(StoreError, match="symlink"):
        store.claim("svc")
    assert not store.is_live("svc")
    assert HostStoreSource(store).record("svc") is None
    write_record(store, ServiceRecord("svc", "host", ("vchan",)))  # replaces the link
    assert not (store.path / "svc.meshlink.json").is_symlink()
    os.unlink(store.path / "svc.lock")
    pub = store.claim("svc")  # removes the planted socket link, not what it points to
    assert not os.path.lexists(store.path / "svc.sock")
    pub.withdraw()
    remove_record(store, "svc")

    assert victim.read_text() == "precious"
    assert victim.stat().st_mode & 0o777 == 0o644
    assert os.listdir(store.path) == []


def test_planted_fifo_lock_is_refused_without_hanging(base: Path) -> None:
    store = HostStore(base / "store")
    os.mkfifo(store.path / "svc.lock")
    assert not store.is_live("svc")
    with pytest.raises(StoreError, match="not a regular file"):
        store.claim("svc")


def test_withdraw_leaves_a_replacement_alone(base: Path) -> None:
    first = HostStore(base / "store")
    a = first.claim("svc")
    a_sock = _bind(a)
    write_record(first, ServiceRecord("svc", "host-a", ("vchan",)))
    # The first server loses its entries (removed behind its back) and a
    # second one takes the name.
    os.unlink(first.path / "svc.sock")
    os.unlink(first.path / "svc.lock")
    second = HostStore(base / "store")
    b = second.claim("svc")
    b_sock = _bind(b)
    write_record(second, ServiceRecord("svc", "host-b", ("vchan",)))

    a.withdraw()
    remove_record(first, "svc")
    a_sock.close()
    assert second.is_live("svc")
    assert sorted(os.listdir(second.path)) == ["svc.lock", "svc.meshlink.json", "svc.sock"]
    rec = HostStoreSource(second).record("svc")
    assert rec is not None and rec.host_id == "host-b"

    b.withdraw()
    remove_record(second, "svc")
    b_sock.close()
    assert os.listdir(second.path) == []


def test_service_names_match_the_whole_string(base: Path) -> None:
    store = HostStore(base / "store")
    for bad in ("svc\n", "svc\n\n", "svc\nx", "\nsvc", "a/b", ".hidden", ""):
        with pytest.raises(InvalidName):
            validate_service_name(bad)
        with pytest.raises(InvalidName):
            store.claim(bad)
    (store.path / "evil\n.sock").touch()
    assert list(store.services()) == []


def test_ls_creates_no_directory(base: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MESHLINK_HOST_STORE", raising=False)
    monkeypatch.delenv("MESHLINK_ZEROCONF", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    assert main(["ls", "--host-store", str(base / "a" / "b" / "store")]) == 0
    assert main(["ls"]) == 0
    assert os.listdir(base) == []
    assert capsys.readouterr().out.splitlines()[-1].split() == ["NAME", "SOURCE", "TRANSPORTS",
                                                                "ENDPOINTS"]


# -- the rendezvous servers --------------------------------------------------------

HOSTILE = [
    ("4 KB of nesting", b"[" * 4000),
    ("deep object", b'{"a":' * 50 + b"1" + b"}" * 50),
    ("not utf-8", b"\xff\xfe{}"),
    ("not json", b"hello"),
    ("not an object", b"[1, 2]"),
    ("bad fields", b'{"meshlink": "vchan", "version": 1, "read_min": "x"}'),
]


async def _hostile(path: str, body: bytes, length: int | None = None) -> dict[str, object]:
    """Send one hostile message; what the server answered before closing."""
    s = trio.socket.socket(socket.AF_UNIX)
    with s:
        await s.connect(path)
        await s.send(struct.pack(">I", len(body) if length is None else length) + body)
        with trio.fail_after(5):
            return await rendezvous.recv_message(s, "test")


@asynccontextmanager
async def vchan_server(store: HostStore | Path, name: str = "svc"
                       ) -> AsyncIterator[list[VchanStream]]:
    """A vchan listener accepting in the background; yields what it accepted."""
    listener = await open_vchan_listener(name, host_store=store)
    got: list[VchanStream] = []

    async def accept_loop() -> None:
        while True:
            got.append(await listener.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop)
        try:
            yield got
        finally:
            nursery.cancel_scope.cancel()
    await listener.aclose()
    for s in got:
        await s.aclose()


@asynccontextmanager
async def blk_server(store: HostStore | Path) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_blk, "disks", {"d0": MemoryBackend(1 << 20)},
                                    host_store=store))
        yield
        nursery.cancel_scope.cancel()


async def _good_vchan(store: HostStore | Path) -> None:
    s = await connect_vchan("svc", host_store=store)
    await s.aclose()


async def _good_blk(store: HostStore | Path) -> None:
    async with open_blk("disks/d0", host_store=store) as disk:
        assert await disk.read(0, 512) == bytes(512)


async def test_vchan_server_survives_hostile_messages(store: Path) -> None:
    async with vchan_server(store):
        path = str(store / "svc.sock")
        for why, body in HOSTILE:
            reply = await _hostile(path, body)
            assert reply["ok"] is False, why
        reply = await _hostile(path, b"{}", length=1 << 20)  # oversized: refused unread
        assert "too long" in str(reply["error"])
        with trio.fail_after(5):
            await _good_vchan(store)


async def test_blk_server_survives_hostile_messages(store: Path) -> None:
    # Before issue 12 the first of these (a 4 KB rendezvous message of
    # nested brackets) killed the whole disk server with a RecursionError.
    async with blk_server(store):
        path = str(store / "disks.blk.sock")
        for why, body in HOSTILE:
            reply = await _hostile(path, body)
            assert reply["ok"] is False, why
        reply = await _hostile(path, b"{}", length=1 << 20)
        assert "too long" in str(reply["error"])
        with trio.fail_after(5):
            await _good_blk(store)


@pytest.mark.parametrize("kind", ["vchan", "blk"])
async def test_a_silent_client_stalls_nobody(store: Path, kind: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from meshlink.disk.blk import back

    timeout = 2.0  # short, so that the silent client's end is seen too
    monkeypatch.setattr(local, "HANDSHAKE_TIMEOUT", timeout)
    monkeypatch.setattr(back, "HANDSHAKE_TIMEOUT", timeout)
    server = vchan_server(store) if kind == "vchan" else blk_server(store)
    entry = "svc.sock" if kind == "vchan" else "disks.blk.sock"
    async with server:
        silent = trio.socket.socket(socket.AF_UNIX)
        with silent:
            await silent.connect(str(store / entry))
            start = trio.current_time()
            with trio.fail_after(timeout / 2):  # well before the silent one times out
                await (_good_vchan(store) if kind == "vchan" else _good_blk(store))
                await (_good_vchan(store) if kind == "vchan" else _good_blk(store))
            with trio.fail_after(timeout * 3):  # and the silent one is dropped in time
                assert await silent.recv(1) == b""
            assert trio.current_time() - start >= timeout * 0.9


async def test_vchan_handshakes_in_progress_are_bounded(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "MAX_PENDING", 1)
    async with vchan_server(store):
        silent = trio.socket.socket(socket.AF_UNIX)
        with silent:
            await silent.connect(str(store / "svc.sock"))
            await trio.sleep(0.2)  # not a synchronisation: the refusal below is checked
            with pytest.raises(HandshakeError, match="busy"):
                await _good_vchan(store)


async def test_client_reads_a_refusal_sent_before_its_hello() -> None:
    # The server refused (its uid check comes first) and hung up before the
    # client's hello went out: the client must still see the AuthError.
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        await b.send(rendezvous.encode({"ok": False, "code": "auth", "error": "uid 65534"}))
        b.close()
        await rendezvous.send_hello(a, {"meshlink": "vchan"}, [])
        reply = await rendezvous.recv_message(a, "vchan")
        with pytest.raises(AuthError, match="uid 65534"):
            rendezvous.check_reply(reply, "refused")


def _group_store(base: Path) -> HostStore:
    """A store shared with nobody's group, so that nobody reaches our sockets."""
    return HostStore(base / "shared", group=NOBODY.pw_gid)


@as_root
async def test_refused_uid_gets_auth_error_over_vchan(base: Path) -> None:
    store = _group_store(base)
    async with vchan_server(store) as accepted:
        for _ in range(3):  # the refusal races the hello: any order must give AuthError
            got = await trio.to_thread.run_sync(nobody, "connect-vchan", str(store.path), "svc")
            assert isinstance(got, str) and got.startswith("AuthError: "), got
            assert f"uid {NOBODY.pw_uid}" in got
        assert accepted == []


@as_root
async def test_refused_uid_gets_auth_error_over_blk(base: Path) -> None:
    store = _group_store(base)
    async with blk_server(store):
        for _ in range(3):
            got = await trio.to_thread.run_sync(nobody, "open-blk", str(store.path), "disks/d0")
            assert isinstance(got, str) and got.startswith("AuthError: "), got
        with trio.fail_after(5):
            await _good_blk(store)
