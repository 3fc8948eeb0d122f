"""The sans-io bus core: table tests fed whole, byte by byte and with trailing bytes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from meshlink import LocalProtocolError, RemoteProtocolError
from meshlink.bus import ExtCodec, PeerClosedError, VersionMismatch
from meshlink.bus.codec import PROTOCOL_VERSION
from meshlink.bus.events import (
    NEED_DATA,
    Cancel,
    Channel,
    Close,
    ConnectionClosed,
    Credit,
    Error,
    Event,
    Hello,
    Notify,
    Ping,
    Pong,
    Publish,
    Reply,
    Request,
    StreamData,
    StreamEnd,
    StreamOpen,
    StreamReset,
    Subscribe,
    Subscribed,
    Unsubscribe,
)
from meshlink.bus.proto import NOTIFY_PREFIXES, BusProtocol


def hello(name: str = "x", version: int = PROTOCOL_VERSION, **kw: Any) -> Hello:
    args: dict[str, Any] = dict(
        version=version,
        features=["rpc"],
        name=name,
        max_concurrency=4,
        notify_window=4096,
        stream_window=4096,
        max_frame_size=4096,
    )
    args.update(kw)
    return Hello(**args)


def pair(**kw: Any) -> tuple[BusProtocol, BusProtocol, bytes, bytes]:
    """Two cores; returns them plus each one's hello bytes (not yet delivered)."""
    a = BusProtocol(hello("a", **kw))
    b = BusProtocol(hello("b", **kw))
    return a, b, a.send(a.our_hello), b.send(b.our_hello)


def drain(p: BusProtocol) -> list[Event]:
    out: list[Event] = []
    while (ev := p.next_event()) is not NEED_DATA:
        assert not isinstance(ev, type(NEED_DATA))
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


def opened() -> tuple[BusProtocol, BusProtocol]:
    a, b, ha, hb = pair()
    b.receive_data(ha)
    a.receive_data(hb)
    assert drain(a) == [b.our_hello] and drain(b) == [a.our_hello]
    return a, b


# Frames the sender may emit without prior state, and the event the receiver sees.
TABLE: list[Event] = [
    Notify("m", [1, "two", b"3", [4.5, None, True], {"k": "v"}]),
    Subscribe(3, "topic.", 4096),
    Subscribed(3),
    Unsubscribe(3),
    StreamOpen(7, "upload", ["name"]),
    StreamEnd(7, True),
    StreamReset(7, False, "ValueError", "boom"),
    StreamReset(8, True),
    Credit(Channel.STREAM, 100, 7, True),
    Credit(Channel.NOTIFY, 5),
    Ping(99),
    Pong(99),
    Close(),
]


@pytest.mark.parametrize("event", TABLE, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_roundtrip(event: Event, mode: str) -> None:
    a, b = opened()
    data = a.send(event)
    if mode == "whole":
        b.receive_data(data)
    elif mode == "bytewise":
        for i in range(len(data) - 1):
            b.receive_data(data[i : i + 1])
            assert b.next_event() is NEED_DATA
        b.receive_data(data[-1:])
    else:
        b.receive_data(data + a.send(Ping(1))[:-1])  # a partial frame trails
    got = b.next_event()
    assert got == event or (hasattr(got, "size") and type(got) is type(event))
    assert b.next_event() is NEED_DATA


def test_sized_events_report_wire_size() -> None:
    a, b = opened()
    for ev in (Notify("m", [b"x" * 100]), StreamData(1, True, b"y" * 50), Publish(0, "t", 1)):
        data = a.send(ev)
        b.receive_data(data)
        got = b.next_event()
        assert getattr(got, "size") == len(data)  # noqa: B009


def test_request_reply_accounting() -> None:
    a, b = opened()
    b.receive_data(a.send(Request(1, "f", [1])))
    assert b.next_event() == Request(1, "f", [1])
    assert b.requests_in_flight == 1
    a.receive_data(b.send(Reply(1, "ok")))
    assert a.next_event() == Reply(1, "ok")
    with pytest.raises(LocalProtocolError):
        b.send(Reply(1, "again"))  # answered already


def test_error_and_cancel_frames() -> None:
    a, b = opened()
    b.receive_data(a.send(Request(5, "f", [])) + a.send(Cancel(5)))
    assert drain(b) == [Request(5, "f", []), Cancel(5)]
    a.receive_data(b.send(Error(5, "Cancelled", "x")))
    assert a.next_event() == Error(5, "Cancelled", "x")


def test_reply_to_unknown_request_is_remote_error() -> None:
    a, b = opened()
    a.receive_data(b.send(Cancel(1)))  # harmless
    assert a.next_event() == Cancel(1)
    raw = msgpack.packb([2, 42, None])  # reply to request 42
    a.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match="unknown request"):
        a.next_event()
    with pytest.raises(RemoteProtocolError):  # ERROR state sticks
        a.next_event()


