"""Name resolution: host store, static rules, unicast DNS and zeroconf registries.

``Resolver.resolve(name)`` asks every configured source for endpoints of
``name`` (the host store for co-located services, a static rules file, a DNS
server's SRV + TXT records and zeroconf DNS-SD when enabled) and ranks them with the pure function
:func:`rank` (vchan > tls > tcp by default), giving the reason for each place.
See README.md, "Services by name".

This is the naming layer: it owns the service-name rule (``names``), the host
store and its files (``hoststore``), the XenStore registry (``xenstore``, over
a client the caller provides) and its own errors (``errors``).  It does not
depend on meshlink; meshlink builds on it and turns these errors into its
own (each meshlink class also subclasses the one here).

Modules: ``_types`` (endpoints, policy), ``_rank`` (the ranking), one per
source (``hoststore``, ``rules``, ``dnssrv``, ``zeroconf``), ``_resolver``
(combines them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names

if TYPE_CHECKING:
    from ._rank import rank
    from ._resolver import Resolver
    from ._types import SCHEMES, Choice, Endpoint, LocalFacts, Policy, Ranking, Scheme
    from .dnssrv import DnsConfig
    from .errors import (
        DnsConfigError,
        InvalidName,
        NameInUse,
        ResolveError,
        ResolverError,
        RulesError,
        ServiceNotFound,
        StoreError,
    )
    from .hoststore import (
        HostStore,
        HostStoreSource,
        Publication,
        ServiceRecord,
        blk_entry_name,
        default_host_id,
        remove_record,
        write_record,
    )
    from .names import validate_service_name
    from .rules import Rules, load_rules, parse_rules
    from .zeroconf import Advertisement, ZeroconfConfig

__all__ = [
    "SCHEMES",
    "Advertisement",
    "Choice",
    "DnsConfig",
    "DnsConfigError",
    "Endpoint",
    "HostStore",
    "HostStoreSource",
    "InvalidName",
    "LocalFacts",
    "NameInUse",
    "Policy",
    "Publication",
    "Ranking",
    "ResolveError",
    "Resolver",
    "ResolverError",
    "Rules",
    "RulesError",
    "Scheme",
    "ServiceNotFound",
    "ServiceRecord",
    "StoreError",
    "ZeroconfConfig",
    "blk_entry_name",
    "default_host_id",
    "load_rules",
    "parse_rules",
    "rank",
    "remove_record",
    "validate_service_name",
    "write_record",
]

#: Names imported on first access (PEP 562), and the module each comes from:
#: ``from resolver import HostStore`` loads the host store alone, not zeroconf,
#: DNS or the rules parser.
_LAZY: dict[str, str] = {
    "rank": "._rank",
    "Resolver": "._resolver",
    "SCHEMES": "._types", "Choice": "._types", "Endpoint": "._types", "LocalFacts": "._types",
    "Policy": "._types", "Ranking": "._types", "Scheme": "._types",
    "DnsConfig": ".dnssrv",
    "DnsConfigError": ".errors", "InvalidName": ".errors", "NameInUse": ".errors",
    "ResolveError": ".errors", "ResolverError": ".errors", "RulesError": ".errors",
    "ServiceNotFound": ".errors", "StoreError": ".errors",
    "HostStore": ".hoststore", "HostStoreSource": ".hoststore", "Publication": ".hoststore",
    "ServiceRecord": ".hoststore", "blk_entry_name": ".hoststore",
    "default_host_id": ".hoststore", "remove_record": ".hoststore", "write_record": ".hoststore",
    "validate_service_name": ".names",
    "Rules": ".rules", "load_rules": ".rules", "parse_rules": ".rules",
    "Advertisement": ".zeroconf", "ZeroconfConfig": ".zeroconf",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(), __all__)
