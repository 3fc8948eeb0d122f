"""Resolver: the pure ranking, the rules file, the host store registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from resolver import (
    Endpoint,
    HostStore,
    LocalFacts,
    Policy,
    ResolveError,
    Resolver,
    RulesError,
    parse_rules,
    rank,
)
from resolver.hoststore import HostStoreSource, ServiceRecord, default_host_id, write_record

ME = LocalFacts("host-a")


def ep(url: str, source: str = "rules", host_id: str | None = None) -> Endpoint:
    e = Endpoint.parse(url, source=source)
    return Endpoint(e.scheme, e.host, e.port, host_id=host_id, source=source)


# --- endpoints --------------------------------------------------------------------


@pytest.mark.parametrize("url", ["vchan://host-store/storage-node", "tls://10.0.0.5:7001",
                                 "tcp://[fd00::1]:80", "tcp://node.example:1"])
def test_endpoint_url_roundtrip(url: str) -> None:
    assert Endpoint.parse(url).url == url


@pytest.mark.parametrize("url", ["udp://1.2.3.4:5", "tcp://1.2.3.4", "tcp://1.2.3.4:0",
                                 "vchan://elsewhere/x", "vchan://host-store/", "tls://h:99999",
                                 "tcp://h:1/path", "tcp://h:1?q=1"])
def test_endpoint_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(url)


# --- ranking (pure) ---------------------------------------------------------------


def urls(eps: object) -> list[str]:
    return [c.endpoint.url for c in eps]  # type: ignore[attr-defined]


def test_rank_default_order_vchan_tls_tcp() -> None:
    cands = [ep("tcp://10.0.0.5:1"), ep("tls://10.0.0.5:2"),
             ep("vchan://host-store/x", "hoststore", "host-a")]
    r = rank(cands, ME, Policy())
    assert urls(r.chosen) == ["vchan://host-store/x", "tls://10.0.0.5:2", "tcp://10.0.0.5:1"]
    assert "co-located" in r.chosen[0].reason and r.rejected == ()
    assert all(c.reason for c in r.chosen)


def test_rank_vchan_needs_same_host_id() -> None:
    cands = [ep("vchan://host-store/x", "zeroconf", "host-b"), ep("tls://10.0.0.5:2")]
    r = rank(cands, ME, Policy())
    assert urls(r.chosen) == ["tls://10.0.0.5:2"]
    assert "differs" in r.rejected[0].reason and "not co-located" in r.rejected[0].reason


def test_rank_vchan_without_host_id_only_from_our_store_or_the_operator() -> None:
    r = rank([ep("vchan://host-store/x", "zeroconf")], ME, Policy())
    assert r.chosen == () and "cannot be claimed" in r.rejected[0].reason
    r = rank([ep("vchan://host-store/x", "hoststore")], ME, Policy())
    assert urls(r.chosen) == ["vchan://host-store/x"] and "without a record" in r.chosen[0].reason
    r = rank([ep("vchan://host-store/x", "rules")], ME, Policy())
    assert urls(r.chosen) == ["vchan://host-store/x"]


def test_rank_require_tls_drops_tcp() -> None:
    r = rank([ep("tcp://10.0.0.5:1"), ep("tls://10.0.0.5:2")], ME, Policy(require_tls=True))
    assert urls(r.chosen) == ["tls://10.0.0.5:2"]
    assert "policy requires TLS" in r.rejected[0].reason


def test_rank_forbid_vchan() -> None:
    cands = [ep("vchan://host-store/x", "hoststore", "host-a"), ep("tcp://10.0.0.5:1")]
    r = rank(cands, ME, Policy(forbid_vchan=True))
    assert urls(r.chosen) == ["tcp://10.0.0.5:1"]
    assert "forbidden" in r.rejected[0].reason


def test_rank_pin_keeps_only_the_pin_and_respects_policy() -> None:
    cands = [ep("tls://10.0.0.5:2"), ep("tcp://10.0.0.5:1")]
    r = rank(cands, ME, Policy(pin="tcp://10.0.0.9:3"))
    assert urls(r.chosen) == ["tcp://10.0.0.9:3"] and "pinned" in r.chosen[0].reason
    assert len(r.rejected) == 2
    r = rank(cands, ME, Policy(pin="tcp://10.0.0.9:3", require_tls=True))
    assert r.chosen == ()


def test_rank_tls_needs_configuration() -> None:
    r = rank([ep("tls://10.0.0.5:2")], LocalFacts("host-a", tls_configured=False), Policy())
    assert r.chosen == () and "no TLS configuration" in r.rejected[0].reason


def test_rank_merges_duplicates_and_orders_sources() -> None:
    cands = [ep("tls://10.0.0.7:2", "zeroconf"), ep("tls://10.0.0.5:2", "rules"),
             ep("tls://10.0.0.7:2", "hoststore")]
    r = rank(cands, ME, Policy())
    assert urls(r.chosen) == ["tls://10.0.0.7:2", "tls://10.0.0.5:2"]
    assert "hoststore+zeroconf" in r.chosen[0].reason


def test_rank_is_pure() -> None:
    cands = [ep("tcp://10.0.0.5:1"), ep("tls://10.0.0.5:2")]
    assert rank(cands, ME, Policy()) == rank(list(cands), ME, Policy())


# --- rules file ---------------------------------------------------------------------

RULES = """\
# where things live
[names]
"storage-node" = ["tls://10.0.0.5:7001", "tcp://10.0.0.5:7002"]

