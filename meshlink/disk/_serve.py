"""``meshlink.disk.serve``: the trio task serving exports over the blk ring and/or NBD.

Kept out of the package's ``__init__`` (and loaded on first use, PEP 562)
because its signature needs trio at import time (``trio.TASK_STATUS_IGNORED``),
and ``import meshlink.disk`` must not import trio: the synchronous
``meshlink disk serve`` path (:mod:`meshlink.disk.syncserve`) imports the
package without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import LocalProtocolError, resolver_errors
from . import check_exports, check_listen_address

if TYPE_CHECKING:
    import ssl

    from resolver import HostStore, ZeroconfConfig

    from .backends import Backend
    from .counters import DiskStats
    from .nbd import NBDServer, TLSMode

__all__ = ["serve"]

log = logging.getLogger("meshlink.disk")


async def serve(exports: Mapping[str, Backend], listen: str | None = None, *,
                service: str | None = None, blk: bool = True,
                host_store: HostStore | str | os.PathLike[str] | None = None,
                tls: TLSMode | str = "off", ssl_context: ssl.SSLContext | None = None,
                zeroconf: ZeroconfConfig | bool | None = None,
                advertise: Sequence[str] | None = None, fingerprint: str | None = None,
                host_id: str | None = None, stats: DiskStats | None = None,
                task_status: trio.TaskStatus[NBDServer | None] = trio.TASK_STATUS_IGNORED,
                ) -> None:
    """Serve ``exports`` (disk name -> backend) until cancelled.

    With ``service``, co-located clients open ``"SERVICE/DISK"`` over the blk
    ring (published in the host store); with ``listen``, network clients use
    NBD (``nbd://host:port/DISK``).  Give either or both; every export is
    served on each.  With ``service``, ``listen`` on TCP and zeroconf
    enabled, the NBD endpoints are advertised as ``SERVICE.nbd`` (``tls``
    when ``tls`` is required, ``tcp`` when off, both when optional), so
    ``meshlink.disk.open("SERVICE/DISK")`` on another host finds them; the
    advertisement is withdrawn when serving stops.

    Args:
        exports: backends by disk name; for NBD the first is also the default export.
        listen: NBD address: ``host:port``, ``tcp:host:port`` or ``unix:/path``.
        service: the service name: the blk ring's, and the zeroconf name
            (``SERVICE.nbd``).
        blk: serve the blk ring under ``service`` (``False``: NBD only, still
            advertised under ``service``).
        host_store: host store for the blk ring (and the advertised host id).
        tls: NBD TLS mode: ``off``, ``optional`` or ``required``.
        ssl_context: NBD server TLS context (needed unless tls is off).
        zeroconf: a config, ``True`` (every interface), ``False``, or
            ``None`` for ``$MESHLINK_ZEROCONF`` (unset: off).  Asked for
            explicitly, it needs ``service`` and a TCP ``listen``; from the
            environment it applies only where it can.
        advertise: IPv4 addresses to advertise (default: the listener's, or
            the zeroconf interfaces when it listens on ``0.0.0.0``).
        fingerprint: SHA-256 (hex) of the TLS certificate, for the TXT ``fp`` key.
        host_id: the host id to advertise (default: from ``host_store``).
        stats: counts requests, bytes, errors and latency per export and path
            (``stats.snapshot()``; give the same object to
            ``meshlink.serve(disk_stats=)`` to report it over the bus).
        task_status: ``nursery.start`` receives the running :class:`NBDServer`
            (``None`` when only the blk ring is served) once everything
            listens and is advertised.

    Raises:
        AddressInUse: the NBD address or the service name is taken.
        LocalProtocolError: ``listen`` is not a valid address (see
            :func:`check_listen_address`), a bad export table (see
            :func:`check_exports`), or zeroconf asked for where it cannot
            apply (no ``service``, no ``listen``, a Unix socket, a wildcard
            address with nothing to name); checked before anything is served
            (except the wildcard case, found once bound).
        ValueError: neither ``listen`` nor ``service`` was given.
        OSError: the mDNS sockets could not be opened.

    Cancellation: withdraws the advertisement, stops listening, withdraws the
    service, closes every connection.
    """
    from resolver import validate_service_name

    from .advertise import NBD_NAME_SUFFIX, zeroconf_config
    from .blk import serve_blk
    from .nbd import Export, NBDServer, open_listeners, parse_listen_address

    if listen is None and service is None:
        raise ValueError("serve needs listen= (NBD), service= (blk ring), or both")
    check_exports(exports)
    if listen is not None:
        check_listen_address(listen)
    zc, explicit = zeroconf_config(zeroconf)
    if zc is not None:
        why = ("it needs service= to name the advertisement" if service is None else
               "it advertises NBD and there is no listen=" if listen is None else
               "Unix sockets are not advertised" if parse_listen_address(listen)[0] == "unix"
               else None)
        if why is not None:
            if explicit:
                raise LocalProtocolError(f"zeroconf: {why}")
            log.info("$MESHLINK_ZEROCONF set, but not advertising: %s", why)
            zc = None
        else:
            with resolver_errors():
                validate_service_name(f"{service}{NBD_NAME_SUFFIX}")
    async with trio.open_nursery() as nursery:
        if service is not None and blk:
            await nursery.start(lambda task_status: serve_blk(service, exports,
                                                              host_store=host_store,
                                                              stats=stats,
                                                              task_status=task_status))
        server: NBDServer | None = None
        if listen is not None:
            server = NBDServer([Export(name, backend) for name, backend in exports.items()],
                               tls=tls, ssl_context=ssl_context, stats=stats)
            listeners = await open_listeners(listen)
            await nursery.start(server.serve_listeners, listeners)
            if zc is not None and service is not None:
                config, name = zc, service
                await nursery.start(lambda task_status: _advertise(
                    name, listeners, tls=tls, config=config, host_store=host_store,
                    host_id=host_id, advertise=advertise, fingerprint=fingerprint,
                    task_status=task_status))
        task_status.started(server)


async def _advertise(service: str, listeners: Sequence[trio.SocketListener], *,
                     tls: TLSMode | str, config: ZeroconfConfig,
                     host_store: HostStore | str | os.PathLike[str] | None,
                     host_id: str | None, advertise: Sequence[str] | None,
                     fingerprint: str | None, task_status: trio.TaskStatus[None]) -> None:
    """Keep ``SERVICE.nbd`` advertised until cancelled (a task of :func:`serve`)."""
    from .advertise import advertised

    async with advertised(service, listeners, tls=tls, config=config, host_store=host_store,
                          host_id=host_id, advertise=advertise, fingerprint=fingerprint):
        task_status.started()
        await trio.sleep_forever()