def test_concurrency_limit_enforced() -> None:
    a, b = opened()
    for i in range(4):
        b.receive_data(a.send(Request(i, "f", [])))
    assert len(drain(b)) == 4
    b.receive_data(a.send(Request(4, "f", [])))
    with pytest.raises(RemoteProtocolError, match="concurrency"):
        b.next_event()


def test_duplicate_request_id() -> None:
    a, b = opened()
    raw = msgpack.packb([1, 1, "f", []])  # request 1
    b.receive_data(raw + raw)
    b.next_event()
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        b.next_event()


def test_version_mismatch_on_both_sides() -> None:
    a = BusProtocol(hello("a"))
    b = BusProtocol(hello("b", version=PROTOCOL_VERSION + 1))
    a.receive_data(b.send(b.our_hello))
    b.receive_data(a.send(a.our_hello))
    with pytest.raises(VersionMismatch) as ia:
        a.next_event()
    with pytest.raises(VersionMismatch) as ib:
        b.next_event()
    assert ia.value.peer_version == PROTOCOL_VERSION + 1
    assert ib.value.peer_version == PROTOCOL_VERSION
    assert "version mismatch" in str(ia.value)


def test_first_frame_must_be_hello() -> None:
    a, b, ha, hb = pair()
    a.receive_data(msgpack.packb([15, 1]))  # a ping
    with pytest.raises(RemoteProtocolError, match="first frame"):
        a.next_event()
    with pytest.raises(LocalProtocolError, match="must be a hello"):
        BusProtocol(hello()).send(Ping(1))


def test_second_hello_rejected() -> None:
    a, b = opened()
    a.receive_data(
        msgpack.packb(
            {"k": 0, "v": PROTOCOL_VERSION, "f": [], "n": "", "c": 1, "nw": 1, "sw": 1, "x": 2048}
        )
    )
    with pytest.raises(RemoteProtocolError, match="second hello"):
        a.next_event()


BAD_FRAMES: list[tuple[str, bytes]] = [
    ("not an array", msgpack.packb({"k": 5, "m": "x", "a": []})),  # a v1 frame
    ("empty array", msgpack.packb([])),
    ("short request", msgpack.packb([1, 2])),
    ("no kind", msgpack.packb([None, 1])),
    ("unknown kind", msgpack.packb([99])),
    ("kind not int", msgpack.packb(["1", 1])),
    ("missing field", msgpack.packb([5, "x"])),
    ("extra field", msgpack.packb([5, "x", [], 1])),
    ("wrong type", msgpack.packb([5, 1, []])),
    ("args not array", msgpack.packb([5, "x", {}])),
    ("negative id", msgpack.packb([4, -1])),
    ("huge id", msgpack.packb([4, 2**64 - 1])),
    ("bool id", msgpack.packb([4, True])),
    ("bool request id", msgpack.packb([1, True, "f", []])),
    ("bad credit channel", msgpack.packb([14, 9, 1, 0, False])),
    ("int map key", msgpack.packb({1: 2})),
    ("ext type", msgpack.packb([5, "x", [msgpack.ExtType(5, b"abc")]])),
    ("timestamp ext", msgpack.packb([5, "x", [msgpack.Timestamp(1, 0)]])),
    ("invalid utf-8", b"\x81\xa1k\xa2\xff\xfe"),
    ("reserved byte", b"\xc1"),
    ("array too long", b"\xdd\xff\xff\xff\xff"),
]


