"""The unicast DNS source (resolver/dnssrv.py): pure parts, a hostile server, dnsmasq.

The pure parts (SRV order, TXT rules, configuration, ranking) need nothing.
The hostile-server tests run a real UDP server on 127.0.0.1 in this process
that answers with crafted or broken messages.  The dnsmasq tests run Debian's
dnsmasq in a network namespace the test creates, joined by a veth pair to
this namespace (one address each in 10.213.9.0/24, deleted with the
namespace), and finally serve a service in one namespace and connect to it
by name, through ``--dns``, from another.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rrset
import pytest
import trio

from resolver import DnsConfig, DnsConfigError, Endpoint, LocalFacts, Policy, Resolver, rank
from resolver.dnssrv import MAX_SRV, Srv, lookup, order_srv, parse_txt, query_names

from .helpers.connect_certs import Certs, make_certs
from .helpers.netns import veth_pair

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists(
    "/usr/sbin/dnsmasq") else None)
needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or DNSMASQ is None,
    reason="needs root, iproute2 and dnsmasq (CI has all three: .ci/run installs dnsmasq-base)")

DOMAIN = "mesh.test"
FP = "ab" * 32
_ids = itertools.count()


# --- pure parts ---------------------------------------------------------------------


def test_srv_order_priority_first_then_weighted() -> None:
    recs = [Srv(10, 0, 1, "c"), Srv(0, 1, 1, "a1"), Srv(0, 3, 1, "a3"), Srv(5, 0, 1, "b")]
    firsts: dict[str, int] = {"a1": 0, "a3": 0}
    rng = random.Random(7)
    for _ in range(4000):
        order = [r.target for r in order_srv(recs, rng)]
        assert order[2:] == ["b", "c"]  # lower priority number always first
        firsts[order[0]] += 1
    # weights 1 and 3: RFC 2782's draw in 0..4 picks a1 for 0 and 1 (2 of 5)
    assert 0.33 < firsts["a1"] / 4000 < 0.47


def test_txt_rules_of_rfc6763() -> None:
    props = parse_txt([b"", b"=nokey", b"V=1", b"v=2", b"flag", b"tls=7001",
                       b"id=\xff\xfe", b"name=echo=x"])
    assert props == {"v": "1", "flag": "", "tls": "7001", "name": "echo=x"}


def test_query_names_three_forms() -> None:
    assert query_names("echo", "svc.example.") == [
        ("instance", ("echo", "_meshlink", "_tcp", "svc", "example")),
        ("srv", ("_echo", "_tcp", "svc", "example")),
        ("k8s", ("_meshlink", "_tcp", "echo", "svc", "example"))]


def test_dns_config_parsing_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLINK_DNS_DOMAIN", raising=False)
    assert DnsConfig.parse("10.0.0.2:5353") == DnsConfig("10.0.0.2", 5353, ".")
    assert DnsConfig.parse("fd00::1").port == 53
    assert DnsConfig.parse("[fd00::1]:54", domain="service.consul").domain == "service.consul."
    for bad in ("dns.example.com", "10.0.0.2:0", "10.0.0.2:x", "10.0.0.2:70000", "[fd00::1"):
        with pytest.raises(DnsConfigError):
            DnsConfig.parse(bad)
    with pytest.raises(DnsConfigError):
        DnsConfig("10.0.0.2", domain="bad domain")
    monkeypatch.setenv("MESHLINK_DNS", "off")
    assert DnsConfig.from_env() is None
    monkeypatch.setenv("MESHLINK_DNS", "10.1.2.3")
    monkeypatch.setenv("MESHLINK_DNS_DOMAIN", DOMAIN)
    assert DnsConfig.from_env() == DnsConfig("10.1.2.3", 53, DOMAIN)
    with pytest.raises(DnsConfigError):
        Resolver(host_store=os.devnull + "-no", dns=True)


def test_dns_is_off_unless_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESHLINK_DNS", raising=False)
    assert Resolver(host_store=tmp_path / "s").dns is None


def test_rank_plain_tcp_from_dns_needs_allow_plaintext() -> None:
    eps = [Endpoint("tcp", "10.0.0.5", 7002, source="dns"),
           Endpoint("tls", "10.0.0.5", 7001, source="dns"),
           Endpoint("tls", "10.0.0.6", 7001, source="zeroconf")]
    facts = LocalFacts("me")
    strict = rank(eps, facts, Policy())
    assert [c.endpoint.url for c in strict.chosen] == ["tls://10.0.0.5:7001",
                                                       "tls://10.0.0.6:7001"]
    assert "unauthenticated DNS answer" in strict.rejected[0].reason
    loose = rank(eps, facts, Policy(allow_plaintext=True))
    assert loose.chosen[-1].endpoint.url == "tcp://10.0.0.5:7002"


# --- a hostile server on 127.0.0.1 ----------------------------------------------------


async def _hostile_server(answer: object, task_status: trio.TaskStatus[int]) -> None:
    """Answer every query with ``answer(query_wire) -> bytes | None``."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, peer = await sock.recvfrom(4096)
            reply = answer(data)  # type: ignore[operator]
            if reply is not None:
                await sock.sendto(reply, peer)


