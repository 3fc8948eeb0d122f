"""Zeroconf advertisement of a disk server's NBD endpoints under ``SERVICE.nbd``.

:func:`meshlink.disk.open` looks a remote ``SERVICE/DISK`` up as the name
``SERVICE.nbd`` and opens export ``DISK`` at the endpoints it finds.  This
module is the server's half: it turns the NBD listeners of ``disk serve``
into one DNS-SD registration through :mod:`resolver.zeroconf` (the same
instance type and TXT keys as bus services: ``tr`` says ``tls`` and/or
``tcp``, never ``vchan``) and withdraws it when the server stops.

What is advertised follows what the listener really does, so a client never
learns of a path the server would refuse: ``tls`` when NBD TLS is required,
``tcp`` when the listener is plain, both when TLS is optional.  Unix sockets
are never advertised (nobody off this host can reach them); IPv6 listeners
neither (the registry speaks IPv4 only).  Zeroconf stays opt-in as for
services: ``zeroconf=`` / ``--zeroconf`` / ``$MESHLINK_ZEROCONF``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Sequence

import trio

from resolver import (
    Advertisement,
    HostStore,
    ZeroconfConfig,
    default_host_id,
    validate_service_name,
)
from resolver.zeroconf import Registration
from resolver.zeroconf import register as zeroconf_register

from ..errors import LocalProtocolError, resolver_errors
from .nbd import TLSMode

__all__ = ["NBD_NAME_SUFFIX", "advertised", "nbd_advertisement", "zeroconf_config"]

log = logging.getLogger("meshlink.disk")

#: Suffix of the name under which a service's NBD endpoints are resolved.
NBD_NAME_SUFFIX = ".nbd"

_WILDCARDS = ("0.0.0.0", "", "::")


def zeroconf_config(zeroconf: ZeroconfConfig | bool | None) -> tuple[ZeroconfConfig | None, bool]:
    """The zeroconf configuration to use, and whether the caller asked for it explicitly.

    ``None`` reads ``$MESHLINK_ZEROCONF`` (unset: off); ``True`` is every interface.
    An explicit request that cannot be honoured is an error; one from the
    environment only applies where it can (see :func:`meshlink.disk.serve`).
    """
    if zeroconf is None:
        return ZeroconfConfig.from_env(), False
    if zeroconf is True:
        return ZeroconfConfig(), True
    if zeroconf is False:
        return None, False
    return zeroconf, True


def _ipv4(text: str, what: str) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise LocalProtocolError(f"{what}: {text!r} is not an IP address") from None
    if not isinstance(addr, ipaddress.IPv4Address):
        raise LocalProtocolError(f"{what}: {text!r} is not IPv4 (zeroconf advertises IPv4 only)")
    return text


def nbd_advertisement(service: str, listeners: Sequence[trio.SocketListener], *,
                      tls: TLSMode | str, config: ZeroconfConfig, host_id: str,
                      advertise: Sequence[str] | None = None,
                      fingerprint: str | None = None) -> Advertisement:
    """What to announce for ``service`` serving NBD on ``listeners`` (pure: no network).

    The port is the first IPv4 TCP listener's; the addresses are ``advertise``
    if given, else those listeners' addresses, a wildcard (``0.0.0.0``) being
    replaced by the zeroconf interfaces.

    Raises:
        LocalProtocolError: no IPv4 TCP listener (Unix sockets only, or IPv6),
            a wildcard listener with neither ``advertise`` nor zeroconf
            interfaces to name, or an ``advertise`` entry that is not IPv4.
    """
    bound = [lst.socket.getsockname() for lst in listeners]
    tcp4 = [(a[0], a[1]) for a in bound if isinstance(a, tuple) and len(a) == 2]
    if not tcp4:
        raise LocalProtocolError(
            f"cannot advertise {service}{NBD_NAME_SUFFIX} on zeroconf: the NBD server has no "
            f"IPv4 TCP listener (Unix sockets and IPv6 are never advertised)")
    port = tcp4[0][1]
    if advertise is not None:
        addresses = [_ipv4(a, "advertise") for a in advertise]
    else:
        addresses = []
        for host, p in tcp4:
            if p != port:  # one port per transport in the TXT record
                continue
            if host in _WILDCARDS:
                if not config.interfaces:
                    raise LocalProtocolError(
                        f"cannot advertise {service}{NBD_NAME_SUFFIX}: the NBD listener "
                        f"accepts on every address; name the ones to advertise (zeroconf "
                        f"interfaces, or advertise=)")
                addresses += [_ipv4(i, "zeroconf interface") for i in config.interfaces]
            else:
                addresses.append(host)
    addresses = list(dict.fromkeys(addresses))
    if not addresses:
        raise LocalProtocolError(f"cannot advertise {service}{NBD_NAME_SUFFIX}: no address")
    if any(ipaddress.ip_address(a).is_loopback for a in addresses):
        log.warning("advertising %s%s at a loopback address (%s): only this host can use it",
                    service, NBD_NAME_SUFFIX, ", ".join(addresses))
    mode = TLSMode(tls)
    transports = {TLSMode.REQUIRED: ("tls",), TLSMode.OPTIONAL: ("tls", "tcp"),
                  TLSMode.OFF: ("tcp",)}[mode]
    return Advertisement(
        service + NBD_NAME_SUFFIX, host_id, transports, tuple(addresses),
        tls_port=port if "tls" in transports else 0,
        tcp_port=port if "tcp" in transports else 0,
        fingerprint=fingerprint if "tls" in transports else None)


@contextlib.asynccontextmanager
async def advertised(service: str, listeners: Sequence[trio.SocketListener], *,
                     tls: TLSMode | str, config: ZeroconfConfig,
                     host_store: HostStore | str | os.PathLike[str] | None = None,
                     host_id: str | None = None, advertise: Sequence[str] | None = None,
                     fingerprint: str | None = None) -> AsyncIterator[Registration]:
    """Advertise ``SERVICE.nbd`` while the block runs; withdraw it on the way out.

    Args:
        service: the service name (``disk.open("SERVICE/DISK")`` finds it).
        listeners: the NBD server's listeners (already bound).
        tls: the NBD server's TLS mode (decides ``tls`` and/or ``tcp``).
        config: zeroconf interfaces.
        host_store: whose host id to advertise (default store).
        host_id: the host id (default: :func:`resolver.default_host_id`).
        advertise: addresses to advertise instead of the listeners'.
        fingerprint: SHA-256 (hex) of the TLS certificate, for the ``fp`` key.

    Yields:
        The live registration.

    Raises:
        LocalProtocolError: see :func:`nbd_advertisement`; bad service name.
        OSError: the mDNS sockets could not be opened.

    Cancellation:
        The goodbye packets are shielded: a cancelled server still withdraws.
    """
    with resolver_errors():
        if host_id is None:
            store = HostStore.of(host_store)
            host_id = default_host_id(store)
        ad = nbd_advertisement(service, listeners, tls=tls, config=config, host_id=host_id,
                               advertise=advertise, fingerprint=fingerprint)
        validate_service_name(ad.name)
    reg = await zeroconf_register(ad, config)
    log.info("advertising %s on zeroconf: %s", ad.name,
             ", ".join(ep.url for ep in ad.endpoints()))
    try:
        yield reg
    finally:
        await reg.withdraw()
