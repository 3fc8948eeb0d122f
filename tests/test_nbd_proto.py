"""Table tests for the sans-io NBD core: fed whole, byte by byte, and with trailing bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from meshlink import LocalProtocolError, RemoteProtocolError
from meshlink.disk.nbd import wire as c
from meshlink.disk.nbd.client_handshake import ClientHandshake, ExportList, Negotiated
from meshlink.disk.nbd.client_transmission import ClientTransmission
from meshlink.disk.nbd.sansio import NEED_DATA, HardDisconnect, StartTLS
from meshlink.disk.nbd.server_handshake import (
    Aborted,
    EnterTransmission,
    ExportInfo,
    ServerHandshake,
    TLSMode,
)
from meshlink.disk.nbd.server_transmission import (
    BadRequest,
    Disconnect,
    Request,
    ServerTransmission,
)
from meshlink.disk.nbd.wire import transmission_flags

FLAGS = transmission_flags(read_only=False, can_flush=True, can_fua=True, can_trim=True,
                           can_zero=True, can_fast_zero=True, can_multi_conn=True,
                           can_cache=False)
EXPORT = ExportInfo("disk", 1 << 20, FLAGS, "a disk")


def _server(tls: TLSMode = TLSMode.OFF) -> ServerHandshake:
    return ServerHandshake(lambda n: EXPORT if n in ("", "disk") else None,
                           lambda: [("disk", "a disk")], tls=tls)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data


def go(name: bytes = b"disk", infos: tuple[int, ...] = ()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos),
                                                             *infos)


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(raw):
        magic, option, rtype, length = struct.unpack_from(">QIII", raw, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        out.append((option, rtype, raw[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


Feed = Callable[[ServerHandshake, bytes], list[object]]


def feed_whole(core: ServerHandshake, data: bytes) -> list[object]:
    core.receive_data(data)
    return _drain(core)


def feed_bytewise(core: ServerHandshake, data: bytes) -> list[object]:
    events: list[object] = []
    for i in range(len(data)):
        core.receive_data(data[i : i + 1])
        events += _drain(core)
        if events and not isinstance(events[-1], type(NEED_DATA)):
            # stop once the machine left option haggling (trailing bytes stay buffered)
            if isinstance(events[-1], (EnterTransmission, Aborted, StartTLS)):
                core_rest = data[i + 1 :]
                if isinstance(events[-1], EnterTransmission):
                    assert events[-1].trailing == b""
                    events[-1] = EnterTransmission(
                        events[-1].export, events[-1].flags, events[-1].structured,
                        events[-1].contexts, core_rest)
                break
    return events


def _drain(core: ServerHandshake) -> list[object]:
    events: list[object] = []
    while True:
        ev = core.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, (EnterTransmission, Aborted, StartTLS)):
            return events


FEEDERS = [pytest.param(feed_whole, id="whole"), pytest.param(feed_bytewise, id="bytewise")]

# (name, client bytes after flags, expected option replies, expected final event type)
HANDSHAKE_TABLE = [
    ("go", opt(c.OPT_GO, go()), [(c.OPT_GO, c.REP_INFO), (c.OPT_GO, c.REP_ACK)],
     EnterTransmission),
    ("default export", opt(c.OPT_GO, go(b"")),
     [(c.OPT_GO, c.REP_INFO), (c.OPT_GO, c.REP_INFO), (c.OPT_GO, c.REP_ACK)], EnterTransmission),
    ("info then go", opt(c.OPT_INFO, go(infos=(c.INFO_BLOCK_SIZE,))) + opt(c.OPT_GO, go()),
     [(c.OPT_INFO, c.REP_INFO), (c.OPT_INFO, c.REP_INFO), (c.OPT_INFO, c.REP_ACK),
      (c.OPT_GO, c.REP_INFO), (c.OPT_GO, c.REP_ACK)], EnterTransmission),
    ("list", opt(c.OPT_LIST) + opt(c.OPT_ABORT),
     [(c.OPT_LIST, c.REP_SERVER), (c.OPT_LIST, c.REP_ACK), (c.OPT_ABORT, c.REP_ACK)], Aborted),
    ("unsupported", opt(99) + opt(c.OPT_ABORT),
     [(99, c.REP_ERR_UNSUP), (c.OPT_ABORT, c.REP_ACK)], Aborted),
    ("unknown export", opt(c.OPT_GO, go(b"x")) + opt(c.OPT_ABORT),
     [(c.OPT_GO, c.REP_ERR_UNKNOWN), (c.OPT_ABORT, c.REP_ACK)], Aborted),
    ("meta without structured", opt(c.OPT_LIST_META_CONTEXT, struct.pack(">II", 0, 0))
     + opt(c.OPT_ABORT),
     [(c.OPT_LIST_META_CONTEXT, c.REP_ERR_INVALID), (c.OPT_ABORT, c.REP_ACK)], Aborted),
    ("structured + set meta + go",
     opt(c.OPT_STRUCTURED_REPLY)
     + opt(c.OPT_SET_META_CONTEXT, struct.pack(">I4sII15s", 4, b"disk", 1, 15,
                                               b"base:allocation"))
     + opt(c.OPT_GO, go()),
     [(c.OPT_STRUCTURED_REPLY, c.REP_ACK), (c.OPT_SET_META_CONTEXT, c.REP_META_CONTEXT),
      (c.OPT_SET_META_CONTEXT, c.REP_ACK), (c.OPT_GO, c.REP_INFO), (c.OPT_GO, c.REP_ACK)],
     EnterTransmission),
    ("starttls refused when off", opt(c.OPT_STARTTLS) + opt(c.OPT_ABORT),
     [(c.OPT_STARTTLS, c.REP_ERR_POLICY), (c.OPT_ABORT, c.REP_ACK)], Aborted),
    ("truncated go", opt(c.OPT_GO, b"\0\0") + opt(c.OPT_ABORT),
     [(c.OPT_GO, c.REP_ERR_INVALID), (c.OPT_ABORT, c.REP_ACK)], Aborted),
]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("name", "wire", "expected", "final"), HANDSHAKE_TABLE,
                         ids=[row[0] for row in HANDSHAKE_TABLE])
@pytest.mark.parametrize("trailing", [b"", b"\x25\x60\x95\x13trailing"], ids=["", "trailing"])
def test_server_handshake_table(feed: Feed, name: str, wire: bytes,
                                expected: list[tuple[int, int]], final: type,
                                trailing: bytes) -> None:
    core = _server()
    greeting = core.data_to_send()
    assert struct.unpack(">QQH", greeting) == (c.NBDMAGIC, c.IHAVEOPT, 3)
    events = feed(core, struct.pack(">I", 3) + wire + trailing)
    assert isinstance(events[-1], final)
    got = [(o, t) for o, t, _ in replies(core.data_to_send())]
    assert got == expected
    if isinstance(events[-1], EnterTransmission):
        assert events[-1].trailing == trailing
        assert events[-1].export is EXPORT


def test_structured_and_meta_are_reported() -> None:
    core = _server()
    core.data_to_send()
    meta = struct.pack(">I4sII15s", 4, b"disk", 1, 15, b"base:allocation")
    events = feed_whole(core, struct.pack(">I", 3) + opt(c.OPT_STRUCTURED_REPLY)
                        + opt(c.OPT_SET_META_CONTEXT, meta) + opt(c.OPT_GO, go()))
    ev = events[-1]
    assert isinstance(ev, EnterTransmission)
    assert ev.structured and dict(ev.contexts) == {1: "base:allocation"}
    assert ev.flags & c.TF_SEND_DF


@pytest.mark.parametrize("wire", [
    struct.pack(">I", 0x80),  # unknown client flag
    struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0),  # bad option magic
    struct.pack(">I", 3) + opt(c.OPT_EXPORT_NAME, b"nope"),  # cannot error: must drop
])
def test_server_handshake_hard_disconnects(wire: bytes) -> None:
    core = _server()
    core.receive_data(wire)
    with pytest.raises(HardDisconnect):
        _drain(core)
    with pytest.raises(LocalProtocolError):  # ERROR is sticky
        core.next_event()


def test_tls_required_gates_everything_but_starttls() -> None:
    core = _server(TLSMode.REQUIRED)
    core.data_to_send()
    events = feed_whole(core, struct.pack(">I", 3) + opt(c.OPT_GO, go())
                        + opt(c.OPT_STRUCTURED_REPLY) + opt(c.OPT_STARTTLS))
    assert isinstance(events[-1], StartTLS)
    assert [r[1] for r in replies(core.data_to_send())] == [
        c.REP_ERR_TLS_REQD, c.REP_ERR_TLS_REQD, c.REP_ACK]
    core.tls_established()
    assert core.tls_active
    events = feed_whole(core, opt(c.OPT_STARTTLS) + opt(c.OPT_GO, go()))
    assert [r[1] for r in replies(core.data_to_send())] == [
        c.REP_ERR_INVALID, c.REP_INFO, c.REP_ACK]
    assert isinstance(events[-1], EnterTransmission) and not events[-1].structured


def test_eof_mid_option_is_remote_error() -> None:
    core = _server()
    core.receive_data(struct.pack(">I", 3) + opt(c.OPT_GO, go())[:10])
    assert core.next_event() is NEED_DATA
    core.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        core.next_event()


# --- transmission -------------------------------------------------------------------


def _tx(structured: bool = True, flags: int = FLAGS) -> ServerTransmission:
    return ServerTransmission(EnterTransmission(EXPORT, flags | c.TF_SEND_DF, structured,
                                                {1: "base:allocation"}, b""))


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return c.REQUEST.pack(c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


TX_TABLE = [
    ("read", req(c.CMD_READ, 0, 512), Request, 0),
    ("write", req(c.CMD_WRITE, 10, 3) + b"abc", Request, 0),
    ("flush", req(c.CMD_FLUSH), Request, 0),
    ("fua write", req(c.CMD_WRITE, 0, 1, c.CMD_FLAG_FUA) + b"x", Request, 0),
    ("fast zero", req(c.CMD_WRITE_ZEROES, 0, 4096, c.CMD_FLAG_FAST_ZERO), Request, 0),
    ("block status req_one", req(c.CMD_BLOCK_STATUS, 0, 4096, c.CMD_FLAG_REQ_ONE), Request, 0),
    ("read past end", req(c.CMD_READ, (1 << 20) - 1, 2), BadRequest, c.EINVAL),
    ("write past end", req(c.CMD_WRITE, 1 << 20, 1) + b"x", BadRequest, c.ENOSPC),
    ("oversized write skipped", req(c.CMD_WRITE, 0, c.MAX_REQUEST + 1)
     + bytes(c.MAX_REQUEST + 1), BadRequest, c.EINVAL),
    ("read wrapping 2^64", req(c.CMD_READ, (1 << 64) - 512, 1024), BadRequest, c.EINVAL),
    ("read crossing 2^63-1", req(c.CMD_READ, (1 << 63) - 1, 2), BadRequest, c.EINVAL),
    ("write wrapping 2^64", req(c.CMD_WRITE, (1 << 64) - 1, 2) + b"xy", BadRequest, c.ENOSPC),
    ("zeroes wrapping 2^64", req(c.CMD_WRITE_ZEROES, (1 << 64) - 4096, 8192), BadRequest,
     c.ENOSPC),
    ("unknown command", req(42), BadRequest, c.EINVAL),
    ("flag on wrong command", req(c.CMD_FLUSH, 0, 0, c.CMD_FLAG_DF), BadRequest, c.EINVAL),
    ("cache not advertised", req(c.CMD_CACHE, 0, 512), BadRequest, c.EINVAL),
    ("disc", req(c.CMD_DISC), Disconnect, 0),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("name", "wire", "kind", "err"), TX_TABLE,
                         ids=[row[0] for row in TX_TABLE])
def test_server_transmission_table(name: str, wire: bytes, kind: type, err: int,
                                   bytewise: bool) -> None:
    if bytewise and len(wire) > 100_000:
        wire_chunks = [wire[:40], wire[40:1000]] + [wire[i : i + 65536]
                                                    for i in range(1000, len(wire), 65536)]
    elif bytewise:
        wire_chunks = [wire[i : i + 1] for i in range(len(wire))]
    else:
        wire_chunks = [wire]
    tx = _tx()
    trailing = req(c.CMD_READ, 0, 1, cookie=99)
    events: list[object] = []
    for chunk in wire_chunks + [trailing]:
        view = tx.get_buffer(len(chunk))
        view[: len(chunk)] = chunk
        tx.buffer_updated(len(chunk))
        while (ev := tx.next_event()) is not NEED_DATA:
            if isinstance(ev, Request) and ev.payload is not None:
                ev.payload = memoryview(bytes(ev.payload))  # valid only until next buffer call
            events.append(ev)
    assert len(events) == 2, events
    first, second = events
    assert isinstance(first, kind)
    if isinstance(first, BadRequest):
        assert first.errno == err and first.cookie == 7
    if isinstance(first, Request) and first.type == c.CMD_WRITE:
        assert first.payload is not None and len(first.payload) == first.length
    assert isinstance(second, Request) and second.cookie == 99  # still in sync


def test_read_only_refuses_writes_with_eperm() -> None:
    tx = _tx(flags=FLAGS | c.TF_READ_ONLY)
    tx.receive_data(req(c.CMD_TRIM, 0, 10) + req(c.CMD_WRITE, 0, 2) + b"ab")
    a, b = tx.next_event(), tx.next_event()
    assert isinstance(a, BadRequest) and a.errno == c.EPERM
    assert isinstance(b, BadRequest) and b.errno == c.EPERM


def test_bad_request_magic_is_hard_disconnect() -> None:
    tx = _tx()
    tx.receive_data(b"\0" * 28)
    with pytest.raises(HardDisconnect):
        tx.next_event()


def test_eof_mid_request() -> None:
    tx = _tx()
    tx.receive_data(req(c.CMD_WRITE, 0, 10) + b"abc")
    assert tx.next_event() is NEED_DATA
    tx.receive_data(b"")
    with pytest.raises(HardDisconnect, match="middle"):
        tx.next_event()


# --- the client core against the server core ------------------------------------------


def _pump(client: ClientHandshake, server: ServerHandshake) -> object:
    server_events: list[object] = []
    for _ in range(50):
        ev = client.next_event()
        out = client.data_to_send()
        if out:
            server.receive_data(out)
            server_events += _drain(server)
        back = server.data_to_send()
        if back:
            client.receive_data(back)
        if ev is not NEED_DATA:
            return ev, server_events
    raise AssertionError("no progress")


def test_client_core_negotiates_with_server_core() -> None:
    server = _server()
    client = ClientHandshake("disk", meta_contexts=(c.BASE_ALLOCATION,))
    client.receive_data(server.data_to_send())
    ev, server_events = _pump(client, server)  # type: ignore[misc]
    assert isinstance(ev, Negotiated)
    assert ev.size == EXPORT.size and ev.structured and ev.contexts == {1: "base:allocation"}
    assert ev.max_block == c.MAX_REQUEST
    assert isinstance(server_events[-1], EnterTransmission)


def test_client_core_lists_exports() -> None:
    server = _server()
    client = ClientHandshake(list_exports=True)
    client.receive_data(server.data_to_send())
    ev, _ = _pump(client, server)  # type: ignore[misc]
    assert isinstance(ev, ExportList) and ev.exports == (("disk", "a disk"),)


def test_client_transmission_reassembles_chunks() -> None:
    tx = ClientTransmission(Negotiated("", 1 << 20, FLAGS, True, {1: "base:allocation"}))
    cookie, _ = tx.request(c.CMD_READ, 100, 20)
    wire = (c.DATA_CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 0, c.REPLY_TYPE_OFFSET_DATA,
                                     cookie, 8 + 10, 110) + b"B" * 10
            + c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 0, c.REPLY_TYPE_OFFSET_HOLE,
                                  cookie, 12) + struct.pack(">QI", 100, 10)
            + c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE,
                                  c.REPLY_TYPE_NONE, cookie, 0))
    for i in range(len(wire)):
        tx.receive_data(wire[i : i + 1])
        ev = tx.next_event()
        if i < len(wire) - 1:
            assert ev is NEED_DATA
    assert ev.data == bytes(10) + b"B" * 10  # type: ignore[union-attr]