def _srv_flood(wire: bytes) -> bytes:
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    qname = q.question[0].name
    if q.question[0].rdtype == dns.rdatatype.SRV and qname.labels[0] == b"flood":
        rrs = [f"{i % 3} 0 {7000 + i} t{i}.x." for i in range(60)]
        r.answer.append(dns.rrset.from_text(qname, 0, "IN", "SRV", *rrs))
        for i in range(60):
            r.additional.append(dns.rrset.from_text(f"t{i}.x.", 0, "IN", "A", f"10.1.0.{i + 1}"))
    elif q.question[0].rdtype == dns.rdatatype.SRV and qname.labels[0] == b"zero":
        r.answer.append(dns.rrset.from_text(qname, 0, "IN", "SRV", "0 0 7000 any.x."))
        r.additional.append(dns.rrset.from_text("any.x.", 0, "IN", "A", "0.0.0.0", "224.0.0.1"))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire(max_size=65000)  # past the 1232 bytes asked for: hostile


async def test_hostile_flood_is_capped_and_bad_addresses_dropped() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_hostile_server, _srv_flood)
        cfg = DnsConfig("127.0.0.1", port, "x", timeout=2.0)
        got = await lookup("flood", cfg)
        assert 0 < len(got.endpoints) <= MAX_SRV  # (the k8s/srv forms: NXDOMAIN)
        assert {ep.scheme for ep in got.endpoints} == {"tls"}
        assert all(ep.port - 7000 in range(0, 60, 3) for ep in got.endpoints)  # priority 0
        assert any("lowest priority used" in n for n in got.notes)
        zero = await lookup("zero", cfg)
        assert zero.endpoints == []
        assert any("unusable address" in n for n in zero.notes)
        nursery.cancel_scope.cancel()


async def test_hostile_garbage_and_silence_end_within_the_timeout() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_hostile_server, lambda wire: wire[:2] + b"\x81\x80garbage")
        cfg = DnsConfig("127.0.0.1", port, "x", timeout=0.5)
        with trio.fail_after(3):
            got = await lookup("echo", cfg)
        assert got.endpoints == []
        assert any("did not answer" in n for n in got.notes)
        resolver = Resolver(host_store=os.environ.get("TMPDIR", "/tmp") + "/ml-dns-none",
                            dns=cfg, zeroconf=False, rules=None)
        ranking = await resolver.explain("echo")
        assert not ranking.chosen and any("did not answer" in n for n in ranking.notes)
        nursery.cancel_scope.cancel()


# --- dnsmasq in a network namespace -------------------------------------------------------

NS_ADDR, ROOT_ADDR = "10.213.9.1", "10.213.9.2"


