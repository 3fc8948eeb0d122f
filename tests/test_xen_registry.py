"""meshlink.transport.xenstore over the emulated XenStore: publish, lookup by
name from another domain, permissions, withdraw."""

from __future__ import annotations

import pytest

from meshlink import ServiceNotFound
from meshlink.transport.xenstore import lookup, prepare_index, publish, withdraw

from .xenemu.fixtures import XenHost, xen_host, xenemu

__all__ = ["xen_host", "xenemu"]


def as_domain(monkeypatch: pytest.MonkeyPatch, domid: int) -> None:
    # The emulation reads the caller's domain id at every xs_open.
    monkeypatch.setenv("XENEMU_DOMID", str(domid))


def test_publish_lookup_withdraw(xen_host: XenHost, monkeypatch: pytest.MonkeyPatch) -> None:
    as_domain(monkeypatch, 0)
    prepare_index()
    as_domain(monkeypatch, 5)
    svc = publish("storage.node-1", 5, "storage", readers=[7])
    assert (svc.domid, svc.port) == (5, "storage")
    as_domain(monkeypatch, 7)  # a reader finds it by name alone
    found = lookup("storage.node-1")
    assert (found.name, found.domid, found.port) == ("storage.node-1", 5, "storage")
    as_domain(monkeypatch, 8)  # anyone else: as if it did not exist
    with pytest.raises(ServiceNotFound):
        lookup("storage.node-1")
    as_domain(monkeypatch, 0)  # dom0 sees everything
    assert lookup("storage.node-1").domid == 5
    as_domain(monkeypatch, 5)
    withdraw("storage.node-1", 5)
    as_domain(monkeypatch, 7)
    with pytest.raises(ServiceNotFound):
        lookup("storage.node-1")


def test_guest_cannot_write_into_another_domains_record(
    xen_host: XenHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_domain(monkeypatch, 0)
    prepare_index()
    as_domain(monkeypatch, 9)
    with pytest.raises(ServiceNotFound):
        publish("fake", 5, "p", readers=[7])  # domain 5's subtree is not ours


def test_without_index_guests_cannot_publish(
    xen_host: XenHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_domain(monkeypatch, 5)
    with pytest.raises(ServiceNotFound):
        publish("early", 5, "p", readers=[7])
