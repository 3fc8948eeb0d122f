"""Ranking: a pure function from endpoints and local facts to an ordered choice.

Theory of operation
-------------------
Sources (host store, rules file, unicast DNS, zeroconf) produce candidate endpoints; this
module decides which to try and in what order, and says why for each one, so
``meshlink resolve NAME --explain`` can print the decision.  No I/O, no clock:
the same input always gives the same output (docs/architecture.md section 3).

1. Duplicates (the same URL from several sources) are merged; the reason names
   every source.
2. Policy filters: a pin keeps only the pinned endpoint; ``forbid_vchan``
   drops vchan; ``require_tls`` drops plain TCP; plain TCP that only unicast
   DNS vouches for needs ``allow_plaintext`` (an unauthenticated answer must
   not steer a client off TLS); TLS needs a TLS configuration.
3. Co-location is *claimed* here and *proved* at connect time: a vchan endpoint
   is kept only when the advertised host id equals ours (or the rules file or a
   pin names it explicitly, which is the operator's claim, or it is live in our
   own host store without a record: a bare vchan listener); the vchan handshake
   then proves it, and a failure falls back to the next endpoint.
4. Order: by transport (``policy.order``, default vchan > tls > tcp), then by
   source (host store, rules, DNS, zeroconf), then as the source listed them.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._types import Choice, Endpoint, LocalFacts, Policy, Ranking

__all__ = ["SOURCE_ORDER", "rank"]

#: Sources in order of trust: local facts first, then the operator, then the
#: network -- the DNS server the user named before anyone on the local link.
SOURCE_ORDER = ("pin", "hoststore", "xenstore", "rules", "dns", "zeroconf")


def _source_rank(source: str) -> int:
    first = source.split("+", 1)[0]
    return SOURCE_ORDER.index(first) if first in SOURCE_ORDER else len(SOURCE_ORDER)


def _merge(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """Merge duplicates by URL, keeping the first and joining the sources."""
    seen: dict[str, Endpoint] = {}
    for ep in endpoints:
        prev = seen.get(ep.url)
        if prev is None:
            seen[ep.url] = ep
            continue
        sources = prev.source.split("+")
        if ep.source and ep.source not in sources:
            sources.append(ep.source)
        seen[ep.url] = Endpoint(
            prev.scheme, prev.host, prev.port,
            store=prev.store if prev.store is not None else ep.store,
            host_id=prev.host_id if prev.host_id is not None else ep.host_id,
            fingerprint=prev.fingerprint if prev.fingerprint is not None else ep.fingerprint,
            source="+".join(sorted((s for s in sources if s), key=_source_rank)),
            via=prev.via,
            domid=prev.domid,
        )
    return list(seen.values())


def _judge_ivshmem(ep: Endpoint, facts: LocalFacts, src: str) -> tuple[bool, str]:
    """A vchan through an ivshmem region: co-located when we map a region of its host id."""
    if facts.ivshmem_host_id is None:
        return False, f"{src}; vchan over ivshmem, but this end maps no ivshmem region"
    if ep.host_id is None:
        if ep.source.startswith("rules"):
            return True, (f"{src}: the rules file names it; co-location in ivshmem region of "
                          f"host {facts.ivshmem_host_id} to be proved by connecting through it")
        return False, f"{src}; no host id advertised, so KVM co-location cannot be claimed"
    if ep.host_id != facts.ivshmem_host_id:
        return False, (f"{src}; advertised region host id {ep.host_id} differs from our "
                       f"region's ({facts.ivshmem_host_id}): not co-located")
    return True, (f"{src}; co-located on KVM: our ivshmem region was stamped by host "
                  f"{ep.host_id} (to be proved by connecting through it)")


def _judge(ep: Endpoint, facts: LocalFacts, policy: Policy) -> tuple[bool, str]:
    """Whether ``ep`` may be tried, and why (or why not)."""
    src = f"from {ep.source or 'unknown source'}"
    if ep.scheme not in policy.order:
        return False, f"{ep.scheme} is not in the policy's transport order {policy.order}"
    if ep.scheme == "vchan":
        if policy.forbid_vchan:
            return False, f"{src}; vchan forbidden by policy"
        if ep.source == "pin":
            return True, "pinned; co-location to be proved by the vchan handshake"
        if ep.via == "ivshmem":
            return _judge_ivshmem(ep, facts, src)
        if ep.domid is not None:
            # A Xen channel: co-located when it carries the Xen host's id, the
            # one every domain of the host reads from XenStore.
            if facts.xen_host_id is None:
                return False, f"{src}; Xen vchan, but we are not on Xen"
            if ep.host_id != facts.xen_host_id:
                return False, (f"{src}; Xen host id {ep.host_id} differs from ours "
                               f"({facts.xen_host_id}): not co-located")
            return True, (f"{src}; co-located on Xen host {ep.host_id} (domain {ep.domid}; "
                          "to be proved by the vchan handshake)")
        if ep.host_id is None:
            if ep.source.startswith("hoststore"):
                return True, (f"{src}: live in our host store without a record (a bare vchan "
                              "listener, or one starting up); co-location to be proved by "
                              "the vchan handshake")
            if ep.source.startswith("rules"):
                return True, (f"{src}: the rules file names it; co-location to be proved "
                              "by the vchan handshake")
            return False, f"{src}; no host id advertised, so co-location cannot be claimed"
        if ep.host_id != facts.host_id:
            return False, (f"{src}; advertised host id {ep.host_id} differs from ours "
                           f"({facts.host_id}): not co-located")
        return True, (f"{src}; co-located: host id {ep.host_id} is ours "
                      "(to be proved by the vchan handshake)")
    if ep.scheme == "tcp" and policy.require_tls:
        return False, f"{src}; plain TCP refused: policy requires TLS"
    if ep.scheme == "tcp" and ep.source == "dns" and not policy.allow_plaintext:
        return False, (f"{src}; plain TCP vouched for only by an unauthenticated DNS answer: "
                       "refused unless plaintext is allowed (allow_plaintext, "
                       "$MESHLINK_ALLOW_PLAINTEXT=1)")
    if ep.scheme == "tls" and not facts.tls_configured:
        return False, f"{src}; no TLS configuration (certificate, key, CA) on this end"
    what = "TLS" if ep.scheme == "tls" else "plain TCP"
    if ep.source == "pin":
        return True, f"pinned {what} endpoint"
    return True, f"{src}; {what}"


def rank(endpoints: Iterable[Endpoint], facts: LocalFacts, policy: Policy) -> Ranking:
    """Rank candidate endpoints for one name.

    Args:
        endpoints: candidates from every source, in the order each source gave them.
        facts: what we know about this end (host id, TLS configuration).
        policy: transport order, TLS requirement, vchan ban, pin.

    Returns:
        A :class:`Ranking`: endpoints to try in order, and the rejected ones,
        each with a one-line reason.

    Raises:
        ValueError: ``policy.pin`` is a string that is not an endpoint URL.
    """
    candidates = _merge(endpoints)
    rejected: list[Choice] = []
    if policy.pin is not None:
        pin = policy.pin if isinstance(policy.pin, Endpoint) else Endpoint.parse(
            policy.pin, source="pin")
        pin = Endpoint(pin.scheme, pin.host, pin.port, store=pin.store, host_id=pin.host_id,
                       fingerprint=pin.fingerprint, source="pin", via=pin.via,
                       domid=pin.domid)
        rejected += [Choice(ep, f"from {ep.source}; not the pinned endpoint {pin.url}")
                     for ep in candidates if ep.url != pin.url]
        candidates = [pin]
    keep: list[tuple[tuple[int, int, int], Choice]] = []
    for index, ep in enumerate(candidates):
        ok, why = _judge(ep, facts, policy)
        if not ok:
            rejected.append(Choice(ep, why))
            continue
        place = policy.order.index(ep.scheme)
        keep.append(((place, _source_rank(ep.source), index), Choice(ep, why)))
    keep.sort(key=lambda item: item[0])
    chosen = []
    for n, (_, choice) in enumerate(keep, 1):
        order = " > ".join(policy.order)
        chosen.append(Choice(choice.endpoint, f"#{n}: {choice.reason} (order {order})"))
    return Ranking(tuple(chosen), tuple(rejected))
