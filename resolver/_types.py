"""Endpoints and the facts the ranking needs (plain data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["SCHEMES", "Choice", "Endpoint", "LocalFacts", "Policy", "Ranking", "Scheme"]

Scheme = Literal["vchan", "tls", "tcp"]
#: Transports in the default order of preference.
SCHEMES: tuple[Scheme, ...] = ("vchan", "tls", "tcp")
#: The authority of a vchan URL: "through the host store".
VCHAN_AUTHORITY = "host-store"
#: The authority of a vchan URL through a shared ivshmem region (KVM guests).
IVSHMEM_AUTHORITY = "ivshmem"
#: The authority of a vchan URL over Xen: ``vchan://xen/DOMID/PORT``.
XEN_AUTHORITY = "xen"


@dataclass(frozen=True)
class Endpoint:
    """One way to reach a service.

    Attributes:
        scheme: ``"vchan"``, ``"tls"`` or ``"tcp"``.
        host: the IP address or DNS name (for vchan: the service name).
        port: the TCP port (0 for vchan).
        store: for vchan, the host store directory that publishes it (``None``:
            the client's own host store).
        host_id: the host id the publisher advertised (``None``: unknown).
        fingerprint: SHA-256 of the server's TLS certificate (hex), if advertised.
        source: which registry produced it (``hoststore``, ``rules``,
            ``zeroconf``, ``dns``, ``pin``, ``xenstore``).
        via: for vchan, ``""`` (through the host store) or ``"ivshmem"``
            (through the ivshmem region this end maps; ``host_id`` is then
            the host id stamped in that region's header).
        domid: for a vchan over Xen, the serving domain (``host`` is then
            the vchan port name); ``None`` for every other endpoint.
    """

    scheme: Scheme
    host: str
    port: int = 0
    store: str | None = field(default=None, compare=False)
    host_id: str | None = field(default=None, compare=False)
    fingerprint: str | None = field(default=None, compare=False)
    source: str = field(default="", compare=False)
    via: str = ""
    domid: int | None = None

    @property
    def url(self) -> str:
        """The endpoint as a URL: ``vchan://host-store/NAME``, ``vchan://xen/DOMID/PORT``,
        ``tls://HOST:PORT``."""
        if self.scheme == "vchan" and self.domid is not None:
            return f"vchan://{XEN_AUTHORITY}/{self.domid}/{self.host}"
        if self.scheme == "vchan":
            authority = IVSHMEM_AUTHORITY if self.via == "ivshmem" else VCHAN_AUTHORITY
            return f"vchan://{authority}/{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url

    @classmethod
    def parse(cls, url: str, *, source: str = "") -> Endpoint:
        """Parse ``vchan://host-store/NAME``, ``vchan://ivshmem/NAME``, ``tls://HOST:PORT``
        or ``tcp://HOST:PORT``.

        Raises:
            ValueError: not one of those forms (the message says why).
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad endpoint {url!r}: {exc}") from exc
        if parts.query or parts.fragment:
            raise ValueError(f"bad endpoint {url!r}: no query or fragment allowed")
        if parts.scheme == "vchan" and parts.netloc == XEN_AUTHORITY:
            dom, _, port_name = parts.path.lstrip("/").partition("/")
            if not dom.isdigit() or not 0 <= int(dom) < 0x7FF0 or not port_name \
                    or "/" in port_name:
                raise ValueError(f"bad endpoint {url!r}: a Xen vchan endpoint is "
                                 f"vchan://{XEN_AUTHORITY}/DOMID/PORT")
            return cls("vchan", port_name, source=source, domid=int(dom))
        if parts.scheme == "vchan":
            name = parts.path.lstrip("/")
            if (parts.netloc not in (VCHAN_AUTHORITY, IVSHMEM_AUTHORITY) or not name
                    or "/" in name):
                raise ValueError(
                    f"bad endpoint {url!r}: a vchan endpoint is vchan://{VCHAN_AUTHORITY}/NAME "
                    f"or vchan://{IVSHMEM_AUTHORITY}/NAME"
                )
            via = "ivshmem" if parts.netloc == IVSHMEM_AUTHORITY else ""
            return cls("vchan", name, source=source, via=via)
        if parts.scheme not in ("tls", "tcp"):
            raise ValueError(f"bad endpoint {url!r}: scheme must be vchan, tls or tcp")
        if not parts.hostname or port is None or not 0 < port < 65536:
            raise ValueError(f"bad endpoint {url!r}: expected {parts.scheme}://HOST:PORT")
        if parts.path not in ("", "/"):
            raise ValueError(f"bad endpoint {url!r}: no path allowed")
        scheme: Scheme = "tls" if parts.scheme == "tls" else "tcp"
        return cls(scheme, parts.hostname, port, source=source)


@dataclass(frozen=True)
class LocalFacts:
    """What the ranking knows about this end.

    Attributes:
        host_id: our host id (see :func:`resolver.hoststore.default_host_id`).
        tls_configured: whether we have a TLS configuration (a CA to verify
            servers with, and our certificate for mutual TLS).
        ivshmem_host_id: the host id in the header of the ivshmem region this
            end maps (``None``: none): parties that map the same region are
            co-located on one KVM host whatever their own host ids.
        xen_host_id: on Xen, the id of the Xen host we run on, as dom0
            published it in XenStore (:mod:`resolver.xenstore`): it comes
            from the host, not from this guest's boot id, so every domain of
            one host shares it.  ``None`` off Xen.
    """

    host_id: str
    tls_configured: bool = True
    ivshmem_host_id: str | None = None
    xen_host_id: str | None = None


@dataclass(frozen=True)
class Policy:
    """How to choose among endpoints.

    Attributes:
        require_tls: refuse plain TCP (vchan stays allowed: it never leaves the host).
        forbid_vchan: never use shared memory (for example, to test TLS locally).
        pin: use exactly this endpoint (a URL or :class:`Endpoint`), nothing else.
        order: preference among transports; the default is vchan > tls > tcp.
        allow_plaintext: also try plain TCP endpoints that only a unicast DNS
            answer vouches for (DNS answers are not authenticated, so by
            default a DNS source leads to TLS or nowhere).
    """

    require_tls: bool = False
    forbid_vchan: bool = False
    pin: str | Endpoint | None = None
    order: tuple[Scheme, ...] = SCHEMES
    allow_plaintext: bool = False


@dataclass(frozen=True)
class Choice:
    """An endpoint and why it was chosen (or rejected)."""

    endpoint: Endpoint
    reason: str

    def __str__(self) -> str:
        return f"{self.endpoint.url}  ({self.reason})"


@dataclass(frozen=True)
class Ranking:
    """The result of ranking: usable endpoints best first, and the rejected ones.

    Attributes:
        chosen: endpoints to try, in order, each with the reason for its place.
        rejected: endpoints that will not be tried, each with the reason.
        notes: what the sources reported besides endpoints (a DNS server that
            did not answer, a record dropped as malformed), for ``--explain``.
    """

    chosen: tuple[Choice, ...]
    rejected: tuple[Choice, ...] = ()
    notes: tuple[str, ...] = ()