@pytest.mark.parametrize("data", [d for _, d in BAD_FRAMES], ids=[n for n, _ in BAD_FRAMES])
def test_malformed_frames(data: bytes) -> None:
    a, b = opened()
    a.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        for _ in range(3):
            if a.next_event() is NEED_DATA:
                a.receive_data(b"")


def test_frame_size_limit() -> None:
    a, b = opened()
    a.receive_data(msgpack.packb([5, "x", [b"z" * 5000]]))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        a.next_event()


def test_oversized_partial_frame_hits_buffer_limit() -> None:
    a, b = opened()
    header = b"\xc6" + (1 << 30).to_bytes(4, "big")  # bin32 of 1 GiB
    with pytest.raises(RemoteProtocolError):
        a.receive_data(msgpack.packb([5, "x"])[: -0 or None] + header)
        for _ in range(2000):
            a.receive_data(b"\0" * 65536)
            assert a.next_event() is NEED_DATA


def test_container_limit() -> None:
    a = BusProtocol(hello(), max_container_len=10)
    b = BusProtocol(hello())
    a.send(a.our_hello)
    a.receive_data(b.send(b.our_hello))
    a.next_event()
    a.receive_data(b.send(Notify("m", list(range(11)))))
    with pytest.raises(RemoteProtocolError):
        a.next_event()


def test_eof_inside_frame_and_at_boundary() -> None:
    a, b = opened()
    data = a.send(Ping(1))
    b.receive_data(data + data[:1])
    b.receive_data(b"")
    assert b.next_event() == Ping(1)
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        b.next_event()
    a2, b2 = opened()
    b2.receive_data(b"")
    assert isinstance(b2.next_event(), ConnectionClosed)
    assert b2.state == "closed"


def test_close_with_error_names_it() -> None:
    a, b = opened()
    b.receive_data(a.send(Close("RemoteProtocolError", "you sent junk")))
    with pytest.raises(PeerClosedError, match="you sent junk"):
        b.next_event()


def test_pack_failure_leaves_connection_usable() -> None:
    a, b = opened()
    with pytest.raises(LocalProtocolError):
        a.send(Notify("m", [object()]))
    with pytest.raises(LocalProtocolError, match="exceeds"):
        a.send(Notify("m", [b"x" * 5000]))
    b.receive_data(a.send(Ping(3)))
    assert b.next_event() == Ping(3)


def test_registered_ext_type_roundtrip() -> None:
    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

    codec = ExtCodec(
        1,
        Point,
        lambda p: bytes([p.x, p.y]),
        lambda d: Point(d[0], d[1]),
    )
    a = BusProtocol(hello(), ext_types=[codec])
    b = BusProtocol(hello(), ext_types=[codec])
    a.receive_data(b.send(b.our_hello))
    b.receive_data(a.send(a.our_hello))
    a.next_event()
    b.next_event()
    b.receive_data(a.send(Notify("m", [Point(3, 4)])))
    ev = b.next_event()
    assert isinstance(ev, Notify)
    assert (ev.args[0].x, ev.args[0].y) == (3, 4)
    b.receive_data(msgpack.packb([5, "x", [msgpack.ExtType(2, b"")]]))
    with pytest.raises(RemoteProtocolError, match="not registered"):
        b.next_event()


def test_many_frames_in_one_chunk() -> None:
    a, b = opened()
    data = b"".join(a.send(Notify("n", [i])) for i in range(1000))
    b.receive_data(data)
    events = drain(b)
    assert [e.args[0] for e in events if isinstance(e, Notify)] == list(range(1000))


