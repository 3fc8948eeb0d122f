"""The vbd XenStore handshake (meshlink/disk/blk/xenbus.py) over the emulated
Xen (tests/xenemu): meshlink's backend and frontend in two domains, the tree
after connect and after close; and the frontend's writes played exactly in
the order Linux's xen-blkfront makes them (talk_to_blkback: a transaction
with ring-page-order, ring-ref0.., event-channel, protocol,
feature-persistent, then state Initialised), the backend's answers checked
node by node.  The data path over granted pages is not part of this."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from meshlink import HandshakeError
from meshlink.disk.blk.xenbus import (
    PROTOCOL,
    VbdPaths,
    XenbusState,
    create_vbd,
    vbd_backend,
    vbd_frontend,
)
from meshlink.transport.xenstore import NativeXenStore

from .xenemu.fixtures import XenHost, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]

BACK, FRONT, DEVID = 3, 5, 51712
PATHS = VbdPaths(BACK, FRONT, DEVID)
SECTORS = 2048


def store_as(monkeypatch: pytest.MonkeyPatch, domid: int) -> NativeXenStore:
    monkeypatch.setenv("XENEMU_DOMID", str(domid))
    return NativeXenStore()


def tree(xs: NativeXenStore, path: str) -> dict[str, str]:
    """Every node under ``path`` (relative name -> value)."""
    out: dict[str, str] = {}

    def walk(p: str, rel: str) -> None:
        for child in xs.directory(0, p):
            sub = f"{p}/{child}"
            name = f"{rel}{child}"
            out[name] = xs.read(0, sub)
            walk(sub, name + "/")

    walk(path, "")
    return out


@pytest.fixture
def toolstack(xen_host: XenHost, monkeypatch: pytest.MonkeyPatch) -> Iterator[NativeXenStore]:
    # Both domains exist before the toolstack gives them a device (in the
    # emulation a domain lives while one of its processes does: this one).
    for domid in (BACK, FRONT):
        store_as(monkeypatch, domid).close()
    dom0 = store_as(monkeypatch, 0)
    create_vbd(dom0, PATHS)
    yield dom0
    dom0.close()


async def backend(monkeypatch: pytest.MonkeyPatch, **kw: object) -> vbd_backend:
    monkeypatch.setenv("XENEMU_DOMID", str(BACK))
    b = vbd_backend(PATHS, sectors=SECTORS, **kw)  # type: ignore[arg-type]
    return await b.__aenter__()


@pytest.mark.parametrize("max_order", [0, 2])
async def test_meshlink_frontend_and_backend_in_two_domains(
    toolstack: NativeXenStore, monkeypatch: pytest.MonkeyPatch, max_order: int
) -> None:
    b = await backend(monkeypatch, discard=True)
    monkeypatch.setenv("XENEMU_DOMID", str(FRONT))
    f = await vbd_frontend(PATHS, lambda order: (list(range(8, 8 + (1 << order))), 7),
                           max_order=max_order).__aenter__()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(b.connected)
            disk = await f.connect()
    assert (disk.sectors, disk.sector_size, disk.read_only) == (SECTORS, 512, False)
    assert disk.flush and disk.discard and disk.barrier
    assert b.ring is not None and b.ring.order == max_order
    assert b.ring.ring_refs == tuple(range(8, 8 + (1 << max_order)))
    assert b.ring.event_channel == 7 and b.ring.protocol == PROTOCOL
    back, front = tree(toolstack, PATHS.backend), tree(toolstack, PATHS.frontend)
    assert back["state"] == front["state"] == "4"
    assert {k: back[k] for k in ("sectors", "sector-size", "info", "feature-barrier",
                                 "feature-flush-cache", "feature-discard",
                                 "max-ring-page-order")} == {
        "sectors": str(SECTORS), "sector-size": "512", "info": "0", "feature-barrier": "1",
        "feature-flush-cache": "1", "feature-discard": "1", "max-ring-page-order": "4"}
    refs = ({"ring-ref": "8"} if max_order == 0 else
            {f"ring-ref{i}": str(8 + i) for i in range(1 << max_order)}
            | {"ring-page-order": str(max_order)})
    assert {k: v for k, v in front.items() if k.startswith("ring-")} == refs
    assert (front["event-channel"], front["protocol"]) == ("7", PROTOCOL)
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(b.closed)
            await f.close()
    back, front = tree(toolstack, PATHS.backend), tree(toolstack, PATHS.frontend)
    assert back["state"] == front["state"] == str(int(XenbusState.CLOSED))
    await f.__aexit__()
    await b.__aexit__()


async def wait_state(xs: NativeXenStore, path: str, want: int) -> None:
    token = "linux-blkfront"
    xs.watch(f"{path}/state", token)
    try:
        with trio.fail_after(30):
            while xs.read(0, f"{path}/state") != str(want):
                await trio.lowlevel.wait_readable(xs.fileno())
                while xs.check_watch() is not None:
                    pass
    finally:
        xs.unwatch(f"{path}/state", token)


@pytest.mark.parametrize("order", [0, 1, 4])
async def test_linux_blkfront_write_sequence(
    toolstack: NativeXenStore, monkeypatch: pytest.MonkeyPatch, order: int
) -> None:
    b = await backend(monkeypatch)
    fe = store_as(monkeypatch, FRONT)
    be, me = PATHS.backend, PATHS.frontend
    async with trio.open_nursery() as n:
        n.start_soon(b.connected)
        # blkback_changed(InitWait) -> talk_to_blkback:
        await wait_state(fe, be, 2)
        assert int(fe.read(0, f"{be}/max-ring-page-order")) >= order
        t = fe.transaction_start()
        if order:
            fe.write(t, f"{me}/ring-page-order", str(order))
            for i in range(1 << order):
                fe.write(t, f"{me}/ring-ref{i}", str(100 + i))
        else:
            fe.write(t, f"{me}/ring-ref", "100")
        fe.write(t, f"{me}/event-channel", "9")
        fe.write(t, f"{me}/protocol", "x86_64-abi")
        fe.write(t, f"{me}/feature-persistent", "1")
        assert fe.transaction_end(t, False)
        fe.write(0, f"{me}/state", "3")  # xenbus_switch_state(Initialised)
        await wait_state(fe, be, 4)
    # What blkfront_connect reads, node by node.
    answers = {k: fe.read(0, f"{be}/{k}") for k in (
        "sectors", "info", "sector-size", "physical-sector-size", "feature-flush-cache",
        "feature-discard", "feature-barrier", "feature-persistent")}
    assert answers == {"sectors": str(SECTORS), "info": "0", "sector-size": "512",
                       "physical-sector-size": "512", "feature-flush-cache": "1",
                       "feature-discard": "0", "feature-barrier": "1",
                       "feature-persistent": "0"}
    assert b.ring is not None and b.ring.persistent
    assert b.ring.ring_refs == tuple(100 + i for i in range(1 << order))
    fe.write(0, f"{me}/state", "4")  # blkfront_connect's switch to Connected
    async with trio.open_nursery() as n:
        n.start_soon(b.closed)
        fe.write(0, f"{me}/state", "5")  # blkfront_closing
        await wait_state(fe, be, 5)
        fe.write(0, f"{me}/state", "6")
        await wait_state(fe, be, 6)
    fe.close()
    await b.__aexit__()


@pytest.mark.parametrize("bad", [
    {"ring-page-order": "9", "ring-ref0": "1"},
    {"ring-ref": "x"},
    {"ring-ref": "8", "protocol": "x86_32-abi"},
    {"ring-ref": "8", "event-channel": "0"},
])
async def test_backend_refuses_bad_frontend_nodes(
    toolstack: NativeXenStore, monkeypatch: pytest.MonkeyPatch, bad: dict[str, str]
) -> None:
    b = await backend(monkeypatch)
    fe = store_as(monkeypatch, FRONT)
    nodes = {"event-channel": "9", "protocol": PROTOCOL, **bad}
    for k, v in nodes.items():
        fe.write(0, f"{PATHS.frontend}/{k}", v)
    fe.write(0, f"{PATHS.frontend}/state", "3")
    with trio.fail_after(30), pytest.raises(HandshakeError):
        await b.connected()
    assert fe.read(0, f"{PATHS.backend}/state") == "5"  # Closing
    fe.close()
    await b.__aexit__()