@dataclass
class Net:
    ns: str
    root_dev: str

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def net() -> Iterator[Net]:
    n = f"{os.getpid() % 100000}d{next(_ids)}"
    net = Net(f"mlD{n}", f"mld{n}"[:15])
    peer = f"mle{n}"[:15]
    try:
        _ip("netns", "add", net.ns)
        _ip("link", "add", net.root_dev, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", net.ns)
        _ip("-n", net.ns, "addr", "add", f"{NS_ADDR}/24", "dev", peer)
        _ip("-n", net.ns, "link", "set", peer, "up")
        _ip("-n", net.ns, "link", "set", "lo", "up")
        _ip("addr", "add", f"{ROOT_ADDR}/24", "dev", net.root_dev)
        _ip("link", "set", net.root_dev, "up")
        yield net
    finally:
        subprocess.run(["ip", "netns", "del", net.ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", net.root_dev], capture_output=True, timeout=30)


def _start_dnsmasq(cmd: list[str], conf: Path, listen: str,
                   procs: list[subprocess.Popen[str]]) -> None:
    assert DNSMASQ is not None
    p = subprocess.Popen(
        [*cmd, DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--pid-file=",
         f"--conf-file={conf}", "--log-facility=-", f"--listen-address={listen}",
         "--bind-interfaces", "--port=53"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stderr is not None
    # dnsmasq logs "started" once its listeners are bound.
    for line in p.stderr:
        if "started" in line:
            return
    raise AssertionError(f"dnsmasq did not start (exit {p.wait()})")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def _instance(name: str, target: str, addr: str, port: int, txt: list[str]) -> str:
    quoted = ",".join(f'"{t}"' for t in txt)
    return (f"srv-host={name}._meshlink._tcp.{DOMAIN},{target}.{DOMAIN},{port},0,0\n"
            f"txt-record={name}._meshlink._tcp.{DOMAIN},{quoted}\n"
            f"host-record={target}.{DOMAIN},{addr}\n")


@needs_netns
async def test_dnsmasq_srv_txt_give_ranked_endpoints_with_reasons(
    net: Net, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(
        _instance("echo", "node-a", "10.213.9.50", 7001,
                  ["v=1", "name=echo", "id=host-a", "tr=vchan,tls,tcp", "tls=7001",
                   "tcp=7002", f"fp={FP}"])
        # Consul style: _NAME._tcp.DOMAIN, two priorities
        + f"srv-host=_web._tcp.{DOMAIN},node-b.{DOMAIN},8444,1,5\n"
        + f"srv-host=_web._tcp.{DOMAIN},node-c.{DOMAIN},8443,0,5\n"
        + f"host-record=node-b.{DOMAIN},10.213.9.51\nhost-record=node-c.{DOMAIN},10.213.9.52\n"
        # Kubernetes headless service style: _meshlink._tcp.NAME.DOMAIN
        + f"srv-host=_meshlink._tcp.kube.{DOMAIN},node-b.{DOMAIN},9000\n"
        # hostile: port 0, a TXT naming another service, bad ports and fingerprint
        + _instance("portzero", "node-a", "10.213.9.50", 0, ["v=1", "name=portzero"])
        + _instance("liar", "node-a", "10.213.9.50", 7001, ["v=1", "name=echo"])
        + _instance("junk", "node-a", "10.213.9.50", 7003,
                    ["v=1", "name=junk", "tls=99999", "tcp=-1", "fp=zz", "tr=tls,tcp,smtp"])
        + f"srv-host=gone._meshlink._tcp.{DOMAIN}\n")
    _start_dnsmasq(net.cmd(), conf, NS_ADDR, procs)
    resolver = Resolver(host_store=tmp_path / "store", rules=None, zeroconf=False,
                        dns=DnsConfig(NS_ADDR, 53, DOMAIN), host_id="host-b")

    ranking = await resolver.explain("echo")
    assert [c.endpoint.url for c in ranking.chosen] == ["tls://10.213.9.50:7001"]
    chosen = ranking.chosen[0]
    assert chosen.endpoint.fingerprint == FP and chosen.endpoint.host_id == "host-a"
    assert "from dns; TLS" in chosen.reason
    why = {c.endpoint.url: c.reason for c in ranking.rejected}
    assert "not co-located" in why["vchan://host-store/echo"]
    assert "unauthenticated DNS answer" in why["tcp://10.213.9.50:7002"]
    loose = await resolver.explain("echo", Policy(allow_plaintext=True))
    assert loose.chosen[-1].endpoint.url == "tcp://10.213.9.50:7002"
    # co-located by host id: vchan ranks first
    same = Resolver(host_store=tmp_path / "store", rules=None, zeroconf=False,
                    dns=DnsConfig(NS_ADDR, 53, DOMAIN), host_id="host-a")
    assert (await same.resolve("echo"))[0].endpoint.url == "vchan://host-store/echo"

    web = await resolver.resolve("web")  # priority 0 before priority 1
    assert [c.endpoint.url for c in web] == ["tls://10.213.9.52:8443", "tls://10.213.9.51:8444"]
    kube = await resolver.resolve("kube")
    assert [c.endpoint.url for c in kube] == ["tls://10.213.9.51:9000"]

    for name, note in (("portzero", "port 0"), ("liar", "names another service"),
                       ("gone", "not offered"), ("nothing", "has no SRV record")):
        r = await resolver.explain(name)
        assert not r.chosen and any(note in n for n in r.notes), (name, r.notes)
    junk = await resolver.explain("junk", Policy(allow_plaintext=True))
    assert [c.endpoint.url for c in junk.chosen] == ["tls://10.213.9.50:7003"]
    assert junk.chosen[0].endpoint.fingerprint is None
    assert sum("ignored" in n for n in junk.notes) == 3  # tls, tcp, fp


# --- across namespaces: serve in one, find by DNS and connect over TLS from another ---

SERVICE = "dns-echo"
ADDR_A, ADDR_B = "10.213.10.1", "10.213.10.2"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), SERVICE)


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    with veth_pair(ADDR_A, ADDR_B, "e") as hosts:
        yield hosts.a, hosts.b


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
    return {**env, **extra}


@needs_netns
@pytest.mark.slow
def test_served_in_one_namespace_found_by_dns_from_another_over_tls(
    pair: tuple[str, str], certs: Certs, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    ns_a, ns_b = pair
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_a, sys.executable, "-m", "meshlink.cli", "serve-echo",
         SERVICE, "--host-store", str(tmp_path / "store-a"), "--bind", ADDR_A,
         "--allow-name", "client-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(certs.env("server")))
    procs.append(server)
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith(f"serving {SERVICE}:"), server.stderr and server.stderr.read()
    url = next(u for u in line.split() if u.startswith("tls://"))
    port = int(url.rsplit(":", 1)[1])

    # register it in DNS as a DNS-SD instance, served by dnsmasq in namespace A
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(_instance(SERVICE, "storage", ADDR_A, port,
                              ["v=1", f"name={SERVICE}", "id=host-a", "tr=vchan,tls",
                               f"tls={port}"]))
    _start_dnsmasq(["ip", "netns", "exec", ns_a], conf, ADDR_A, procs)

    dns_args = ["--dns", f"{ADDR_A}:53", "--dns-domain", DOMAIN,
                "--host-store", str(tmp_path / "store-b")]
    out = subprocess.run(
        ["ip", "netns", "exec", ns_b, sys.executable, "-m", "meshlink.cli", "connect",
         SERVICE, *dns_args],
        capture_output=True, text=True, timeout=60, input="found by dns\n",
        env=_env(certs.env("client")))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["FOUND BY DNS"]
    assert f"over tls (tls://{ADDR_A}:{port})" in out.stderr

    # the same through the environment, and the Python API in namespace B
    code = ("import trio, meshlink\n"
            "async def main():\n"
            f"    async with meshlink.connect({SERVICE!r}, zeroconf=False) as c:\n"
            "        print(c.transport, await c.call('echo', 'api'))\n"
            "trio.run(main)\n")
    api = subprocess.run(
        ["ip", "netns", "exec", ns_b, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
        env=_env({**certs.env("client"), "MESHLINK_DNS": ADDR_A,
                  "MESHLINK_DNS_DOMAIN": DOMAIN,
                  "MESHLINK_HOST_STORE": str(tmp_path / "store-b")}))
    assert api.returncode == 0, api.stderr
    assert api.stdout.strip() == "tls API"

    # without --dns nothing is asked, and nothing is found
    off = subprocess.run(
        ["ip", "netns", "exec", ns_b, sys.executable, "-m", "meshlink.cli", "resolve",
         SERVICE, "--host-store", str(tmp_path / "store-b")],
        capture_output=True, text=True, timeout=60, env=_env(certs.env("client")))
    assert off.returncode == 1

    server.terminate()
    assert server.wait(timeout=30) == 0
