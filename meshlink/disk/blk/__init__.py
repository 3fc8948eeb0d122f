"""Disks shared over the Xen block ring (blkif) between co-located processes.

Theory of operation
-------------------
As in Xen, the *frontend* (the disk's user, :class:`BlkDisk`) owns the memory:
it shares the ring (2^order pages, grant refs 0..) followed by a pool of data
pages (each ring slot owns its pages, so every request in flight has its own
and no allocator is needed) and two eventfds.  The pages come from the local
grant provider (``native/grant.h``): a memfd sealed against resizing.  The
frontend connects to the server's rendezvous socket ``<service>.blk`` in the
host store, names the disk it wants, and passes the fds by ``SCM_RIGHTS``.
The *backend* (:func:`serve_blk`) checks the client's uid, has the provider
check the memfd (size, seals) and map it, and answers with the disk's size
and features.  The liveness of each side is the rendezvous socket, as for
vchan.

The package is split by role:

* :mod:`.front`: :class:`BlkDisk` and :func:`open_blk`, the frontend;
* :mod:`.back`: :func:`serve_blk`, the backend on trio;
* :mod:`.back_conn`: one client as the backend sees it (admission, the
  hello, the service loops), shared with :mod:`meshlink.disk.syncserve`;
* :mod:`.ring`: the typed wrapper over the native ring and its shared pages;
* :mod:`.handshake`: what both ends agree on outside the ring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resolver.lazy import lazy_names

if TYPE_CHECKING:
    from .back import serve_blk
    from .front import BlkDisk, open_blk

__all__ = ["BlkDisk", "open_blk", "serve_blk"]

#: Names imported on first access (PEP 562): both ends run on trio, and the
#: trio-free server (``meshlink.disk.syncserve``) imports only ``.back_conn``.
_LAZY: dict[str, str] = {"BlkDisk": ".front", "open_blk": ".front", "serve_blk": ".back"}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(), __all__)
