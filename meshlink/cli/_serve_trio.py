"""``meshlink disk serve`` on trio: the path that supports every option.

:func:`serve_trio` runs the blk ring (:func:`~meshlink.disk.blk.serve_blk`)
and/or the NBD server (:class:`~meshlink.disk.nbd.NBDServer`: TCP, Unix
sockets, stdio, socket activation, TLS) and the zeroconf advertisement, and
prints the ``ready`` lines.  ``cli/disk.py`` chooses between it and the
trio-free :mod:`._serve_sync`, which starts faster but serves fewer options.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence

import trio

from ..disk.advertise import advertised
from ..disk.blk import serve_blk
from ..disk.nbd import NBDServer, activation_listeners, open_listeners
from ..errors import MeshlinkError
from ._common import CommandFailed
from ._serve_sync import nbd_uris

__all__ = ["serve_trio"]


async def serve_trio(server: NBDServer, args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the ``ready`` lines and pidfile once listening.

    Returns:
        0 (a clean stop).

    Raises:
        CommandFailed: the blk ring, the listeners or zeroconf failed.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        if args.blk_disks is not None:
            try:
                store = await nursery.start(
                    lambda task_status: serve_blk(args.service, args.blk_disks,
                                                  host_store=args.host_store,
                                                  task_status=task_status))
            except (OSError, MeshlinkError) as exc:
                raise CommandFailed(
                    f"cannot serve {args.service!r} over the blk ring: {exc}") from exc
            for disk_name in args.blk_disks:
                print(f"ready blk://{args.service}/{disk_name} (host store {store.path})",
                      flush=True)
            if not args.nbd:
                args.daemon.ready()
                return 0
        if args.stdio:
            args.daemon.ready()
            await server.serve_stdio()
            nursery.cancel_scope.cancel()
            return 0
        listeners = activation_listeners()
        activated = bool(listeners)
        if not activated:
            try:
                listeners = await open_listeners(args.listen or "127.0.0.1:10809")
            except (OSError, MeshlinkError) as exc:
                raise CommandFailed(f"cannot listen on {args.listen}: {exc}") from exc
        await nursery.start(server.serve_listeners, listeners)
        advert = ""
        if args.zc is not None:
            try:
                advert = await nursery.start(_advertise, listeners, args)
            except (OSError, MeshlinkError) as exc:
                raise CommandFailed(f"cannot advertise on zeroconf: {exc}") from exc
        lines = [f"ready {uri}" for export in args.exports
                 for uri in nbd_uris([li.socket for li in listeners], export)]
        if advert:
            lines.append(advert)
        for line in lines:
            if activated:  # our parent speaks NBD to us; keep stdout quiet
                logging.getLogger("meshlink.disk.nbd").info("%s", line)
            else:
                print(line, flush=True)
        args.daemon.ready()
    return 0


async def _advertise(listeners: Sequence[trio.SocketListener], args: argparse.Namespace, *,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Keep ``SERVICE.nbd`` on zeroconf until cancelled; report what was announced."""
    async with advertised(args.service, listeners, tls=args.tls, config=args.zc,
                          host_store=args.host_store, fingerprint=args.fingerprint) as reg:
        ad = reg.advertisement
        task_status.started(f"advertised {ad.name} on zeroconf: "
                            f"{' '.join(ep.url for ep in ad.endpoints())}")
        await trio.sleep_forever()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return
