"""The resolver: asks every source, then ranks (see the package docstring)."""

from __future__ import annotations

import logging
import os

import trio

from . import zeroconf as zc
from ._rank import rank
from ._types import Choice, Endpoint, LocalFacts, Policy, Ranking
from .errors import ResolveError
from .hoststore import HostStore, HostStoreSource, default_host_id
from .names import validate_service_name
from .rules import Rules, rules_from
from .zeroconf import ZeroconfConfig

__all__ = ["Resolver"]

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
        host_id: our host id (default :func:`default_host_id`).
        tls_configured: whether this end can speak TLS (has a CA to verify
            servers and a certificate); TLS endpoints are rejected otherwise.

    Raises:
        RulesError: the rules file is malformed (file and line in the message).
        StoreError: the host store cannot be used.
    """

    def __init__(
        self,
        *,
        host_store: HostStore | str | os.PathLike[str] | None = None,
        rules: Rules | str | os.PathLike[str] | None = None,
        zeroconf: ZeroconfConfig | bool | None = None,
        host_id: str | None = None,
        tls_configured: bool = True,
    ) -> None:
        self.store = host_store if isinstance(host_store, HostStore) else HostStore(host_store)
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
        self.facts = LocalFacts(host_id or default_host_id(self.store), tls_configured)

    async def candidates(self, name: str) -> list[Endpoint]:
        """Every endpoint the sources know for ``name``, unranked, sources in order.

        Raises:
            InvalidName: ``name`` is not a valid service name.

        Cancellation:
            Safe; a zeroconf query still running finishes in its thread.

        Backpressure:
            With zeroconf enabled, waits up to its timeout for an answer.
        """
        validate_service_name(name)
        found = list(self.hoststore.lookup(name))
        if self.rules is not None:
            found += self.rules.lookup(name)
        if self.zeroconf is not None:
            try:
                for ad in await zc.lookup(name, self.zeroconf):
                    found += ad.endpoints()
            except OSError as exc:
                logger.warning("zeroconf lookup of %r failed: %s", name, exc)
        await trio.lowlevel.checkpoint()
        return found

    async def explain(self, name: str, policy: Policy | None = None) -> Ranking:
        """Resolve ``name`` and keep the rejected endpoints with their reasons.

        Raises, Cancellation, Backpressure: as :meth:`candidates`.
        """
        return rank(await self.candidates(name), self.facts, policy or Policy())

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
            raise ResolveError(f"no usable endpoint for {name!r}: {why}")
        return list(ranking.chosen)

