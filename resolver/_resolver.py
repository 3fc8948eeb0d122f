"""The resolver: asks every source, then ranks (see the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import trio

from . import dnssrv
from . import zeroconf as zc
from ._rank import rank
from ._types import Choice, Endpoint, LocalFacts, Policy, Ranking
from .dnssrv import DnsConfig
from .errors import DnsConfigError, ResolveError
from .hoststore import HostStore, HostStoreSource, default_host_id
from .names import validate_service_name
from .rules import Rules, rules_from
from .xenstore import XenStoreOpener, XenStoreSource, default_opener
from .zeroconf import ZeroconfConfig

__all__ = ["Resolver", "dns_config"]

logger = logging.getLogger("meshlink.resolver")


class Resolver:
    """Resolves service names to ranked endpoints.

    Args:
        host_store: our host store (a :class:`~resolver.hoststore.HostStore`
            or its path; default as in :mod:`resolver.hoststore.store`).
        rules: parsed rules, a rules file path, or ``None`` for
            ``$MESHLINK_RULES`` (unset: no rules).
        zeroconf: a :class:`ZeroconfConfig`, ``False`` to disable, or ``None``
            for ``$MESHLINK_ZEROCONF`` (unset: disabled).
        dns: the unicast DNS source: a :class:`DnsConfig`, a ``"SERVER[:PORT]"``
            string (domain from ``$MESHLINK_DNS_DOMAIN``), ``False`` to disable,
            or ``None`` for ``$MESHLINK_DNS`` (unset: disabled).
        host_id: our host id (default :func:`default_host_id`).
        tls_configured: whether this end can speak TLS (has a CA to verify
            servers and a certificate); TLS endpoints are rejected otherwise.
        ivshmem_host_id: the host id of the ivshmem region this end maps
            (``meshlink.transport.vchan.ivshmem.local_region_host_id``), which
            makes ``vchan://ivshmem/NAME`` endpoints of that host co-located;
            or a function returning it, called once, and only when such an
            endpoint turns up (finding the region may scan PCI devices).
        xenstore: the XenStore registry source (:mod:`resolver.xenstore`): an
            opener (returns a client, or None where there is no Xen),
            ``False`` to disable, or ``None`` for the opener meshlink
            registers (it opens XenStore when the vchan provider is Xen:
            ``/dev/xen``, or ``MESHLINK_PROVIDER=xen``).  On Xen the Xen host
            id is read once, here.

    Raises:
        RulesError: the rules file is malformed (file and line in the message).
        DnsConfigError: ``dns`` (or ``$MESHLINK_DNS``) is unusable.
        StoreError: the host store cannot be used.
    """

    def __init__(
        self,
        *,
        host_store: HostStore | str | os.PathLike[str] | None = None,
        rules: Rules | str | os.PathLike[str] | None = None,
        zeroconf: ZeroconfConfig | bool | None = None,
        dns: DnsConfig | str | bool | None = None,
        host_id: str | None = None,
        tls_configured: bool = True,
        ivshmem_host_id: str | Callable[[], str | None] | None = None,
        xenstore: XenStoreOpener | bool | None = None,
    ) -> None:
        self.store = HostStore.of(host_store)
        self.hoststore = HostStoreSource(self.store)
        self.rules = rules_from(rules)
        if zeroconf is None:
            self.zeroconf = ZeroconfConfig.from_env()
        elif zeroconf is True:
            self.zeroconf = ZeroconfConfig()
        elif zeroconf is False:
            self.zeroconf = None
        else:
            self.zeroconf = zeroconf
        self.dns = dns_config(dns)
        opener = default_opener() if xenstore is None or xenstore is True else (
            xenstore or None)
        self.xenstore = XenStoreSource(opener) if opener is not None else None
        xen_host_id = self.xenstore.host_id() if self.xenstore is not None else None
        self.facts = LocalFacts(host_id or default_host_id(self.store), tls_configured,
                                ivshmem_host_id=None if callable(ivshmem_host_id)
                                else ivshmem_host_id, xen_host_id=xen_host_id)
        self._ivshmem_lookup = ivshmem_host_id if callable(ivshmem_host_id) else None

    async def candidates(self, name: str) -> list[Endpoint]:
        """Every endpoint the sources know for ``name``, unranked, sources in order.

        Raises:
            InvalidName: ``name`` is not a valid service name.

        Cancellation:
            Safe; a zeroconf query still running finishes in its thread.

        Backpressure:
            With zeroconf or DNS enabled, waits up to their timeouts for answers.
        """
        found, _ = await self._gather(name)
        return found

    async def _gather(self, name: str) -> tuple[list[Endpoint], list[str]]:
        """:meth:`candidates`, plus the notes of the sources (see :class:`Ranking`)."""
        validate_service_name(name)
        notes: list[str] = []
        found = list(self.hoststore.lookup(name))
        if self.xenstore is not None:
            xen, xen_notes = await trio.to_thread.run_sync(self.xenstore.lookup, name)
            found += xen
            notes += xen_notes
        if self.rules is not None:
            found += self.rules.lookup(name)
        if self.dns is not None:
            answer = await dnssrv.lookup(name, self.dns)
            found += answer.endpoints
            notes += answer.notes
            for note in answer.notes:
                logger.info("%s: %s", name, note)
        if self.zeroconf is not None:
            try:
                for ad in await zc.lookup(name, self.zeroconf):
                    found += ad.endpoints()
            except OSError as exc:
                logger.warning("zeroconf lookup of %r failed: %s", name, exc)
                notes.append(f"zeroconf: lookup failed: {exc}")
        await trio.lowlevel.checkpoint()
        return found, notes

    async def explain(self, name: str, policy: Policy | None = None) -> Ranking:
        """Resolve ``name`` and keep the rejected endpoints with their reasons.

        Raises, Cancellation, Backpressure: as :meth:`candidates`.
        """
        found, notes = await self._gather(name)
        lookup = self._ivshmem_lookup
        if lookup is not None and any(ep.via == "ivshmem" for ep in found):
            self._ivshmem_lookup = None  # once: the region is this end's, it does not move
            host_id = await trio.to_thread.run_sync(lookup)
            self.facts = dataclasses.replace(self.facts, ivshmem_host_id=host_id)
        ranking = rank(found, self.facts, policy or Policy())
        return dataclasses.replace(ranking, notes=tuple(notes))

    async def resolve(self, name: str, policy: Policy | None = None) -> list[Choice]:
        """Ranked endpoints for ``name``, best first, each with its reason.

        Args:
            name: the service name.
            policy: transport order, ``require_tls``, ``forbid_vchan``, ``pin``.

        Returns:
            A non-empty list of :class:`Choice`.

        Raises:
            ResolveError: no usable endpoint (the message lists what was
                rejected and why).
            RulesError: a suffix rewrite produced an invalid endpoint.
            ValueError: ``policy.pin`` is not an endpoint URL.

        Cancellation, Backpressure: as :meth:`candidates`.
        """
        ranking = await self.explain(name, policy)
        if not ranking.chosen:
            why = "; ".join(str(c) for c in ranking.rejected) or "no source knows it"
            if ranking.notes:
                why += " (" + "; ".join(ranking.notes[:4]) + ")"
            raise ResolveError(f"no usable endpoint for {name!r}: {why}")
        return list(ranking.chosen)



def dns_config(dns: DnsConfig | str | bool | None) -> DnsConfig | None:
    """The DNS source's configuration from a ``dns=`` argument (see :class:`Resolver`).

    Raises:
        DnsConfigError: unusable (``True`` names no server).
    """
    if dns is None:
        return DnsConfig.from_env()
    if dns is False:
        return None
    if dns is True:
        raise DnsConfigError("dns=True names no server: give dns=\"SERVER[:PORT]\"")
    if isinstance(dns, str):
        return DnsConfig.parse(dns)
    return dns
