"""meshlink.disk: block storage backends and their network face (NBD).

Backends (``null``, ``memory``, ``file``, ``mmap``, ``cow``) implement one
small :class:`Backend` Protocol; front ends advertise only what a backend
declares.  :func:`serve` exports backends over NBD; :func:`open` opens a
remote disk.  Both are thin on purpose: the blk-ring (Xen blkif) front end
will plug in beside NBD, chosen by the address given.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping

import trio

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
from .nbd import Export, NBDDisk, NBDServer, TLSMode, list_exports, open_nbd


@contextlib.asynccontextmanager
async def open(url: str, *, ssl_context: ssl.SSLContext | None = None,
               max_in_flight: int = 64) -> AsyncIterator[NBDDisk]:
    """Open a remote disk by URL (today: NBD URIs; later also blk-ring addresses).

    Args:
        url: ``nbd://``, ``nbds://``, ``nbd+unix://`` or ``nbds+unix://`` URI.
        ssl_context: client TLS context for the ``nbds`` forms.
        max_in_flight: requests pipelined at once.

    Yields:
        The open disk (``read``/``write``/``flush``/``discard``, ``size``, ``read_only``).

    Raises:
        ValueError: an address this version cannot open.
        ConnectionLost / HandshakeError: see :func:`meshlink.disk.nbd.open_nbd`.
    """
    async with open_nbd(url, ssl_context=ssl_context, max_in_flight=max_in_flight) as disk:
        yield disk


async def serve(exports: Mapping[str, Backend], listen: str, *,
                tls: TLSMode | str = TLSMode.OFF, ssl_context: ssl.SSLContext | None = None,
                task_status: trio.TaskStatus[NBDServer] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``exports`` (name -> backend) over NBD on ``listen`` until cancelled.

    Args:
        exports: backends by export name; the first is also the default export.
        listen: ``host:port``, ``tcp:host:port`` or ``unix:/path``.
        tls: ``off``, ``optional`` or ``required``.
        ssl_context: server TLS context (needed unless tls is off).
        task_status: ``nursery.start`` receives the running :class:`NBDServer`.

    Raises:
        AddressInUse: the address is taken.

    Cancellation: stops listening and closes every connection.
    """
    from .nbd import open_listeners

    server = NBDServer([Export(name, backend) for name, backend in exports.items()],
                       tls=tls, ssl_context=ssl_context)
    listeners = await open_listeners(listen)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_listeners, listeners)
        task_status.started(server)


__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "Capabilities",
    "CowBackend",
    "Export",
    "FileBackend",
    "MemoryBackend",
    "MmapBackend",
    "NBDDisk",
    "NBDServer",
    "NullBackend",
    "TLSMode",
    "list_exports",
    "open",
    "open_backend",
    "open_nbd",
    "serve",
]
