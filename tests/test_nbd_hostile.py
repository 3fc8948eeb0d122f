"""Malformed and hostile clients get the protocol's error replies; the server lives on.

Each test runs the real server process, misbehaves on one connection, then
proves a second, well-behaved connection is served normally.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from meshlink.disk.nbd import wire as c
from meshlink.disk.nbd.client_transmission import Reply
from tests.helpers.nbd import RawClient, Server, nbd_server

MIB = 1 << 20


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    with nbd_server(tmp_path, "disk", size="8M") as srv:
        yield srv


def _still_serving(srv: Server) -> None:
    """A fresh client can write and read back."""
    assert srv.socket is not None
    client = RawClient(srv.socket)
    try:
        client.greet()
        client.go("disk")
        client.request(c.CMD_WRITE, 4096, 5, payload=b"alive")
        reply = client.reply()
        assert isinstance(reply, Reply) and reply.error == 0
        client.request(c.CMD_READ, 4096, 5)
        reply = client.reply()
        assert isinstance(reply, Reply) and reply.data == b"alive"
    finally:
        client.close()
    assert srv.proc.poll() is None


def _raw(srv: Server) -> RawClient:
    assert srv.socket is not None
    return RawClient(srv.socket)


def test_bad_option_magic_drops_only_that_client(server: Server) -> None:
    bad = _raw(server)
    bad.greet()
    bad.option(c.OPT_GO, magic=0xDEADBEEF)
    assert bad.sock.recv(100) == b""  # hard disconnect, as the spec requires
    bad.close()
    _still_serving(server)


def test_unknown_client_flags_drop_only_that_client(server: Server) -> None:
    bad = _raw(server)
    bad.greet(flags=0x80)
    assert bad.sock.recv(100) == b""
    bad.close()
    _still_serving(server)


def test_option_errors_are_replies(server: Server) -> None:
    client = _raw(server)
    client.greet()
    client.option(42)
    assert client.option_reply() == (42, c.REP_ERR_UNSUP, b"option 42 not supported")
    client.option(c.OPT_LIST, b"junk")
    assert client.option_reply()[1] == c.REP_ERR_INVALID
    # GO whose name length runs past the option data
    client.option(c.OPT_GO, struct.pack(">I", 1000) + b"disk" + struct.pack(">H", 0))
    assert client.option_reply()[1] == c.REP_ERR_INVALID
    client.option(c.OPT_GO, struct.pack(">I", 7) + b"nothere" + struct.pack(">H", 0))
    assert client.option_reply()[1] == c.REP_ERR_UNKNOWN
    # SET_META_CONTEXT before structured replies
    client.option(c.OPT_SET_META_CONTEXT, struct.pack(">II", 0, 0))
    assert client.option_reply()[1] == c.REP_ERR_INVALID
    client.option(c.OPT_STARTTLS)
    assert client.option_reply()[1] == c.REP_ERR_POLICY  # TLS is off on this server
    # ...and the same connection still negotiates fine afterwards.
    assert client.go("disk") & c.TF_HAS_FLAGS
    client.close()
    _still_serving(server)


def test_oversized_option_is_skipped_not_buffered(server: Server) -> None:
    client = _raw(server)
    client.greet()
    client.option(c.OPT_INFO, b"\0" * (1 * MIB))
    assert client.option_reply()[1] == c.REP_ERR_TOO_BIG
    client.go("disk")
    client.close()
    _still_serving(server)


def test_transmission_errors_are_replies(server: Server) -> None:
    client = _raw(server)
    client.greet()
    client.go("disk")
    size = 8 * MIB

    def expect(err: int) -> None:
        reply = client.reply()
        assert isinstance(reply, Reply)
        assert reply.error == err, (reply.error, reply.message)

    client.request(c.CMD_READ, size - 10, 20)
    expect(c.EINVAL)
    client.request(c.CMD_WRITE, size - 2, 4, payload=b"abcd")
    expect(c.ENOSPC)
    client.request(c.CMD_READ, 0, 64 * MIB)  # oversized read
    expect(c.EINVAL)
    client.request(c.CMD_TRIM, 1 << 62, 4096)  # offset far out of range
    expect(c.EINVAL)
    client.request(77, 0, 0)  # unknown command
    expect(c.EINVAL)
    client.request(c.CMD_READ, 0, 512, flags=c.CMD_FLAG_REQ_ONE)  # flag not valid for READ
    expect(c.EINVAL)
    client.request(c.CMD_BLOCK_STATUS, size, 512)
    expect(c.EINVAL)
    # An oversized WRITE: the payload is skipped, the error replied, the stream stays in sync.
    big = c.MAX_REQUEST + 4096
    client.request(c.CMD_WRITE, 0, big, payload=b"\xee" * big)
    expect(c.EINVAL)
    client.request(c.CMD_READ, 0, 512)
    reply = client.reply()
    assert isinstance(reply, Reply) and reply.error == 0 and reply.data == bytes(512)
    client.close()
    _still_serving(server)


def test_bad_request_magic_drops_only_that_client(server: Server) -> None:
    client = _raw(server)
    client.greet()
    client.go("disk")
    _, header = client.request(c.CMD_READ, 0, 512, send=False)
    client.sock.sendall(b"\x99\x99\x99\x99" + header[4:])
    assert client.sock.recv(100) == b""
    client.close()
    _still_serving(server)


def test_client_dying_mid_write_leaves_server_up(server: Server) -> None:
    client = _raw(server)
    client.greet()
    client.go("disk")
    # Header of a 1 MiB write, half the payload, then vanish.
    _, header = client.request(c.CMD_WRITE, 0, MIB, send=False)
    client.sock.sendall(header + b"x" * (MIB // 2))
    client.close()
    _still_serving(server)


def test_large_writes_in_pieces_and_pipelined(server: Server) -> None:
    """A large WRITE's payload is read straight into the disk however it arrives: in
    many small sends, or in one send with the next requests right behind it."""
    client = _raw(server)
    client.greet()
    client.go("disk")
    first = bytes(range(256)) * (MIB // 256)
    _, header = client.request(c.CMD_WRITE, 0, MIB, send=False)
    client.sock.sendall(header)
    for i in range(0, MIB, 4096):  # 256 sends: the payload comes as many segments
        client.sock.sendall(first[i:i + 4096])
    reply = client.reply()
    assert isinstance(reply, Reply) and reply.error == 0
    second = b"\x5a" * MIB
    _, h1 = client.request(c.CMD_WRITE, MIB, MIB, send=False)
    _, h2 = client.request(c.CMD_WRITE, 3 * MIB, 7, send=False)
    _, h3 = client.request(c.CMD_READ, MIB - 3, 8, send=False)
    client.sock.sendall(h1 + second + h2 + b"behind!" + h3)
    replies = [client.reply() for _ in range(3)]
    assert all(isinstance(r, Reply) and r.error == 0 for r in replies)
    assert replies[2].data == first[-3:] + second[:5]  # type: ignore[attr-defined]
    client.request(c.CMD_READ, 3 * MIB, 7)
    reply = client.reply()
    assert isinstance(reply, Reply) and reply.data == b"behind!"
    client.close()


def test_simple_replies_when_structured_not_negotiated(server: Server) -> None:
    client = _raw(server)
    client.greet()
    flags = client.go("disk", structured=False)
    assert not flags & c.TF_SEND_DF  # DF only with structured replies
    client.request(c.CMD_READ, 8 * MIB, 512)  # error: no payload may follow
    reply = client.reply()
    assert isinstance(reply, Reply) and reply.error == c.EINVAL
    client.request(c.CMD_READ, 0, 16)
    reply = client.reply()
    assert isinstance(reply, Reply) and reply.data == bytes(16)
    client.close()


def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    with nbd_server(tmp_path, "ro", size="1M", extra=["--read-only"]) as srv:
        assert srv.socket is not None
        client = RawClient(srv.socket)
        client.greet()
        flags = client.go("ro")
        assert flags & c.TF_READ_ONLY and not flags & c.TF_SEND_TRIM
        for cmd in (c.CMD_WRITE, c.CMD_WRITE_ZEROES, c.CMD_TRIM):
            client.request(cmd, 0, 4, payload=b"nope" if cmd == c.CMD_WRITE else b"")
            reply = client.reply()
            assert isinstance(reply, Reply) and reply.error == c.EPERM
        client.close()
        assert srv.proc.poll() is None


def test_export_name_for_unknown_export_hard_disconnects(server: Server) -> None:
    client = _raw(server)
    client.greet()
    client.option(c.OPT_EXPORT_NAME, b"nothere")
    assert client.sock.recv(100) == b""
    client.close()
    _still_serving(server)
