"""Co-location on KVM: ranking ``vchan://ivshmem/NAME`` and dialing it.

Two parties that map the same ivshmem region (same host id in its header)
are co-located whatever their own host ids; the ranking claims it from the
region's host id and connecting through the region proves it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from meshlink import ProviderUnavailable
from meshlink.transport.dial import dial
from meshlink.transport.vchan.ivshmem import IvshmemRegion, IvshmemStream, local_region_host_id
from resolver import Endpoint, HostStore, LocalFacts, Policy, Resolver, rank

from .conftest import HELPERS

IVS = "vchan://ivshmem/db"


def ivs(host_id: str | None, source: str = "zeroconf") -> Endpoint:
    return Endpoint("vchan", "db", host_id=host_id, source=source, via="ivshmem")


def test_url_roundtrip_and_distinct_from_host_store() -> None:
    ep = Endpoint.parse(IVS, source="rules")
    assert (ep.via, ep.host, ep.url) == ("ivshmem", "db", IVS)
    assert ep != Endpoint.parse("vchan://host-store/db")
    with pytest.raises(ValueError):
        Endpoint.parse("vchan://elsewhere/db")


def test_rank_claims_kvm_colocation_by_region_host_id() -> None:
    facts = LocalFacts("guest-7", ivshmem_host_id="kvm-1")
    tls = Endpoint("tls", "10.0.0.5", 4433, host_id="guest-3", source="zeroconf")
    r = rank([tls, ivs("kvm-1")], facts, Policy())
    assert [c.endpoint.url for c in r.chosen] == [IVS, "tls://10.0.0.5:4433"]
    assert "co-located on KVM" in r.chosen[0].reason
    # Another host's region, no region here, no host id, vchan forbidden: not co-located.
    assert not rank([ivs("kvm-2")], facts, Policy()).chosen
    assert not rank([ivs("kvm-1")], LocalFacts("guest-7"), Policy()).chosen
    assert not rank([ivs(None)], facts, Policy()).chosen
    assert rank([ivs(None, "rules")], facts, Policy()).chosen
    assert not rank([ivs("kvm-1")], facts, Policy(forbid_vchan=True)).chosen
    # The host-store vchan of the same name is a different endpoint, judged on our host id.
    both = rank([ivs("kvm-1"), Endpoint("vchan", "db", host_id="guest-7", source="hoststore")],
                facts, Policy())
    assert len(both.chosen) == 2


def test_resolver_takes_the_region_host_id(tmp_path: Path) -> None:
    res = Resolver(host_store=tmp_path / "store", zeroconf=False, dns=False,
                   ivshmem_host_id="kvm-1")
    assert res.facts.ivshmem_host_id == "kvm-1"


async def test_dial_proves_colocation_through_the_region(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    region_path = tmp_path / "region"
    IvshmemRegion.create(region_path, "kvm-1").close()
    monkeypatch.setenv("MESHLINK_IVSHMEM", str(region_path))
    assert local_region_host_id() == "kvm-1"
    server = subprocess.Popen([sys.executable, str(HELPERS / "ivshmem_peer.py"), str(region_path),
                               "listen", "db", "echo"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "LISTENING"
        facts = LocalFacts("guest-7", ivshmem_host_id=local_region_host_id())
        [choice] = rank([ivs("kvm-1")], facts, Policy()).chosen
        stream = await dial(choice.endpoint, host_store=HostStore(tmp_path / "store"), tls=None,
                            server_hostname="db")
        assert isinstance(stream, IvshmemStream)
        assert stream.transport_details["host_id"] == "kvm-1"
        await stream.send_all(b"proof")
        got = b""
        with trio.fail_after(10):
            while len(got) < 5:
                got += await stream.receive_some()
        assert got == b"proof"
        await stream.aclose()
        # A claim the region contradicts is refused before any slot is taken.
        with pytest.raises(ProviderUnavailable):
            await dial(ivs("kvm-2"), host_store=HostStore(tmp_path / "store"), tls=None,
                       server_hostname="db")
    finally:
        server.kill()
        server.communicate()


def test_no_region_means_no_host_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLINK_IVSHMEM", str(tmp_path / "missing"))
    assert local_region_host_id() is None


SERVE = """
import sys, trio, meshlink
from functools import partial
from meshlink.bus import Handlers

async def main(store, region):
    h = Handlers()
    async def echo(x):
        return x
    h.add_method("echo", echo)
    async with trio.open_nursery() as n:
        srv = await n.start(partial(meshlink.serve, "db", h, host_store=store, vchan=False,
                                    ivshmem=region))
        print(" ".join(ep.url for ep in srv.endpoints), flush=True)
trio.run(main, sys.argv[1], sys.argv[2])
"""


async def test_serve_and_connect_by_name_over_the_region(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """meshlink.serve(ivshmem=) in one process, meshlink.connect by name in
    another: vchan through the region, with a session that resumes on it."""
    from meshlink import ResolveError, connect

    region_path = tmp_path / "region"
    IvshmemRegion.create(region_path, "kvm-1").close()
    server_store, client_store = tmp_path / "s", tmp_path / "c"
    server_store.mkdir(mode=0o700)
    client_store.mkdir(mode=0o700)
    rules = tmp_path / "rules.toml"
    rules.write_text('[names]\n"db" = ["vchan://ivshmem/db"]\n')
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(server_store), str(region_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().split() == ["vchan://ivshmem/db"]
        # Without the region, the endpoint is not ours to use.
        monkeypatch.setenv("MESHLINK_IVSHMEM", str(tmp_path / "no-region"))
        with pytest.raises(ResolveError, match="maps no ivshmem region"):
            async with connect("db", host_store=client_store, rules=rules):
                pass
        monkeypatch.setenv("MESHLINK_IVSHMEM", str(region_path))
        async with connect("db", host_store=client_store, rules=rules) as conn:
            assert conn.transport == "vchan" and conn.endpoint.via == "ivshmem"
            assert await conn.call("echo", 41) == 41
            assert conn.session is not None and conn.session.transport is not None
            conn.session.transport_failed(conn.session.transport, "test: cut")
            assert await conn.call("echo", 42) == 42  # resumed through the region
            assert conn.resumes == 1 and conn.transport == "vchan"
    finally:
        server.kill()
        server.communicate()
