"""Unicast DNS source: SRV + TXT records from a DNS server the user names.

Theory of operation
-------------------
Zeroconf finds services on the local link; past it, services are registered
in DNS: Consul answers SRV queries for what it knows, a Kubernetes headless
service gets SRV records for its named ports, and any DNS server (dnsmasq,
CoreDNS, BIND) can carry DNS-SD records (RFC 6763) over unicast DNS.  This
source asks *one* server, the one configured (``dns=``, ``--dns``,
``$MESHLINK_DNS``), under *one* domain (``domain=``, ``--dns-domain``,
``$MESHLINK_DNS_DOMAIN``; default the root), and nothing at all otherwise:
a library must not send queries anywhere the user did not choose, so even the
addresses of SRV targets are asked of that server, never of the system
resolver.

For the service name ``NAME`` (one DNS label, dots escaped as ``\\.``) three
names are asked at once:

1. ``NAME._meshlink._tcp.DOMAIN`` -- a DNS-SD *instance*, as zeroconf
   publishes it: SRV (target and port) plus TXT with the same keys as
   zeroconf (``v``, ``name``, ``id``, ``tr``, ``tls``, ``tcp``, ``fp``; see
   :mod:`resolver.zeroconf`).
2. ``_NAME._tcp.DOMAIN`` -- plain RFC 2782 SRV: Consul's
   ``_NAME._tcp.service.consul`` with ``DOMAIN=service.consul``.
3. ``_meshlink._tcp.NAME.DOMAIN`` -- a Kubernetes headless service ``NAME``
   with a port named ``meshlink``, with ``DOMAIN=NAMESPACE.svc.cluster.local``.

Forms 2 and 3 carry no meshlink TXT, so they give **TLS** endpoints at the
SRV port: DNS answers are not authenticated, and TLS (verified against the
service name, whatever DNS said) is what makes a wrong answer harmless.  Only
a form-1 TXT record can offer plain TCP or vchan, and the ranking still
decides: vchan only for our own host id, plain TCP vouched for by DNS alone
only under ``Policy.allow_plaintext`` (see :mod:`resolver._rank`).

SRV order (RFC 2782): lowest priority first; within a priority, a weighted
random order (records of weight 0 placed first, a uniform draw in
``0..sum``, the first record whose running sum reaches it).  A target of
``.`` means "not offered here" and gives nothing.

*A hostile server is expected.*  The whole lookup is bounded by
``timeout`` (default 2 s); answers are parsed by dnspython (malformed,
unexpected or mismatched replies are dropped, and a truncated UDP answer is
asked again over TCP, whose length prefix bounds it to 64 KiB); at most
:data:`MAX_SRV` SRV records per name, :data:`MAX_ADDRESSES` addresses per
target and :data:`MAX_ENDPOINTS` endpoints in all are used; every field is
checked (port 1..65535, TXT keys and values printable ASCII, ports decimal,
fingerprint 64 hex digits, ``name`` equal to the name asked, addresses neither
unspecified nor multicast).  What was dropped and why is returned as notes,
which ``meshlink resolve --explain`` prints.

dnspython is imported only when a lookup runs, so a missing package is a
clear note (``pip install dnspython``), not an import error of the resolver.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ._types import Endpoint
from .errors import DnsConfigError

__all__ = [
    "DOMAIN_ENV_VAR",
    "ENV_VAR",
    "MAX_ADDRESSES",
    "MAX_ENDPOINTS",
    "MAX_SRV",
    "DnsAnswer",
    "DnsConfig",
    "Srv",
    "lookup",
    "order_srv",
    "parse_txt",
    "query_names",
]

ENV_VAR = "MESHLINK_DNS"
DOMAIN_ENV_VAR = "MESHLINK_DNS_DOMAIN"
SERVICE_LABEL = "_meshlink"
TXT_VERSION = "1"
#: SRV records used per queried name (the lowest priorities are kept).
MAX_SRV = 16
#: Addresses used per SRV target.
MAX_ADDRESSES = 4
#: Endpoints returned for one name, all forms together.
MAX_ENDPOINTS = 32
#: EDNS payload size we advertise: answers larger than this come over TCP.
EDNS_PAYLOAD = 1232

_HOST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_FP_RE = re.compile(r"[0-9a-fA-F]{64}")
_TRANSPORTS = ("vchan", "tls", "tcp")


@dataclass(frozen=True)
class DnsConfig:
    """Which DNS server to ask, under which domain, for how long.

    Attributes:
        server: the server's IP address (a literal: resolving a server name
            would itself send a query somewhere nobody chose).
        port: its UDP/TCP port.
        domain: the domain the service names live under (``"."``: the root).
        timeout: seconds for the whole lookup of one name.
    """

    server: str
    port: int = 53
    domain: str = "."
    timeout: float = 2.0

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.server)
        except ValueError:
            raise DnsConfigError(
                f"DNS server {self.server!r} is not an IP address (give the address, "
                "so that no other resolver is asked for it)") from None
        if not isinstance(self.port, int) or isinstance(self.port, bool) \
                or not 0 < self.port < 65536:
            raise DnsConfigError(f"DNS server port {self.port!r} is outside 1..65535")
        if not isinstance(self.timeout, (int, float)) or not 0 < self.timeout <= 60:
            raise DnsConfigError(f"DNS timeout {self.timeout!r} must be in (0, 60] seconds")
        domain = self.domain.strip()
        if domain not in (".", "") and not re.fullmatch(
                r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?", domain):
            raise DnsConfigError(f"DNS domain {self.domain!r} is not a domain name")
        if len(domain) > 200:
            raise DnsConfigError("DNS domain is longer than 200 characters")
        object.__setattr__(self, "domain", domain.rstrip(".") + "." if domain else ".")

    @property
    def where(self) -> str:
        """``SERVER:PORT`` for messages."""
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, spec: str, *, domain: str | None = None,
              timeout: float = 2.0) -> DnsConfig:
        """``SERVER``, ``SERVER:PORT``, ``[V6]:PORT`` or a bare IPv6 address.

        ``domain`` defaults to ``$MESHLINK_DNS_DOMAIN`` (unset: the root).

        Raises:
            DnsConfigError: not one of those forms, or a bad port or domain.
        """
        text = spec.strip()
        port = 53
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise DnsConfigError(f"bad DNS server {spec!r}: expected [ADDRESS]:PORT")
            port_text = rest[1:] if rest else "53"
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, "53"
        if not _PORT_RE.fullmatch(port_text):
            raise DnsConfigError(f"bad DNS server {spec!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if domain is None:
            domain = os.environ.get(DOMAIN_ENV_VAR, "").strip() or "."
        return cls(host, port, domain, timeout)

    @classmethod
    def from_env(cls) -> DnsConfig | None:
        """``$MESHLINK_DNS`` (``SERVER[:PORT]``; unset, empty or ``off``: disabled).

        Raises:
            DnsConfigError: the variable is set to something unusable.
        """
        value = os.environ.get(ENV_VAR, "").strip()
        if value.lower() in ("", "0", "off", "no"):
            return None
        return cls.parse(value)


@dataclass(frozen=True)
class Srv:
    """One SRV record, as received.  ``target`` is absolute, without the final dot."""

    priority: int
    weight: int
    port: int
    target: str


@dataclass
class DnsAnswer:
    """What one lookup found: endpoints in SRV order, and what was dropped, why."""

    endpoints: list[Endpoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def order_srv(records: Sequence[Srv], rng: random.Random | None = None) -> list[Srv]:
    """Order SRV records as RFC 2782 says: by priority, then weighted random.

    Pure but for ``rng`` (pass a seeded :class:`random.Random` for a fixed order).
    """
    rng = rng or random.Random()
    out: list[Srv] = []
    for prio in sorted({r.priority for r in records}):
        # Weight 0 first, as the RFC asks, so they are picked only when the
        # draw is 0 or nothing else is left.
        left = sorted((r for r in records if r.priority == prio), key=lambda r: r.weight != 0)
        while left:
            total = sum(r.weight for r in left)
            draw = rng.randint(0, total)
            running = 0
            for i, r in enumerate(left):
                running += r.weight
                if running >= draw:
                    out.append(left.pop(i))
                    break
    return out


def parse_txt(strings: Sequence[bytes]) -> dict[str, str]:
    """DNS-SD TXT strings to a dict, as RFC 6763 section 6 says.

    Empty strings and strings starting with ``=`` are ignored; a key is what
    precedes the first ``=``, compared case-insensitively (returned lower
    case); the first occurrence of a key wins; a string without ``=`` is a
    boolean attribute (value ``""``).  Keys and values that are not printable
    ASCII are dropped: every meshlink value is.
    """
    out: dict[str, str] = {}
    for raw in strings:
        if not raw or raw.startswith(b"="):
            continue
        key_b, _, value_b = raw.partition(b"=")
        try:
            key, value = key_b.decode("ascii").lower(), value_b.decode("ascii")
        except UnicodeDecodeError:
            continue
        if not key.isprintable() or not value.isprintable() or key in out:
            continue
        out[key] = value
    return out


def query_names(name: str, domain: str) -> list[tuple[str, tuple[str, ...]]]:
    """The three names asked for ``name`` (form, labels) -- see the module docstring.

    ``name`` is one label; ``domain`` ends with a dot (``"."`` is the root).
    """
    tail = tuple(label for label in domain.rstrip(".").split(".") if label)
    return [
        ("instance", (name, SERVICE_LABEL, "_tcp", *tail)),
        ("srv", (f"_{name}", "_tcp", *tail)),
        ("k8s", (SERVICE_LABEL, "_tcp", name, *tail)),
    ]


def _port(text: str | None) -> int | None:
    """A TXT port value: decimal 1..65535, else ``None``."""
    if text is None or not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def _usable_address(text: str) -> str | None:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.is_unspecified or addr.is_multicast or (
            isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address(
                "255.255.255.255")):
        return None
    return str(addr)


@dataclass(frozen=True)
class _Meta:
    """A validated meshlink TXT record."""

    host_id: str | None
    transports: tuple[str, ...]
    tls_port: int | None
    tcp_port: int | None
    fingerprint: str | None


def _meta(name: str, txts: Sequence[Sequence[bytes]], notes: list[str],
          label: str) -> _Meta | None | bool:
    """The first valid meshlink TXT of an instance; ``None`` if none; ``False``
    if it names another service (the instance is then dropped)."""
    for strings in txts:
        props = parse_txt(strings)
        if props.get("v") != TXT_VERSION:
            notes.append(f"{label}: TXT ignored: version {props.get('v')!r} is not "
                         f"{TXT_VERSION!r}")
            continue
        if props.get("name", name) != name:
            notes.append(f"{label}: dropped: its TXT names another service "
                         f"({props['name'][:64]!r})")
            return False
        host_id = props.get("id")
        if host_id is not None and not _HOST_ID_RE.fullmatch(host_id):
            notes.append(f"{label}: TXT id ignored: not a host id")
            host_id = None
        tr = tuple(t for t in props.get("tr", "tls").split(",") if t in _TRANSPORTS)
        tls, tcp = _port(props.get("tls")), _port(props.get("tcp"))
        for key, value, parsed in (("tls", props.get("tls"), tls), ("tcp", props.get("tcp"), tcp)):
            if value is not None and parsed is None:
                notes.append(f"{label}: TXT {key} ignored: {value[:16]!r} is not a port 1..65535")
        fp = props.get("fp")
        if fp is not None and not _FP_RE.fullmatch(fp):
            notes.append(f"{label}: TXT fp ignored: not 64 hex digits")
            fp = None
        return _Meta(host_id, tr, tls, tcp, fp.lower() if fp else None)
    return None


class _Asker:
    """Sends queries to the one configured server (dnspython, trio backend)."""

    def __init__(self, config: DnsConfig) -> None:
        import dns.asyncbackend
        import dns.asyncquery
        import dns.exception
        import dns.message
        import dns.name
        import dns.rcode
        import dns.rdatatype

        self.config = config
        self.dns: Any = dns
        self.backend = dns.asyncbackend.get_backend("trio")

    def name(self, labels: tuple[str, ...]) -> Any:
        """The absolute DNS name made of ``labels`` (each may hold dots)."""
        return self.dns.name.Name((*labels, b""))

    async def ask(self, qname: Any, rdtype: str) -> Any | None:
        """The answer message, or ``None`` for "no such name"."""
        dns = self.dns
        q = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        cfg = self.config
        try:
            r = await dns.asyncquery.udp(
                q, cfg.server, port=cfg.port, backend=self.backend, ignore_unexpected=True,
                raise_on_truncation=True, ignore_errors=True)
        except dns.message.Truncated:
            r = await dns.asyncquery.tcp(q, cfg.server, port=cfg.port, backend=self.backend)
        rcode = r.rcode()
        # REFUSED: a server authoritative for other zones (dnsmasq without
        # upstreams, Consul outside its domain) says "not mine": nothing here.
        if rcode in (dns.rcode.NXDOMAIN, dns.rcode.REFUSED):
            return None
        if rcode != dns.rcode.NOERROR:
            raise OSError(f"{dns.rcode.to_text(rcode)} for {qname.to_text()} {rdtype}")
        return r

    def records(self, msg: Any, owner: Any, rdtype: str,
                section: str = "answer") -> list[Any]:
        """The records of ``rdtype`` owned by ``owner`` in one section."""
        dns = self.dns
        want = dns.rdatatype.from_text(rdtype)
        out: list[Any] = []
        for rrset in getattr(msg, section):
            if rrset.name == owner and rrset.rdtype == want:
                out.extend(rrset)
        return out


async def _addresses(asker: _Asker, msg: Any, target: Any, notes: list[str]) -> list[str]:
    """The target's addresses: from the answer's additional section, else asked."""
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        found += [rd.address for rd in asker.records(msg, target, rdtype, "additional")]
    if not found:
        for rdtype in ("A", "AAAA"):
            reply = await asker.ask(target, rdtype)
            if reply is not None:
                found += [rd.address for rd in asker.records(reply, target, rdtype)]
    usable = [a for a in (_usable_address(str(x)) for x in found) if a is not None]
    if len(usable) < len(found):
        notes.append(f"{target.to_text()}: {len(found) - len(usable)} unusable address(es) "
                     "dropped (unspecified, multicast or broadcast)")
    return list(dict.fromkeys(usable))[:MAX_ADDRESSES]


async def _one_form(asker: _Asker, name: str, form: str, labels: tuple[str, ...],
                    rng: random.Random, out: dict[str, DnsAnswer]) -> None:
    answer = out[form] = DnsAnswer()
    notes = answer.notes
    qname = asker.name(labels)
    label = qname.to_text()
    srv_msg = await asker.ask(qname, "SRV")
    if srv_msg is None:
        return
    raw = asker.records(srv_msg, qname, "SRV")
    if not raw:
        return
    if len(raw) > MAX_SRV:
        notes.append(f"{label}: {len(raw)} SRV records; the {MAX_SRV} of lowest priority used")
        raw = sorted(raw, key=lambda rd: rd.priority)[:MAX_SRV]
    meta: _Meta | None | bool = None
    if form == "instance":
        txt_msg = await asker.ask(qname, "TXT")
        txts = [rd.strings for rd in asker.records(txt_msg, qname, "TXT")] if txt_msg else []
        meta = _meta(name, txts, notes, label)
        if meta is False:
            return
    targets = {rd.target.to_text(): rd.target for rd in raw}
    ordered = order_srv([Srv(rd.priority, rd.weight, rd.port, rd.target.to_text())
                         for rd in raw], rng)
    vchan_done = False
    for srv in ordered:
        if srv.target == ".":
            notes.append(f"{label}: SRV target '.': the service is not offered there")
            continue
        if srv.port == 0:
            notes.append(f"{label}: SRV {srv.target} dropped: port 0")
            continue
        addrs = await _addresses(asker, srv_msg, targets[srv.target], notes)
        if not addrs:
            notes.append(f"{label}: SRV target {srv.target} has no usable address")
            continue
        source = "dns"
        if isinstance(meta, _Meta):
            if "vchan" in meta.transports and meta.host_id and not vchan_done:
                vchan_done = True
                answer.endpoints.append(Endpoint("vchan", name, host_id=meta.host_id,
                                                 source=source))
            tls = meta.tls_port or (srv.port if "tls" in meta.transports else None)
            tcp = meta.tcp_port if "tcp" in meta.transports else None
            for a in addrs:
                if tls and "tls" in meta.transports:
                    answer.endpoints.append(Endpoint("tls", a, tls, host_id=meta.host_id,
                                                     fingerprint=meta.fingerprint,
                                                     source=source))
            for a in addrs:
                if tcp:
                    answer.endpoints.append(Endpoint("tcp", a, tcp, host_id=meta.host_id,
                                                     source=source))
        else:
            answer.endpoints += [Endpoint("tls", a, srv.port, source=source) for a in addrs]


async def lookup(name: str, config: DnsConfig, *,
                 rng: random.Random | None = None) -> DnsAnswer:
    """Ask ``config.server`` for ``name`` in the three forms; endpoints in SRV order.

    Args:
        name: a valid service name (see :func:`resolver.validate_service_name`).
        config: server, domain, timeout.
        rng: for the weighted order among equal SRV priorities (default: random).

    Returns:
        A :class:`DnsAnswer`; its notes say what was dropped and why (a server
        that did not answer in time, a missing dnspython, a bad record).

    Cancellation:
        Safe: a query in flight is abandoned with its socket.

    Backpressure:
        Bounded by ``config.timeout`` for the whole lookup.
    """
    answer = DnsAnswer()
    if len(name.encode()) > 63:
        answer.notes.append(f"dns: {name!r} is longer than one DNS label (63 bytes)")
        return answer
    try:
        asker = _Asker(config)
    except ImportError:
        answer.notes.append("dns: dnspython is not installed (pip install dnspython); "
                            "DNS source skipped")
        return answer
    rng = rng or random.Random()
    per_form: dict[str, DnsAnswer] = {}
    forms = query_names(name, config.domain)
    failures: list[str] = []

    async def run(form: str, labels: tuple[str, ...]) -> None:
        try:
            await _one_form(asker, name, form, labels, rng, per_form)
        except (OSError, ValueError, EOFError, asker.dns.exception.DNSException) as exc:
            failures.append(f"dns {form} {'.'.join(labels)}: {type(exc).__name__}: {exc}")

    with trio.move_on_after(config.timeout) as scope:
        async with trio.open_nursery() as nursery:
            for form, labels in forms:
                nursery.start_soon(run, form, labels)
    if scope.cancelled_caught:
        answer.notes.append(f"dns: {config.where} did not answer everything within "
                            f"{config.timeout:g} s")
    answer.notes += failures
    for form, _ in forms:
        got = per_form.get(form)
        if got is not None:
            answer.endpoints += got.endpoints
            answer.notes += got.notes
    if not answer.endpoints and not answer.notes:
        asked = ", ".join(asker.name(labels).to_text() for _, labels in forms)
        answer.notes.append(f"dns: {config.where} has no SRV record for {name!r} "
                            f"(asked {asked})")
    if len(answer.endpoints) > MAX_ENDPOINTS:
        answer.notes.append(f"dns: {len(answer.endpoints)} endpoints; the first "
                            f"{MAX_ENDPOINTS} used")
        del answer.endpoints[MAX_ENDPOINTS:]
    return answer
