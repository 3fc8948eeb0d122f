"""Co-location across Xen domains through XenStore (over the emulated Xen,
tests/xenemu): dom0 creates the index and publishes the host id, a service in
one domain publishes itself and serves vchan to its reader domains, and a
guest-side ``meshlink.connect("storage-node")`` in another domain finds it by
name alone, judges it co-located by the Xen host id (not its own boot id) and
talks vchan; a domain that is not a reader finds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import meshlink
from meshlink import ResolveError
from meshlink.transport.xenstore import prepare_index, xen_host_id
from resolver import Endpoint, Resolver

from .xenemu.fixtures import XenHost, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]

SERVER, GUEST, STRANGER = 5, 7, 8
HOST_ID = "xen-host-under-test"

# The service's domain: meshlink.serve publishes it in the registry and serves
# vchan to its reader domain; say "ready", serve until stdin ends.
SERVER_CODE = f"""
import sys, trio, meshlink
from functools import partial
from meshlink.bus import Handlers

async def main():
    h = Handlers()
    async def echo(x):
        return x
    h.add_method("echo", echo)
    async with trio.open_nursery() as n:
        await n.start(partial(meshlink.serve, "storage-node", h, vchan=False,
                              xen_readers=[{GUEST}], handle_sigterm=False))
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        n.cancel_scope.cancel()

trio.run(main)
"""


@pytest.fixture
def xen_service(xen_host: XenHost, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XENEMU_DOMID", "0")
    prepare_index(xen_host_id=HOST_ID)
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **xen_host.env(SERVER)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "ready", proc.communicate(timeout=30)[1]
        monkeypatch.setenv("MESHLINK_PROVIDER", "xen")
        yield proc
    finally:
        if proc.poll() is None:
            proc.communicate("", timeout=30)


async def test_guest_connect_finds_service_of_another_domain(
    xen_service: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XENEMU_DOMID", str(GUEST))
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    resolver = Resolver(host_store=store, zeroconf=False, dns=False)
    # The host id on Xen comes from the host (dom0's node), not our boot id.
    assert resolver.facts.xen_host_id == HOST_ID == xen_host_id()
    assert resolver.facts.host_id != HOST_ID
    ranking = await resolver.explain("storage-node")
    assert [c.endpoint.url for c in ranking.chosen] == [f"vchan://xen/{SERVER}/storage-node"]
    assert "co-located on Xen host" in ranking.chosen[0].reason
    with trio.fail_after(30):
        async with meshlink.connect("storage-node", host_store=store, zeroconf=False,
                                    dns=False) as conn:
            assert conn.transport == "vchan"
            assert conn.endpoint.domid == SERVER
            assert await conn.call("echo", "hi from domain 7") == "hi from domain 7"
        # The listener published the domain's next channel: connect again.
        async with meshlink.connect("storage-node", host_store=store, zeroconf=False,
                                    dns=False) as conn:
            assert await conn.call("echo", 2) == 2


async def test_other_domain_does_not_find_it(
    xen_service: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XENEMU_DOMID", str(STRANGER))
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    with pytest.raises(ResolveError):
        async with meshlink.connect("storage-node", host_store=store, zeroconf=False,
                                    dns=False, attempt_timeout=5):
            pass


def test_xen_endpoint_url_round_trip() -> None:
    ep = Endpoint.parse("vchan://xen/5/storage-node")
    assert (ep.scheme, ep.domid, ep.host) == ("vchan", 5, "storage-node")
    assert ep.url == "vchan://xen/5/storage-node"
    for bad in ("vchan://xen/x/p", "vchan://xen/5", "vchan://xen/5/a/b", "vchan://xen/99999/p"):
        with pytest.raises(ValueError):
            Endpoint.parse(bad)


async def test_off_xen_the_resolver_never_opens_xenstore(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLINK_PROVIDER", "local")
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    r = Resolver(host_store=store, zeroconf=False, dns=False)
    assert r.xenstore is not None and r.facts.xen_host_id is None
    assert await r.candidates("storage-node") == []
