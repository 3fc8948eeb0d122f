"""The blk ring's backend: serving disks to frontends on this host.

:func:`serve_blk` publishes ``<service>.blk`` and serves each frontend on its
own task.  The client's uid is checked before anything is read from it; at
most ``MAX_PENDING`` handshakes run at once, each within the handshake
timeout, and a malformed hello closes that connection only.  The handshake
then checks the hello, maps
the frontend's pages through the local grant provider (which checks the
memfd's seals and size, see :mod:`.ring`) and answers with the disk's size
and features.

Requests are served in ring order.  Each is copied out of the ring once and
validated in C (``native/blkring.c``) before Python sees it; only then are
its pages read or written.  A backend that declares it stores nothing, or
that hands out its whole disk as one buffer (:mod:`..backends`'s declared
capabilities), is served entirely by the native loop; others by a Python
loop that calls the backend.  FLUSH_DISKCACHE flushes the backend;
WRITE_BARRIER is served after everything before it (the loop is sequential),
flushed before and after.  A frontend's liveness is its rendezvous socket.

The per-client parts (admission, the hello check, the service loops) are in
:mod:`.back_conn`, shared with the trio-free server
(:mod:`meshlink.disk.syncserve`); this module is their trio driver.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Collection, Mapping

import outcome
import trio

from resolver import HostStore, blk_entry_name

from ...errors import HandshakeError, RingCorruptError, resolver_errors
from ...transport.rendezvous import receive_hello, refuse_now
from ..backends import Backend
from ..counters import DiskStats
from .back_conn import ACCEPT_RETRY, Conn, admit, check_hello
from .handshake import HANDSHAKE_TIMEOUT

__all__ = ["serve_blk"]

log = logging.getLogger("meshlink.disk.blk")


async def _handshake(conn: socket.socket, disks: Mapping[str, Backend],
                     stats: DiskStats) -> Conn:
    """Read and check a frontend's hello (its uid is already checked); map its ring."""
    try:
        hello, fds = await receive_hello(conn, "blk", 3)
    except HandshakeError as exc:
        refuse_now(conn, str(exc), "refused")
        raise
    return check_hello(conn, hello, fds, disks, stats)


async def serve_blk(service: str, disks: Mapping[str, Backend], *,
                    host_store: HostStore | str | os.PathLike[str] | None = None,
                    allow_uids: Collection[int] | None = None,
                    stats: DiskStats | None = None,
                    task_status: trio.TaskStatus[HostStore] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``disks`` (name -> backend) over the blk ring until cancelled.

    Publishes ``<service>.blk`` in the host store; clients open
    ``"<service>/<disk>"`` with :func:`open_blk`.  A client that breaks the
    protocol (hostile ring indices, bad handshake) is dropped and logged;
    the others are unaffected.

    Args:
        service: the service name.
        disks: backends by disk name.
        host_store: the host store (default: see :mod:`resolver.hoststore`).
        allow_uids: uids allowed to connect (default: our own).
        stats: counts each disk's requests under ``"blk"`` (see
            :mod:`meshlink.disk.counters`; default: counted, not reported).
        task_status: ``nursery.start`` reports the host store once listening.

    Raises:
        AddressInUse: a live server already serves ``service`` here.

    Cancellation: withdraws the service and closes every client's ring.
    """
    uids = frozenset(allow_uids) if allow_uids is not None else frozenset({os.getuid()})
    stats = stats if stats is not None else DiskStats()
    with resolver_errors():
        store = HostStore.of(host_store)
        pub = store.claim(blk_entry_name(service))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pending = [0]  # handshakes under way (a list: the tasks update it)
    try:
        await sock.bind(pub.bind_path)
        pub.bound()
        sock.listen(128)
        task_status.started(store)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    tconn, _ = await sock.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_RETRY:
                        raise
                    log.warning("blk accept failed, retrying: %s", exc)
                    await trio.sleep(0.1)  # out of descriptors: back off, keep serving
                    continue
                conn = socket.socket(fileno=tconn.detach())
                conn.setblocking(False)
                if admit(conn, uids, pending[0]):
                    pending[0] += 1
                    nursery.start_soon(_serve_client, conn, disks, pending, stats)
    finally:
        sock.close()
        pub.withdraw()


async def _serve_client(conn: socket.socket, disks: Mapping[str, Backend],
                        pending: list[int], stats: DiskStats) -> None:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            c = await _handshake(conn, disks, stats)
    except (HandshakeError, OSError, trio.TooSlowError) as exc:
        log.info("blk client refused: %s", exc)
        conn.close()
        return
    finally:
        pending[0] -= 1
    try:
        if c.native and c.live is not None and _NATIVE_THREADS.available_tokens >= 1:
            await _run_native(c)
        else:
            await c.run()
    except RingCorruptError as exc:
        log.warning("blk client dropped: %s", exc)
    finally:
        c.close()


#: Rings served by the native loop in threads of their own at once; more are
#: served by the Python loop (same answers, slower wake-ups), so that a crowd
#: of clients costs at most this many threads.
_NATIVE_THREADS = trio.CapacityLimiter(64)


async def _run_native(c: Conn) -> None:
    """The native loop in a thread of its own (``ml_blk_back_run``, see
    :meth:`Conn.run_native_blocking`) until the frontend dies or we are cancelled.

    Raises:
        RingCorruptError: the frontend published impossible indices.

    Cancellation: sets the loop's stop flag and wakes it; returns (then
    raises Cancelled) once the thread has left the ring, so the ring is
    never freed under it.
    """
    stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    result: list[outcome.Outcome[None]] = []

    async def serve() -> None:
        # Not abandoned on cancel: the thread uses the ring's memory.
        result.append(await outcome.acapture(functools.partial(
            trio.to_thread.run_sync, c.run_native_blocking, stop_fd,
            limiter=_NATIVE_THREADS)))

    try:
        async with trio.open_nursery() as nursery:

            async def stop_on_cancel() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    c.ring.stop_native(stop_fd)

            nursery.start_soon(stop_on_cancel)
            await serve()
            nursery.cancel_scope.cancel()
    finally:
        os.close(stop_fd)
    # Raised here, outside the nursery, so callers see RingCorruptError
    # itself rather than an exception group.
    result[0].unwrap()
