"""``meshlink disk serve`` without trio: the fast-starting path, and when it applies.

Importing trio costs more than the whole start-up budget (ready within
100 ms of exec), so the common invocations are served by the trio-free
:class:`~meshlink.disk.syncserve.SyncServer`; everything else by trio
(:mod:`._serve_trio`).  :func:`trio_needed` decides, after the backends are
open (whether the blk ring's native loop can serve a disk is only known
then).  The trio path serves:

* ``--tls optional|required`` (the TLS handshake is trio's ``SSLStream``);
* zeroconf advertising (``--zeroconf`` or ``$MESHLINK_ZEROCONF``);
* ``--stdio`` and systemd socket activation (``LISTEN_FDS``);
* the blk ring for a disk the native ring loop cannot serve (``file`` and
  ``cow``, a read-only or empty ``memory`` or ``mmap`` disk; ``null`` and
  writable ``memory``/``mmap`` disks are served natively);
* ``--xen`` (its own command path);
* anything, when ``MESHLINK_DISK_SERVE_TRIO=1`` is set (to compare, or as a
  way back should the fast path misbehave somewhere).

Both paths print the same ``ready`` lines, write the pidfile at the same
point, stop on SIGINT/SIGTERM (and so with ``--exit-with-parent``), apply
the same limits and exit with the same codes and messages.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from ..disk.backends import Backend
from ..disk.syncserve import SyncServer
from ..errors import MeshlinkError
from ._common import CommandFailed
from ._disk_spec import DiskSpec

__all__ = ["nbd_uris", "serve_sync", "trio_needed"]

#: Set to 1 to serve on trio whatever the options.
FORCE_TRIO_ENV = "MESHLINK_DISK_SERVE_TRIO"


def trio_needed(args: argparse.Namespace, backends: Mapping[str, Backend]) -> str | None:
    """Why this ``serve`` must run on trio, or None when the trio-free path serves it."""
    if os.environ.get(FORCE_TRIO_ENV, "") not in ("", "0"):
        return f"${FORCE_TRIO_ENV} is set"
    if args.tls != "off":
        return "TLS"
    if args.zc is not None:
        return "zeroconf advertising"
    if args.nbd and args.stdio:
        return "--stdio"
    if args.nbd and os.environ.get("LISTEN_FDS") is not None:
        return "socket activation"
    if args.blk_disks is not None:
        from ..disk.blk.back_conn import blk_native  # loaded when asked for

        for name, backend in args.blk_disks.items():
            if not blk_native(backend):
                return (f"the blk ring for disk {name!r}: the native ring loop does not "
                        f"serve this backend")
    return None


def nbd_uris(socks: Sequence[Any], name: str) -> list[str]:
    """The NBD URIs of export ``name`` on listening sockets (stdlib or trio)."""
    out = []
    for sock in socks:
        addr = sock.getsockname()
        if isinstance(addr, str):
            out.append(f"nbd+unix:///{name}?socket={addr}")
        else:
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            out.append(f"nbd://{host}:{addr[1]}/{name}")
    return out


def serve_sync(args: argparse.Namespace, specs: Sequence[DiskSpec],
               backends: Mapping[str, Backend]) -> int:
    """Serve until SIGINT/SIGTERM on the trio-free path (see :func:`trio_needed`).

    Returns:
        0 (a clean stop).

    Raises:
        CommandFailed: binding the listeners failed.
    """
    server = SyncServer()
    previous = {sig: signal.signal(sig, lambda _sig, _frame: server.stop())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        lines = []
        if args.blk_disks is not None:
            from ..disk.blk.back_sync import serve_blk_sync  # loaded when asked for

            try:
                store = serve_blk_sync(server, args.service, args.blk_disks,
                                       host_store=args.host_store)
            except (OSError, MeshlinkError) as exc:
                raise CommandFailed(
                    f"cannot serve {args.service!r} over the blk ring: {exc}") from exc
            lines += [f"ready blk://{args.service}/{disk_name} (host store {store.path})"
                      for disk_name in args.blk_disks]
        if args.nbd:
            lines += _listen_nbd(server, args, specs, backends)
        for line in lines:
            print(line, flush=True)
        args.daemon.ready()
        server.run()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()


def _listen_nbd(server: SyncServer, args: argparse.Namespace, specs: Sequence[DiskSpec],
                backends: Mapping[str, Backend]) -> list[str]:
    """Bind ``--listen`` and serve NBD there; the ``ready`` lines."""
    from ..disk.nbd.exports import Export, ExportTable  # loaded when asked for
    from ..disk.nbd.server_listen import bind_sockets
    from ..disk.nbd.server_sync import SyncNBD

    table = ExportTable({export: Export(export, backends[spec.name], spec.description,
                                        spec.read_only)
                         for export, spec in zip(args.exports, specs, strict=True)})
    try:
        socks: list[socket.socket] = bind_sockets(args.listen or "127.0.0.1:10809")
    except (OSError, MeshlinkError) as exc:
        raise CommandFailed(f"cannot listen on {args.listen}: {exc}") from exc
    nbd = SyncNBD(server, table, handshake_timeout=args.handshake_timeout,
                  max_connections=args.max_connections)
    for sock in socks:
        nbd.listen(sock)
    return [f"ready {uri}" for export in args.exports for uri in nbd_uris(socks, export)]
