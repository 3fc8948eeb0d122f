"""Name resolution for meshlink: host store, static rules and zeroconf registries.

``Resolver.resolve(name)`` asks every configured source for endpoints of
``name`` (the host store for co-located services, a static rules file, and
zeroconf DNS-SD when enabled) and ranks them with the pure function
:func:`rank` (vchan > tls > tcp by default), giving the reason for each place.
See README.md, "Services by name".

Modules: ``_types`` (endpoints, policy), ``_rank`` (the ranking), one per
source (``hoststore``, ``rules``, ``zeroconf``), ``_resolver`` (combines them).
meshlink imports the submodules, never this package's namespace, so importing
``resolver`` first or ``meshlink`` first both work.
"""

from __future__ import annotations

# meshlink first: its package may import meshlink.service, which imports our
# submodules; doing it here, before any of them, makes both import orders work.
import meshlink  # noqa: F401  (import order, see above)

from ._rank import rank
from ._resolver import Resolver
from ._types import SCHEMES, Choice, Endpoint, LocalFacts, Policy, Ranking, Scheme
from .hoststore import ServiceRecord, default_host_id
from .rules import Rules, load_rules, parse_rules
from .zeroconf import Advertisement, ZeroconfConfig

__all__ = [
    "SCHEMES",
    "Advertisement",
    "Choice",
    "Endpoint",
    "LocalFacts",
    "Policy",
    "Ranking",
    "Resolver",
    "Rules",
    "Scheme",
    "ServiceRecord",
    "ZeroconfConfig",
    "default_host_id",
    "load_rules",
    "parse_rules",
    "rank",
]