class RecordingSink:
    """A FrameSink that turns what it is handed back into events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def notifications(self, batch: list[tuple[str, list[Any], int]], total: int) -> None:
        assert batch and total == sum(size for _, _, size in batch)
        self.events.extend(Notify(m, a, size) for m, a, size in batch)

    def request(self, id: int, method: str, args: list[Any]) -> None:
        self.events.append(Request(id, method, args))

    def reply(self, id: int, result: Any) -> None:
        self.events.append(Reply(id, result))

    def error(self, id: int, type: str, message: str) -> None:
        self.events.append(Error(id, type, message))

    def publish(self, id: int, topic: str, data: Any, size: int) -> None:
        self.events.append(Publish(id, topic, data, size))

    def stream_data(self, id: int, opened_by_sender: bool, data: Any, size: int) -> None:
        self.events.append(StreamData(id, opened_by_sender, data, size))

    def event(self, event: Event) -> None:
        self.events.append(event)


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_receive_frames_matches_next_event(mode: str) -> None:
    """The batch reader hands over the same events, sizes and accounting."""
    a, b = opened()
    a2, b2 = opened()  # a2 reads the same bytes with next_event
    for x, y in ((a, b), (a2, b2)):
        y.receive_data(x.send(Request(1, "g", [])) + x.send(Request(2, "h", [])))
        assert len(drain(y)) == 2
    frames = [
        *TABLE[:-1],
        Request(5, "f", [1, "x"]),
        Reply(1, {"r": [1, 2]}),
        Error(2, "ValueError", "no"),
        Publish(3, "t.x", b"data"),
        StreamData(7, False, [1]),
        Close(),
    ]
    data = b"".join(b.send(e) for e in frames)
    a2.receive_data(data)
    expected = drain(a2)
    sink = RecordingSink()
    ended = False
    chunks = [data] if mode == "whole" else [data[i : i + 1] for i in range(len(data))]
    for chunk in chunks:
        assert not ended
        a.receive_data(chunk)
        ended = a.receive_frames(sink)
    assert ended
    assert sink.events == expected
    assert [getattr(e, "size", 0) for e in sink.events] == [getattr(e, "size", 0) for e in expected]
    assert a.state == a2.state == "closed"


@pytest.mark.parametrize("data", [d for _, d in BAD_FRAMES], ids=[n for n, _ in BAD_FRAMES])
def test_receive_frames_rejects_malformed_frames(data: bytes) -> None:
    a, b = opened()
    sink = RecordingSink()
    a.receive_data(b.send(Ping(1)) + data)
    with pytest.raises(RemoteProtocolError):
        a.receive_frames(sink)
        a.receive_data(b"")
        a.receive_frames(sink)
    assert sink.events == [Ping(1)]
    with pytest.raises(RemoteProtocolError):  # ERROR state sticks
        a.receive_frames(sink)


def test_receive_frames_accounting_errors() -> None:
    a, b = opened()
    sink = RecordingSink()
    a.receive_data(msgpack.packb([2, 42, None]))
    with pytest.raises(RemoteProtocolError, match="unknown request"):
        a.receive_frames(sink)
    a, b = opened()
    a.receive_data(b"".join(b.send(Request(i, "f", [])) for i in range(4)))
    a.receive_data(msgpack.packb([1, 3, "f", []]))
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        a.receive_frames(sink)
    a, b = opened()
    a.receive_data(b"".join(b.send(Request(i, "f", [])) for i in range(5)))
    with pytest.raises(RemoteProtocolError, match="concurrency"):
        a.receive_frames(sink)


def test_receive_frames_eof() -> None:
    a, b = opened()
    sink = RecordingSink()
    data = b.send(Ping(1))
    a.receive_data(data + data[:1])
    a.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        a.receive_frames(sink)
    a, b = opened()
    sink = RecordingSink()
    a.receive_data(data)
    a.receive_data(b"")
    assert a.receive_frames(sink)
    assert sink.events == [Ping(1), ConnectionClosed()]


def test_fast_packers_match_send() -> None:
    a, b = opened()
    a2, b2 = opened()
    assert a.pack_notify("m", (1, b"x")) == a2.send(Notify("m", [1, b"x"]))
    assert a.pack_request(3, "m", ("y",)) == a2.send(Request(3, "m", ["y"]))
    assert a.pack_publish(1, "t", {"a": 1}) == a2.send(Publish(1, "t", {"a": 1}))
    assert a.pack_stream_data(2, True, None) == a2.send(StreamData(2, True, None))
    b.receive_data(a.send(Request(4, "f", [])))
    b2.receive_data(a2.send(Request(4, "f", [])))
    drain(b), drain(b2)
    assert b.pack_reply(4, [1]) == b2.send(Reply(4, [1]))
    with pytest.raises(LocalProtocolError, match="not in flight"):
        b.pack_reply(4, [1])
    with pytest.raises(LocalProtocolError, match="already in flight"):
        a.pack_request(3, "m", ())
    with pytest.raises(LocalProtocolError, match="cannot pack"):
        a.pack_notify("m", (object(),))
    with pytest.raises(LocalProtocolError, match="exceeds"):
        a.pack_notify("m", (b"x" * 5000,))
    with pytest.raises(LocalProtocolError, match="must be a hello"):
        BusProtocol(hello()).pack_notify("m", ())
    # A protocol error from the peer stops every send but a close, for a
    # method whose frame start pack_notify has cached as well.
    a.receive_data(b"\xc1")  # never valid msgpack
    with pytest.raises(RemoteProtocolError):
        drain(a)
    with pytest.raises(LocalProtocolError, match="failed"):
        a.pack_notify("m", (1, b"x"))


def test_pack_notify_matches_send_for_any_method_and_keeps_few_prefixes() -> None:
    # pack_notify joins a cached per-method prefix and the packed arguments.
    a, _ = opened()
    a2, _ = opened()
    methods: list[Any] = ["m", "", "x" * 40, "\u00e9t\u00e9 \U0001f600", "y" * 300]
    for method in methods * 2:  # the second round uses the cached prefixes
        for args in [(), (1,), (None, [1, 2], {"k": b"v"}), (b"z" * 3000,)]:
            assert a.pack_notify(method, args) == a2.send(Notify(method, list(args)))
    # A failed pack leaves the next one whole.
    with pytest.raises(LocalProtocolError, match="cannot pack"):
        a.pack_notify("m", (1, object()))
    assert a.pack_notify("m", (2,)) == a2.send(Notify("m", [2]))
    # Invented names are served but not all kept.
    for i in range(1000):
        assert a.pack_notify(f"n{i}", ()) == a2.send(Notify(f"n{i}", []))
    assert len(a._notify_prefixes) <= NOTIFY_PREFIXES


def test_take_reply_takes_exactly_the_awaited_reply() -> None:
    """The blocking client's one-frame path: the reply to the awaited request,
    alone and whole, is taken with the same accounting as receive_frames; a
    second reply to that id is then an unknown request's."""
    a, b = opened()
    b.receive_data(a.pack_request(7, "f", [1]))
    assert b.next_event() == Request(7, "f", [1])
    reply = b.pack_reply(7, {"ok": [1, 2]})
    assert a.take_reply(reply, 7) == ({"ok": [1, 2]},)
    assert a.frames_in >= 1
    assert a.take_reply(reply, 7) is None  # no longer in flight
    a.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match="unknown request"):
        a.receive_frames(RecordingSink())


