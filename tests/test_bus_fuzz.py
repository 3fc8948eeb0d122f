"""Fuzz: random and truncated byte streams never crash the bus, never hang,
and always end in a protocol error or a clean EOF."""

from __future__ import annotations

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlink import ConnectionLost, HandshakeError, RemoteProtocolError
from meshlink.bus import BusConfig, serve_bus
from meshlink.bus.codec import PROTOCOL_VERSION
from meshlink.bus.events import NEED_DATA, ConnectionClosed, Hello
from meshlink.bus.proto import BusProtocol

from .helpers.bus_service import make_handlers

CONFIG = BusConfig(heartbeat_interval=None, handshake_timeout=5, max_frame_size=65536)


def _hello() -> Hello:
    return Hello(PROTOCOL_VERSION, ["rpc"], "fuzz", 4, 4096, 4096, 65536)


HELLO = BusProtocol(_hello()).send(_hello())

# Values that may appear in frames: valid-looking and not.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=16),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=10,
)
keys = st.sampled_from(["k", "i", "m", "a", "r", "e", "s", "t", "d", "o", "p", "w", "c", "n"])
frames = st.one_of(
    st.dictionaries(keys, values, max_size=6).map(lambda d: d if "k" in d else {**d, "k": 0}),
    st.builds(
        lambda k, rest: {"k": k, **rest},
        st.integers(min_value=0, max_value=18),
        st.dictionaries(keys, st.integers(min_value=0, max_value=5) | scalars, max_size=5),
    ),
    # Array frames (protocol v2): a kind, then plausible or hostile fields.
    st.builds(
        lambda k, rest: [k, *rest],
        st.integers(min_value=0, max_value=18),
        st.lists(st.integers(min_value=0, max_value=5) | scalars | values, max_size=5),
    ),
    values,
)


def wire(objs: list[object]) -> bytes:
    return b"".join(msgpack.packb(o) for o in objs)


byte_streams = st.one_of(
    st.binary(max_size=512),  # pure noise
    st.builds(lambda b: HELLO + b, st.binary(max_size=512)),  # a hello then noise
    st.builds(lambda fs: HELLO + wire(fs), st.lists(frames, max_size=8)),  # hostile frames
    st.builds(  # a valid stream cut anywhere
        lambda fs, cut: (HELLO + wire(fs))[: cut % (len(HELLO) + len(wire(fs)) + 1)],
        st.lists(frames, max_size=6),
        st.integers(min_value=0),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=byte_streams, chunk=st.integers(min_value=1, max_value=64))
def test_core_never_crashes(data: bytes, chunk: int) -> None:
    core = BusProtocol(_hello())
    core.send(core.our_hello)
    try:
        for i in range(0, len(data), chunk):
            core.receive_data(data[i : i + chunk])
            while core.next_event() is not NEED_DATA:
                pass
        core.receive_data(b"")
        for _ in range(len(data) + 2):  # bounded: never loops forever
            if isinstance(core.next_event(), ConnectionClosed):
                break
        else:
            pytest.fail("no end after EOF")
    except RemoteProtocolError:
        pass


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=byte_streams, chunk=st.integers(min_value=1, max_value=512))
async def test_server_ends_cleanly_on_any_input(data: bytes, chunk: int) -> None:
    client, server = trio.testing.memory_stream_pair()
    outcome: list[BaseException | None] = []

    async def run_server() -> None:
        try:
            await serve_bus(server, make_handlers(), config=CONFIG)
            outcome.append(None)
        except (RemoteProtocolError, ConnectionLost, HandshakeError) as exc:
            outcome.append(exc)

    with trio.fail_after(10):  # never hang
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            try:
                for i in range(0, len(data), chunk):
                    await client.send_all(data[i : i + chunk])
                await client.send_eof()
            except trio.BrokenResourceError:
                pass  # the server already closed on us
            # Drain whatever the server answers until it closes.
            while True:
                try:
                    if not await client.receive_some(65536):
                        break
                except trio.BrokenResourceError:
                    break
    assert len(outcome) == 1
    exc = outcome[0]
    if isinstance(exc, ConnectionLost):
        assert "close frame" in str(exc) or "closed" in str(exc)  # an EOF, not a crash
    elif isinstance(exc, HandshakeError) and not isinstance(exc, RemoteProtocolError):
        assert "closed the transport" in str(exc)  # EOF before any hello
