"""The blk ring without trio: the backend's accept, hello and native loop on threads.

The synchronous twin of :func:`~.back.serve_blk`, used by ``meshlink disk
serve``'s fast path (:mod:`meshlink.disk.syncserve` explains why), for disks
the native ring loop serves (:func:`~.back_conn.blk_native`: the Python loop
runs on trio only).  Admission, the hello check and the ring loop are
:mod:`.back_conn`'s, as on trio; only the waiting is here: the hello within
the blk handshake timeout, then :meth:`~.back_conn.Conn.run_native_blocking`
on a thread per frontend.  The same checks and log lines: the client's uid
before a byte is read, at most ``MAX_PENDING`` handshakes at once, a
malformed hello or a broken ring drops that client only.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Collection, Mapping

from resolver import HostStore, blk_entry_name

from ...errors import HandshakeError, RemoteProtocolError, resolver_errors
from ...transport.rendezvous import receive_hello_blocking, refuse_now
from ..backends._base import Backend
from ..syncserve import SyncServer
from .back_conn import admit, blk_native, check_hello
from .handshake import HANDSHAKE_TIMEOUT

__all__ = ["serve_blk_sync"]

log = logging.getLogger("meshlink.disk.blk")


def serve_blk_sync(server: SyncServer, service: str, disks: Mapping[str, Backend], *,
                   host_store: HostStore | str | os.PathLike[str] | None = None,
                   allow_uids: Collection[int] | None = None) -> HostStore:
    """Publish ``<service>.blk`` and serve ``disks`` on ``server``'s threads (as
    :func:`~.back.serve_blk`); the service is withdrawn when ``server`` stops.

    Every backend must be one the native ring loop serves (:func:`blk_native`).

    Returns:
        The host store the service is published in.

    Raises:
        ValueError: a backend the native loop cannot serve.
        AddressInUse: a live server already serves ``service`` here.
        OSError: binding the socket failed.
    """
    slow = [name for name, backend in disks.items() if not blk_native(backend)]
    if slow:
        raise ValueError(f"the native blk loop cannot serve {', '.join(slow)}")
    uids = frozenset(allow_uids) if allow_uids is not None else frozenset({os.getuid()})
    with resolver_errors():
        store = HostStore.of(host_store)
        pub = store.claim(blk_entry_name(service))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(pub.bind_path)
        pub.bound()
        sock.listen(128)
    except BaseException:
        sock.close()
        pub.withdraw()
        raise
    server.on_stop(pub.withdraw)
    pending = [0]  # handshakes under way, guarded by server.lock

    def admit_blk(conn: socket.socket) -> None:
        conn.setblocking(False)
        with server.lock:
            if not admit(conn, uids, pending[0]):  # refused, told and closed
                return
            pending[0] += 1
        server.start_thread(conn, lambda: _serve(server, conn, disks, pending))

    server.add_listener(sock, admit_blk)
    return store


def _serve(server: SyncServer, conn: socket.socket, disks: Mapping[str, Backend],
           pending: list[int]) -> None:
    """One frontend: the hello within the timeout, then the native loop until it leaves."""
    try:
        try:
            got = receive_hello_blocking(conn, "blk", 3, HANDSHAKE_TIMEOUT,
                                         server.stop_fd)
        except HandshakeError as exc:
            refuse_now(conn, str(exc), "refused")
            raise
        if got is None:
            return
        c = check_hello(conn, *got, disks, server.stats)  # refuses by itself
    except (HandshakeError, OSError) as exc:  # TimeoutError included
        log.info("blk client refused: %s", exc)
        return
    finally:
        with server.lock:
            pending[0] -= 1
    try:
        c.run_native_blocking(server.stop_fd)
    except RemoteProtocolError as exc:  # RingCorruptError: the frontend broke the ring
        log.warning("blk client dropped: %s", exc)
    finally:
        c.close()