def test_take_any_reply_takes_the_reply_to_any_request_in_flight() -> None:
    """A client reader's one-frame path: the reply to whichever request it
    answers, counted as by receive_frames; one to a request not in flight is
    left to the usual path, which refuses it."""
    a, b = opened()
    replies = {}
    for rid in (3, 4):
        b.receive_data(a.pack_request(rid, "f", [rid]))
        assert b.next_event() == Request(rid, "f", [rid])
        replies[rid] = b.pack_reply(rid, rid * 10)
    assert a.take_any_reply(replies[4]) == (4, 40)
    assert a.take_any_reply(replies[4]) is None  # no longer in flight
    assert a.take_any_reply(b.send(Ping(1))) is None
    assert a.take_any_reply(replies[3] + replies[3][:1]) is None  # more than one frame
    assert a.take_any_reply(replies[3]) == (3, 30)
    a.receive_data(replies[3])
    with pytest.raises(RemoteProtocolError, match="unknown request"):
        a.receive_frames(RecordingSink())


def _answer(a: BusProtocol, b: BusProtocol, rid: int, **error: str) -> bytes:
    """``b``'s answer to ``a``'s request ``rid``: a reply, or an error frame."""
    b.receive_data(a.pack_request(rid, "f", []))
    assert isinstance(b.next_event(), Request)
    if error:
        return b.send(Error(rid, error["type"], "m"))
    return b.pack_reply(rid, "r")


