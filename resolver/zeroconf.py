"""Zeroconf DNS-SD registry: advertise and find ``_meshlink._tcp.local.`` services.

Theory of operation
-------------------
A server registers one DNS-SD instance per service name: instance
``NAME._meshlink._tcp.local.``, SRV port = its TLS port (else its TCP port),
A records = the addresses it listens on, and TXT records::

    v=1                protocol version of these records
    name=NAME          the service name (instance names may be renamed on conflict)
    id=HOSTID          host id (see resolver.hoststore.default_host_id)
    tr=vchan,tls,tcp   transports offered
    tls=PORT tcp=PORT  the TLS and plain TCP ports (either may be absent)
    fp=SHA256HEX       fingerprint of the server's TLS certificate

*Bridging into trio.*  python-zeroconf runs its own asyncio loop in a thread
and offers a blocking API on top.  Every call here (creating the ``Zeroconf``
object, registering, querying, browsing, closing) runs in
:func:`trio.to_thread.run_sync`, so the trio loop never blocks; each operation
owns its ``Zeroconf`` object, so nothing is shared between trio tasks.  A
registration keeps its object until :meth:`Registration.withdraw`.

*Scope.*  mDNS goes to every interface unless told otherwise.  Pass
``interfaces`` (IP addresses) to keep it on chosen links; the tests run it in
network namespaces joined by a veth pair.  Zeroconf is opt-in in meshlink
(``zeroconf=`` arguments, ``MESHLINK_ZEROCONF``): a library should not announce
services on a network nobody asked it to.

*Cost.*  python-zeroconf (and attrs, asyncio under it) is imported on first
use, inside the calls that touch the network: a program that only parses a
``ZeroconfConfig`` or builds an ``Advertisement`` does not pay for it.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ._types import Endpoint

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, ServiceStateChange, Zeroconf

__all__ = [
    "ENV_VAR",
    "SERVICE_TYPE",
    "Advertisement",
    "Registration",
    "ZeroconfConfig",
    "browse",
    "lookup",
    "register",
]

SERVICE_TYPE = "_meshlink._tcp.local."
ENV_VAR = "MESHLINK_ZEROCONF"
TXT_VERSION = "1"


@dataclass(frozen=True)
class ZeroconfConfig:
    """Where and how long to use mDNS.

    Attributes:
        interfaces: IP addresses of the interfaces to use; empty = all.
        timeout: seconds to wait for an answer when looking a name up, and to
            listen when browsing.
    """

    interfaces: tuple[str, ...] = ()
    timeout: float = 2.0

    @classmethod
    def from_env(cls) -> ZeroconfConfig | None:
        """``$MESHLINK_ZEROCONF``: unset/``0``/``off`` = disabled, ``all`` or ``1``
        = every interface, else a comma-separated list of interface addresses."""
        value = os.environ.get(ENV_VAR, "").strip()
        if value.lower() in ("", "0", "off", "no"):
            return None
        if value.lower() in ("1", "all", "on", "yes"):
            return cls()
        return cls(tuple(v.strip() for v in value.split(",") if v.strip()))

    def _new(self) -> Zeroconf:
        from zeroconf import IPVersion, Zeroconf

        if self.interfaces:
            return Zeroconf(interfaces=list(self.interfaces), ip_version=IPVersion.V4Only)
        return Zeroconf(ip_version=IPVersion.V4Only)


@dataclass(frozen=True)
class Advertisement:
    """What a server announces (and what browsing finds).

    Attributes:
        name: the service name.
        host_id: the server's host id.
        transports: transports offered.
        addresses: IP addresses it listens on.
        tls_port: TLS port, or 0.
        tcp_port: plain TCP port, or 0.
        fingerprint: SHA-256 (hex) of its TLS certificate, or ``None``.
        version: TXT record version.
    """

    name: str
    host_id: str
    transports: tuple[str, ...]
    addresses: tuple[str, ...] = ()
    tls_port: int = 0
    tcp_port: int = 0
    fingerprint: str | None = None
    version: str = TXT_VERSION

    def endpoints(self) -> list[Endpoint]:
        """The endpoints this advertisement offers, vchan included (with the host id)."""
        out: list[Endpoint] = []
        if "vchan" in self.transports:
            out.append(Endpoint("vchan", self.name, host_id=self.host_id, source="zeroconf"))
        for addr in self.addresses:
            if self.tls_port and "tls" in self.transports:
                out.append(Endpoint("tls", addr, self.tls_port, host_id=self.host_id,
                                    fingerprint=self.fingerprint, source="zeroconf"))
        for addr in self.addresses:
            if self.tcp_port and "tcp" in self.transports:
                out.append(Endpoint("tcp", addr, self.tcp_port, host_id=self.host_id,
                                    source="zeroconf"))
        return out

    def _info(self) -> ServiceInfo:
        props: dict[str, str] = {"v": self.version, "name": self.name, "id": self.host_id,
                                 "tr": ",".join(self.transports)}
        if self.tls_port:
            props["tls"] = str(self.tls_port)
        if self.tcp_port:
            props["tcp"] = str(self.tcp_port)
        if self.fingerprint:
            props["fp"] = self.fingerprint
        host = f"meshlink-{self.host_id[:12]}.local."
        from zeroconf import ServiceInfo

        return ServiceInfo(
            SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}",
            port=self.tls_port or self.tcp_port,
            properties=props, server=host,
            addresses=[socket.inet_aton(a) for a in self.addresses],
        )

    @classmethod
    def _from_info(cls, info: ServiceInfo) -> Advertisement | None:
        raw: dict[Any, Any] = info.properties or {}
        props = {
            (k.decode() if isinstance(k, bytes) else str(k)):
            (v.decode() if isinstance(v, bytes) else "")
            for k, v in raw.items()
        }
        if props.get("v") != TXT_VERSION or "name" not in props or "id" not in props:
            return None
        try:
            tls = int(props.get("tls", "0"))
            tcp = int(props.get("tcp", "0"))
        except ValueError:
            return None
        addrs = tuple(a for a in info.parsed_addresses()
                      if isinstance(ipaddress.ip_address(a), ipaddress.IPv4Address))
        return cls(props["name"], props["id"],
                   tuple(t for t in props.get("tr", "").split(",") if t),
                   addrs, tls, tcp, props.get("fp") or None, props["v"])


@dataclass
class Registration:
    """A live DNS-SD registration; call :meth:`withdraw` to remove it."""

    _zc: Zeroconf | None
    _info: ServiceInfo
    advertisement: Advertisement
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _withdraw_sync(self) -> None:
        with self._lock:
            zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            zc.unregister_service(self._info)
        finally:
            zc.close()

    async def withdraw(self) -> None:
        """Send goodbye packets and close.  Idempotent.

        Cancellation:
            Shielded: once started it completes (about a quarter of a second
            of goodbye packets), so a cancelled server never leaves a
            registration behind while it is still running.
        """
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._withdraw_sync)


async def register(ad: Advertisement, config: ZeroconfConfig) -> Registration:
    """Announce ``ad`` on the network.

    Args:
        ad: what to announce; ``ad.addresses`` must be IPv4 addresses.
        config: interfaces to use.

    Returns:
        A :class:`Registration`.

    Raises:
        OSError: the mDNS sockets could not be opened.
        zeroconf.NonUniqueNameException: renaming is allowed, so in practice
            only on repeated conflicts.

    Cancellation:
        Not cancellable once started (it runs in a worker thread: about a
        second of probing and announcing); the registration is withdrawn
        again if the call was cancelled meanwhile.

    Backpressure:
        None; one registration per call.
    """
    info = ad._info()

    def run() -> Zeroconf:
        zc = config._new()
        try:
            zc.register_service(info, allow_name_change=True)
        except BaseException:
            zc.close()
            raise
        return zc

    zc = await trio.to_thread.run_sync(run)
    reg = Registration(zc, info, ad)
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
    except BaseException:
        await reg.withdraw()
        raise
    return reg


async def lookup(name: str, config: ZeroconfConfig) -> list[Advertisement]:
    """Browse ``_meshlink._tcp.local.`` for the instances serving ``name``.

    Instances are matched by their ``name`` TXT record, so an instance renamed
    after a conflict (``NAME (2)``) is found too.  Returns as soon as one
    matching instance is resolved; without one, after ``config.timeout``.

    Returns:
        The matching advertisements (usually one; empty if none answered).

    Raises:
        OSError: the mDNS sockets could not be opened.

    Cancellation:
        The worker thread finishes its query (at most ``config.timeout``) in
        the background; the result is discarded.

    Backpressure:
        Waits up to ``config.timeout`` for an answer.
    """

    def run() -> list[Advertisement]:
        from zeroconf import ServiceBrowser, ServiceStateChange

        zc = config._new()
        seen: queue.Queue[str] = queue.Queue()
        browsed: set[str] = set()
        # The exact instance first: the common case needs no browse round.
        seen.put(f"{name}.{SERVICE_TYPE}")  # (a guess: it may not exist)

        def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if state_change is not ServiceStateChange.Removed:
                browsed.add(name)
                seen.put(name)

        exact = f"{name}.{SERVICE_TYPE}"
        deadline = time.monotonic() + config.timeout
        tried: set[str] = set()
        retried: set[str] = set()
        found: list[Advertisement] = []
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        try:
            while not found:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    inst = seen.get(timeout=left)
                except queue.Empty:
                    break
                if inst in tried:
                    # Only the guessed exact instance is asked twice: once as a
                    # guess (short budget), again if the browse then reports it.
                    if inst != exact or inst not in browsed or inst in retried:
                        continue
                    retried.add(inst)
                tried.add(inst)
                left = deadline - time.monotonic()
                if inst == exact and inst not in browsed:
                    # A guess: don't let a missing instance eat the whole budget.
                    left = min(left, config.timeout / 4)
                wait_ms = max(1, int(left * 1000))
                info = zc.get_service_info(SERVICE_TYPE, inst, timeout=wait_ms)
                ad = Advertisement._from_info(info) if info is not None else None
                if ad is not None and ad.name == name:
                    found.append(ad)
            return found
        finally:
            browser.cancel()
            zc.close()

    return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


async def browse(config: ZeroconfConfig) -> list[Advertisement]:
    """List every meshlink service answering within ``config.timeout`` seconds.

    Raises:
        OSError: the mDNS sockets could not be opened.

    Cancellation:
        The worker thread finishes browsing in the background; the result is discarded.

    Backpressure:
        Listens for ``config.timeout`` seconds.
    """

    def run() -> list[Advertisement]:
        from zeroconf import ServiceBrowser, ServiceStateChange

        zc = config._new()
        found: set[str] = set()
        done = threading.Event()

        def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if state_change is not ServiceStateChange.Removed:
                found.add(name)

        try:
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
            done.wait(config.timeout)
            browser.cancel()
            out: list[Advertisement] = []
            for inst in sorted(found):
                info = zc.get_service_info(SERVICE_TYPE, inst,
                                           timeout=int(config.timeout * 1000))
                ad = Advertisement._from_info(info) if info is not None else None
                if ad is not None:
                    out.append(ad)
            return out
        finally:
            zc.close()

    return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
