"""meshlink.disk: block storage backends, shared over the blk ring and NBD.

Backends (``null``, ``memory``, ``file``, ``mmap``, ``cow``) implement one
small :class:`Backend` Protocol; front ends advertise only what a backend
declares.  :func:`serve` exports backends to co-located processes over the
Xen blk ring (:mod:`meshlink.disk.blk`) and/or to the network over NBD
(:mod:`meshlink.disk.nbd`); :func:`open` opens a served disk by
``SERVICE/DISK`` (blk ring) or NBD URI, with the same calls either way.

The names are imported on first use (PEP 562) and :func:`open` and
:func:`serve` import what they use when called, so ``import meshlink.disk``
(and ``meshlink disk serve`` over the blk ring) loads neither the NBD client,
the dialer, TLS set-up nor zeroconf; nor trio (:func:`serve`, a trio task, is
in ``_serve.py``), which ``meshlink disk serve``'s trio-free path needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from resolver.lazy import lazy_names

from ..errors import LocalProtocolError, resolver_errors

if TYPE_CHECKING:
    import ssl

    from resolver import HostStore, Resolver, ZeroconfConfig

    from ..transport.tls import TLSConfig
    from ._serve import serve
    from .advertise import NBD_NAME_SUFFIX
    from .backends import (
        BACKEND_KINDS,
        Backend,
        Capabilities,
        CowBackend,
        FileBackend,
        MemoryBackend,
        MmapBackend,
        NullBackend,
        open_backend,
    )
    from .blk import BlkDisk, open_blk, serve_blk
    from .counters import DiskCounters, DiskStats
    from .nbd import Export, NBDDisk, NBDServer, TLSMode, list_exports, open_nbd

log = logging.getLogger("meshlink.disk")


#: Bounds of ``open(max_in_flight=)``: 0 would block every request forever.
MAX_IN_FLIGHT = 1024


@contextlib.asynccontextmanager
async def open(target: str, *, ssl_context: ssl.SSLContext | None = None,
               host_store: HostStore | str | os.PathLike[str] | None = None,
               resolver: Resolver | None = None, tls: TLSConfig | None = None,
               require_tls: bool = True, zeroconf: ZeroconfConfig | bool | None = None,
               max_in_flight: int = 64) -> AsyncIterator[BlkDisk | NBDDisk]:
    """Open a served disk: ``async with meshlink.disk.open("storage-node/disk0") as d:``.

    ``SERVICE/DISK`` opens the disk over the blk ring when ``SERVICE`` serves
    disks on this host (its ``SERVICE.blk`` entry in the host store is live);
    otherwise over NBD, at the endpoints the resolver finds for the name
    ``SERVICE.nbd`` (rules file, zeroconf), TLS only unless ``require_tls``
    is False.  ``blk://SERVICE/DISK`` insists on the blk ring; an NBD URI
    opens exactly that export.  Every form gives the same calls: ``read``,
    ``write``, ``flush``, ``discard``, ``size``, ``read_only``.

    Args:
        target: ``SERVICE/DISK``, ``blk://SERVICE/DISK``, or an ``nbd://``,
            ``nbds://``, ``nbd+unix://`` or ``nbds+unix://`` URI.
        ssl_context: client TLS context for NBD (default: from ``tls``).
        host_store: host store for the blk ring (default: see :mod:`resolver.hoststore.store`).
        resolver: resolver for the network path (default: ``Resolver(host_store=...)``).
        tls: certificates for NBD over TLS (default: ``MESHLINK_TLS_*``); the
            server's certificate must name ``SERVICE``.
        require_tls: never use plain TCP for the network path.
        zeroconf: for the default resolver: a config, ``True`` (every
            interface), ``False``, or ``None`` for ``$MESHLINK_ZEROCONF``
            (unset: off).  With ``resolver``, configure it there instead.
        max_in_flight: NBD requests pipelined at once, 1..1024 (the blk ring
            pipelines up to its ring size).

    Yields:
        The open disk.

    Raises:
        ServiceNotFound: ``blk://`` given and no live blk service on this host.
        ResolveError: not co-located and no usable NBD endpoint (the message
            lists every attempt).
        ValueError: an NBD URI this version cannot open.
        LocalProtocolError: ``max_in_flight`` out of range, or both
            ``resolver`` and ``zeroconf`` given (checked first).
        ConnectionLost / HandshakeError: see :func:`open_blk` and :func:`open_nbd`.
    """
    from resolver import Endpoint, HostStore, Policy, Resolver, blk_entry_name

    from ..transport.dial import open_first
    from ..transport.tls import TLSConfig
    from .advertise import NBD_NAME_SUFFIX
    from .blk import open_blk
    from .nbd import open_nbd

    if (not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool)
            or not 1 <= max_in_flight <= MAX_IN_FLIGHT):
        raise LocalProtocolError(f"max_in_flight must be 1..{MAX_IN_FLIGHT}, "
                                 f"not {max_in_flight!r}")
    if resolver is not None and zeroconf is not None:
        raise LocalProtocolError("zeroconf= configures the default resolver; with resolver=, "
                                 "give it to the Resolver instead")
    if target.startswith(("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")):
        async with open_nbd(target, ssl_context=ssl_context,
                            max_in_flight=max_in_flight) as disk:
            yield disk
        return
    explicit_blk = target.startswith("blk://")
    target = target.removeprefix("blk://")
    service, _, disk_name = target.partition("/")
    with resolver_errors():
        store = HostStore.of(host_store)
        co_located = explicit_blk or store.is_live(blk_entry_name(service))
    if co_located:
        async with open_blk(target, host_store=store) as blk:
            yield blk
        return
    log.info("disk %s is not served on this host; resolving %s%s", target, service,
             NBD_NAME_SUFFIX)
    tls = tls if tls is not None else TLSConfig.from_env()
    if ssl_context is None and tls is not None and tls.can_connect:
        ssl_context = tls.client_context()
    with resolver_errors():
        resolver = resolver or Resolver(host_store=store, zeroconf=zeroconf,
                                        tls_configured=ssl_context is not None)
        choices = await resolver.resolve(service + NBD_NAME_SUFFIX,
                                         Policy(require_tls=require_tls, forbid_vchan=True))

    def nbd_url(ep: Endpoint) -> str:
        host = f"[{ep.host}]" if ":" in ep.host else ep.host
        return f"{'nbds' if ep.scheme == 'tls' else 'nbd'}://{host}:{ep.port}/{disk_name}"

    def attempt(ep: Endpoint) -> contextlib.AbstractAsyncContextManager[NBDDisk]:
        return open_nbd(nbd_url(ep), ssl_context=ssl_context if ep.scheme == "tls" else None,
                        server_hostname=service, max_in_flight=max_in_flight)

    network = [c for c in choices if c.endpoint.scheme in ("tls", "tcp")]
    failure = f"disk {target!r}: not served on this host, and over NBD"
    async with open_first(network, attempt, subject=f"disk {target}", failure=failure,
                          log=log, describe=nbd_url) as (nbd, _):
        yield nbd


def check_listen_address(listen: str) -> None:
    """Refuse an NBD listen address before anything is bound.

    ``host:port``, ``tcp:host:port``, ``[v6]:port`` or ``unix:/path``; the
    port is ``0`` (the kernel picks a free one; ``serve`` reports it through
    the listeners) or ``1..65535``.

    Raises:
        LocalProtocolError: not an address of those forms, or a port out of range.
    """
    from .nbd import parse_listen_address

    try:
        kind, where = parse_listen_address(listen)
    except ValueError as exc:
        raise LocalProtocolError(f"listen address: {exc}") from None
    if kind == "tcp":
        assert isinstance(where, tuple)
        port_text = listen.rpartition(":")[2]
        if not port_text.isascii():  # int() would read other scripts' digits too
            raise LocalProtocolError(f"listen address {listen!r}: the port must be "
                                     f"written in ASCII digits")
        if not 0 <= where[1] <= 65535:
            raise LocalProtocolError(f"listen address {listen!r}: port {where[1]} is not "
                                     f"in 1..65535 (or 0 for any free port)")


def check_exports(exports: Mapping[str, Backend]) -> None:
    """Refuse an export table before anything is served.

    Raises:
        LocalProtocolError: no exports, or a name that is not a non-empty
            string of at most 4096 UTF-8 bytes (the NBD limit) without ``/``
            (``SERVICE/DISK`` splits at the first one).
    """
    if not exports:
        raise LocalProtocolError("serve needs at least one export")
    for name in exports:
        if not isinstance(name, str) or not name or "/" in name or \
                len(name.encode("utf-8", "surrogatepass")) > 4096:
            raise LocalProtocolError(f"export name {name!r}: use 1..4096 bytes without '/'")


__all__ = [
    "BACKEND_KINDS",
    "BlkDisk",
    "Backend",
    "Capabilities",
    "CowBackend",
    "DiskCounters",
    "DiskStats",
    "Export",
    "FileBackend",
    "MemoryBackend",
    "MmapBackend",
    "NBDDisk",
    "NBDServer",
    "NullBackend",
    "NBD_NAME_SUFFIX",
    "TLSMode",
    "check_exports",
    "check_listen_address",
    "list_exports",
    "open",
    "open_backend",
    "open_blk",
    "open_nbd",
    "serve",
    "serve_blk",
]

#: Names imported on first access (PEP 562), and the module each comes from.
_LAZY: dict[str, str] = {
    "BACKEND_KINDS": ".backends", "Backend": ".backends", "Capabilities": ".backends",
    "CowBackend": ".backends", "FileBackend": ".backends", "MemoryBackend": ".backends",
    "MmapBackend": ".backends", "NullBackend": ".backends", "open_backend": ".backends",
    "BlkDisk": ".blk", "open_blk": ".blk", "serve_blk": ".blk",
    "DiskCounters": ".counters", "DiskStats": ".counters",
    "Export": ".nbd", "NBDDisk": ".nbd", "NBDServer": ".nbd", "TLSMode": ".nbd",
    "list_exports": ".nbd", "open_nbd": ".nbd",
    "NBD_NAME_SUFFIX": ".advertise",
    "serve": "._serve",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(), __all__)