@pytest.mark.parametrize("case", ["ping first", "ping after", "partial", "other id",
                                  "error reply", "malformed", "buffered", "too big"])
def test_take_reply_leaves_everything_else_to_receive_frames(case: str) -> None:
    """Whatever is not exactly the awaited reply is not taken, and the usual
    path then sees every frame (or the same protocol error) as without it."""
    a, b = opened()
    ping = b.send(Ping(5))
    if case == "ping first":
        data = ping + _answer(a, b, 1)
    elif case == "ping after":
        data = _answer(a, b, 1) + ping
    elif case == "partial":
        data = _answer(a, b, 1)[:-1]
    elif case == "other id":
        _answer(a, b, 1)
        data = _answer(a, b, 2)
    elif case == "error reply":
        data = _answer(a, b, 1, type="E")
    elif case == "malformed":
        a.pack_request(1, "f", [])
        data = b"\xc1"
    elif case == "buffered":
        a.receive_data(ping[:1])  # half a frame already in: order must be kept
        data = ping[1:] + _answer(a, b, 1)
    else:  # "too big": larger than our max_frame_size (4096)
        a.pack_request(1, "f", [])
        data = msgpack.packb([2, 1, b"x" * 5000])
    assert a.take_reply(data, 1) is None
    if case != "other id":  # the reply to request 2, in flight: any reply takes it
        assert a.take_any_reply(data) is None
    sink = RecordingSink()
    a.receive_data(data)
    if case in ("malformed", "too big"):
        with pytest.raises(RemoteProtocolError):
            a.receive_frames(sink)
        return
    a.receive_frames(sink)
    kinds = [type(e).__name__ for e in sink.events]
    expected = {"ping first": ["Ping", "Reply"], "ping after": ["Reply", "Ping"],
                "partial": [], "other id": ["Reply"], "error reply": ["Error"],
                "buffered": ["Ping", "Reply"]}[case]
    assert kinds == expected


def test_take_request_takes_one_whole_request_and_counts_it() -> None:
    """A server's one-frame path: the request is counted in flight as by
    receive_frames (its id again, or one past max_concurrency, is then left
    to the usual path, which refuses it); anything but exactly one request
    is not taken, and the usual path sees every frame."""
    a, b = opened()
    data = b.pack_request(3, "f", [1, "x"])
    assert a.take_request(data) == (3, "f", [1, "x"])
    assert a.requests_in_flight == 1
    assert a.take_request(data) is None  # id 3 is in flight
    a.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        a.receive_frames(RecordingSink())

    a, b = opened()  # max_concurrency is 4
    for i in range(4):
        assert a.take_request(b.pack_request(i, "f", [])) is not None
    fifth = b.pack_request(4, "f", [])
    assert a.take_request(fifth) is None
    a.receive_data(fifth)
    with pytest.raises(RemoteProtocolError, match="concurrency"):
        a.receive_frames(RecordingSink())

    request = msgpack.packb([1, 0, "f", []])
    for data, kinds in [
        (request + b.send(Ping(1)), ["Request", "Ping"]),
        (b.send(Ping(1)), ["Ping"]),
        (request[:-1], []),
        (msgpack.packb([1, -1, "f", []]), None),  # an id out of range
    ]:
        a, _ = opened()
        assert a.take_request(data) is None
        sink = RecordingSink()
        a.receive_data(data)
        if kinds is None:
            with pytest.raises(RemoteProtocolError):
                a.receive_frames(sink)
        else:
            a.receive_frames(sink)
            assert [type(e).__name__ for e in sink.events] == kinds