[[rewrite]]
suffix = ".rack1"
endpoints = ["tls://{host}.rack1.example.net:7001"]

[[rewrite]]
suffix = ".a.rack1"
endpoints = ["tcp://10.1.0.1:9", "tls://10.1.0.1:10"]
"""


def test_rules_exact_and_suffix() -> None:
    rules = parse_rules(RULES, "r.toml")
    assert [e.url for e in rules.lookup("storage-node")] == [
        "tls://10.0.0.5:7001", "tcp://10.0.0.5:7002"]
    assert [e.url for e in rules.lookup("db.rack1")] == ["tls://db.rack1.example.net:7001"]
    # the longest suffix wins
    assert [e.url for e in rules.lookup("db.a.rack1")] == ["tcp://10.1.0.1:9", "tls://10.1.0.1:10"]
    assert rules.lookup("other") == [] and rules.lookup(".rack1") == []


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[names]\n\"a\" = [\"tls://h:1\"\n", 2, "TOML syntax"),
        ("[names]\n\"a\" = [\"tls://h:1\"]\n\"b\" = [\"udp://h:1\"]\n", 3, "scheme"),
        ("[names]\n\"a\" = \"tls://h:1\"\n", 2, "list of endpoint"),
        ("\n[nams]\n", 2, "unknown key"),
        ("[[rewrite]]\nsuffix = \"rack\"\nendpoints = [\"tcp://h:1\"]\n", 2, "starting with a dot"),
        ("[[rewrite]]\nsuffix = \".r\"\n\nendpoints = [\"tcp://{x}:1\"]\n", 4, "bad template"),
        ("[[rewrite]]\nsuffix = \".r\"\nendpoints = [\"tcp://h\"]\nweight = 1\n", 4, "unknown"),
    ],
)
def test_rules_errors_name_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "/etc/meshlink/rules.toml")
    assert str(info.value).startswith(f"/etc/meshlink/rules.toml:{line}:"), str(info.value)
    assert words in str(info.value)
    assert info.value.line == line
    assert isinstance(info.value, ResolveError)


def test_rules_file_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="nope.toml"):
        Resolver(host_store=tmp_path / "s", rules=tmp_path / "nope.toml")


# --- host store registry ------------------------------------------------------------


def test_host_id_default_and_override(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLINK_HOST_ID", raising=False)
    a, b = HostStore(store), HostStore(store.parent / "other")
    assert default_host_id(a) == default_host_id(HostStore(store))
    assert default_host_id(a) != default_host_id(b)
    monkeypatch.setenv("MESHLINK_HOST_ID", "pinned-id")
    assert default_host_id(b) == "pinned-id"


def test_hoststore_source_live_and_stale(store: Path) -> None:
    hs = HostStore(store)
    src = HostStoreSource(hs)
    pub = hs.claim("svc")
    write_record(hs, ServiceRecord("svc", "host-a", ("vchan", "tcp"), ("tcp://127.0.0.1:5",),
                                   None, os.getpid()))
    assert [e.url for e in src.lookup("svc")] == ["vchan://host-store/svc", "tcp://127.0.0.1:5"]
    assert src.lookup("svc")[0].host_id == "host-a"
    pub.withdraw()  # the record stays behind, as after a crash: the lock is free
    assert src.lookup("svc") == []
    assert src.record("svc") is None


async def test_resolver_combines_sources(store: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[names]\n"svc" = ["tls://10.0.0.5:7001", "tcp://10.0.0.5:7002"]\n')
    hs = HostStore(store)
    res = Resolver(host_store=hs, rules=rules, zeroconf=False)
    pub = hs.claim("svc")
    try:
        write_record(hs, ServiceRecord("svc", res.facts.host_id, ("vchan",), (), None, 1))
        got = await res.resolve("svc")
        assert [c.endpoint.url for c in got] == [
            "vchan://host-store/svc", "tls://10.0.0.5:7001", "tcp://10.0.0.5:7002"]
        got = await res.resolve("svc", Policy(require_tls=True, forbid_vchan=True))
        assert [c.endpoint.url for c in got] == ["tls://10.0.0.5:7001"]
    finally:
        pub.withdraw()
    with pytest.raises(ResolveError, match="no usable endpoint"):
        await res.resolve("unknown")
