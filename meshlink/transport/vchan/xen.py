"""vchan over Xen: the same trio stream, with grants, event channels and XenStore.

Theory of operation
-------------------
The rings are the ones :mod:`meshlink.transport.vchan.stream` uses (``native/vchan_ring.c``);
only the provider underneath changes (``native/xen_vchan.c``): pages are
shared with ``xengntshr`` and mapped with ``xengnttab``, the wakeup is an
event channel, and the rendezvous is XenStore, all exactly as Xen's
libxenvchan does it, so either end may be libxenvchan (or anything
compatible with it, such as MirageOS's vchan):

* the server binds an unbound event channel for the client's domain,
  shares the control page (with unmap-notify on ``srv_live``) and the ring
  pages, and writes ``ring-ref`` and ``event-channel`` under
  ``/local/domain/<server>/data/vchan/<client>/<port>/``, readable by the
  client's domain only;
* the client reads them, binds to the port, maps the pages (unmap-notify on
  ``cli_live``), sets ``cli_live = 1`` and signals.

The Xen libraries are loaded at run time; :func:`select_provider` picks the
Xen provider when ``/dev/xen`` exists, or when forced (argument, or the
``MESHLINK_PROVIDER`` environment variable: ``xen``, ``local`` or ``auto``).
Forcing it where it cannot run raises :class:`~meshlink.ProviderUnavailable`
naming what is missing.

*Liveness: crash told from close.*  There is no socket to watch.  A peer
that closes clears its live byte and signals: the reader gets everything
written before, then end of stream.  A peer *domain* that dies clears
nothing (its kernel is gone), so each stream also watches ``@releaseDomain``
on a XenStore connection of its own (:class:`~meshlink.transport.xenstore.DomainWatch`),
whose fd wakes the same wait as the event channel: when a domain died and
the peer's home ``/local/domain/<peer>`` is gone, the stream is broken --
the data already in the ring is still read, then
:class:`~meshlink.ConnectionLost`, and writes fail at once.  A peer
*process* that dies in a domain that lives on has its live byte cleared by
its kernel (unmap-notify), which Xen makes indistinguishable from a close,
exactly as for libxenvchan.  A writer facing a full ring whose peer's live
byte is 0 cannot tell a half-closed peer that still reads from a gone one;
it keeps waiting while the peer makes progress and raises
:class:`~meshlink.ConnectionLost` after :data:`CLOSED_PEER_GRACE` seconds
without any.

*Setup* calls block on XenStore round trips, so they run in a worker thread;
moving bytes never blocks (``native/``), and waiting is trio waiting for the
event channel's fd, then taking and unmasking the pending ports.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from typing import Any

import trio

from ..._native import ffi, lib
from ...errors import (
    AuthError,
    ConnectionLost,
    HandshakeError,
    LocalProtocolError,
    ProviderUnavailable,
    RemoteProtocolError,
    RingCorruptError,
    ServiceNotFound,
)
from ..provider import PROVIDER_ENV, require_xen, select_provider, xen_error
from ..xenstore import DomainWatch
from .ring import VchanRing
from .stream import DEFAULT_RING_SIZE, MAX_RING_SIZE, VchanStream

__all__ = [
    "CLOSED_PEER_GRACE",
    "PROVIDER_ENV",
    "XenVchanListener",
    "XenVchanServer",
    "XenVchanStream",
    "connect_xen_vchan",
    "open_xen_vchan_listener",
    "open_xen_vchan_server",
    "own_domid",
    "require_xen",
    "resolve_xs_path",
    "select_provider",
    "vchan_xs_path",
]

#: Seconds a writer waits on a full ring whose peer closed (or died) before
#: giving up with ConnectionLost, if the peer consumes nothing meanwhile.
CLOSED_PEER_GRACE = 5.0


def own_domid() -> int:
    """Our domain id, from the relative XenStore node ``domid``.

    Raises:
        ProviderUnavailable: XenStore cannot be reached.
    """
    out = ffi.new("uint32_t *")
    if lib.ml_xen_own_domid(out) < 0:
        raise ProviderUnavailable(f"cannot learn our domain id: {xen_error()}")
    return int(out[0])


def vchan_xs_path(server_domid: int, client_domid: int, port: str) -> str:
    """libxenvchan's conventional XenStore path for a channel."""
    return f"/local/domain/{server_domid}/data/vchan/{client_domid}/{port}"


#: Characters XenStore allows in a path (xenstored's rule), besides "/".
_XS_CHARS = re.compile(r"[A-Za-z0-9_@-]+")


def resolve_xs_path(path: str, *, own: int, server_domid: int, client_domid: int) -> str:
    """The absolute XenStore path a channel ``path`` names, as libxenvchan reads it.

    * ``/local/domain/0/data/vchan/5/x``: absolute, used as is;
    * ``data/vchan/5/x`` (relative, several components): relative to our
      own home ``/local/domain/<own>``, which is how XenStore (and so
      libxenvchan, which passes the path straight to ``xs_write`` /
      ``xs_read``) reads a relative path, on either end;
    * ``x`` (one word): a port name under libxenvchan's conventional
      ``/local/domain/<server>/data/vchan/<client>/x``.

    Args:
        path: as given by the user.
        own: our domain id.
        server_domid: the server's domain id.
        client_domid: the client's domain id.

    Returns:
        The absolute path.

    Raises:
        LocalProtocolError: ``path`` is not a valid XenStore path (empty
            components, characters XenStore refuses, longer than 400 bytes).
    """
    absolute = path.startswith("/")
    parts = path[1:].split("/") if absolute else path.split("/")
    if not path or len(path) > 400 or not all(_XS_CHARS.fullmatch(p) for p in parts):
        raise LocalProtocolError(f"invalid XenStore path {path!r}")
    if absolute:
        return path
    if len(parts) == 1:
        return vchan_xs_path(server_domid, client_domid, path)
    return f"/local/domain/{own}/{path}"


def _check_domid(domid: int) -> int:
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 <= domid < 0x7FF0:
        raise LocalProtocolError(f"invalid domain id {domid!r}")
    return domid


def _in_thread(fn: Any) -> tuple[int, int, str]:
    """Run a native setup call; its errno and message are per thread."""
    rc = int(fn())
    return rc, ffi.errno, (xen_error() if rc < 0 else "")


def _raise_setup_error(rc: int, err: int, detail: str, what: str) -> None:
    msg = f"{what}: {detail}"
    if rc == lib.ML_ECORRUPT:
        raise RingCorruptError(msg)
    if rc == lib.ML_EINVAL:
        raise LocalProtocolError(msg)
    if rc == lib.ML_ENOMEM:
        raise MemoryError(msg)
    if err == errno.ENOENT:
        raise ServiceNotFound(errno.ENOENT, msg)
    if err in (errno.EACCES, errno.EPERM):
        raise AuthError(msg)
    raise HandshakeError(msg)


def _watch_domain(domid: int) -> DomainWatch:
    """A :class:`DomainWatch` on the peer's domain (in a thread: XenStore round trips).

    Raises:
        HandshakeError: the watch could not be set.
    """
    try:
        return DomainWatch(domid)
    except OSError as exc:
        raise HandshakeError(f"cannot watch domain {domid}: {exc}") from exc


class XenVchanStream(VchanStream):
    """A :class:`~meshlink.transport.vchan.stream.VchanStream` over the Xen provider.

    Same behaviour as the local one (half-close, checkpoints, backpressure),
    plus libxenvchan's packet mode (:meth:`send_packet`,
    :meth:`receive_packet`).

    Attributes:
        peer_domid: the peer's domain id.
        xs_path: the channel's XenStore path.
        closed_peer_grace: see :data:`CLOSED_PEER_GRACE`.
    """

    def __init__(self, ring: VchanRing, ptr: Any, peer_domid: int, xs_path: str,
                 watch: DomainWatch | None = None) -> None:
        self._ptr = ptr
        fd = int(lib.ml_xen_event_fd(ptr))
        super().__init__(ring, fd, -1, None, None, on_event=self._ack, owns_fds=False)
        self.peer_domid = peer_domid
        self.xs_path = xs_path
        self.closed_peer_grace = CLOSED_PEER_GRACE
        self._watch = watch
        if watch is not None:
            self._bell.also_wake_on(watch.fileno)

    def _ack(self) -> None:
        if lib.ml_xen_event_ack(self._ptr) < 0:
            raise ConnectionLost(f"vchan event channel failed: {xen_error()}")
        if self._watch is not None and self._watch.poll():
            # The peer's domain is gone: the stream reads what is left in
            # the ring, then raises ConnectionLost (stream.py's peer_dead).
            self._bell.peer_dead = True

    async def aclose(self) -> None:
        """Close both directions (see :meth:`VchanStream.aclose`) and drop the domain watch."""
        await super().aclose()
        if self._watch is not None:
            self._watch.close()

    async def _wait_space(self) -> None:
        if self._ring.peer_live() != 0:
            await super()._wait_space()
            return
        # The peer closed its end or died; only progress tells them apart.
        with trio.move_on_after(self.closed_peer_grace):
            await super()._wait_space()
            return
        if self._ring.buffer_space() == 0:
            raise ConnectionLost(
                f"vchan peer closed (or died) and consumed nothing for "
                f"{self.closed_peer_grace} s while our ring was full"
            )

    async def send_packet(self, data: bytes | bytearray | memoryview) -> None:
        """Packet mode: write all of ``data`` at once (libxenvchan_send).

        Raises:
            LocalProtocolError: ``data`` is larger than the ring.
            trio.BusyResourceError, trio.ClosedResourceError, ConnectionLost:
                as :meth:`send_all`.

        Cancellation: safe; the packet is either sent whole or not at all.

        Backpressure: waits until the ring has room for the whole packet.
        """
        if len(data) > self.write_size:
            raise LocalProtocolError(f"packet of {len(data)} bytes exceeds the {self.write_size}"
                                     "-byte ring")
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                self._check_can_send()
                if self._ring.send(data):
                    return
                if self._ring.arm_write() >= len(data):
                    continue
                if self._ring.peer_live() == 0:
                    await self._wait_space()
                else:
                    await self._sleep()
        finally:
            self._sending = False

    async def receive_packet(self, size: int) -> bytes:
        """Packet mode: read exactly ``size`` bytes at once (libxenvchan_recv).

        Returns:
            ``size`` bytes, or ``b""`` at end of stream with the ring empty.

        Raises:
            LocalProtocolError: ``size`` is larger than the ring.
            RemoteProtocolError: the peer closed in the middle of a packet.

        Cancellation: safe; nothing is consumed unless the whole packet is.
        """
        if not 0 < size <= self.read_size:
            raise LocalProtocolError(f"packet size must be in 1..{self.read_size}")
        buf = bytearray(size)
        self._begin_receive()
        try:
            await trio.lowlevel.checkpoint()
            ring = self._ring
            while True:
                self._check_open()
                if ring.recv_into(buf):
                    return bytes(buf)
                ready = ring.arm_read()
                if ready >= size:
                    continue
                if ring.peer_live() == 0:
                    if ring.data_ready() >= size:
                        continue
                    if ring.data_ready() == 0:
                        return b""
                    raise RemoteProtocolError("vchan peer closed in the middle of a packet")
                if ready == 0:
                    await self._sleep()
                else:
                    # Part of a packet is in: the peer writes in stream mode.
                    # Our arm only covers an empty ring, so poll gently.
                    await trio.sleep(0.0002)
        finally:
            self._receiving = False


class XenVchanServer:
    """A published server end waiting for its client.

    Made by :meth:`publish`; :meth:`wait_connected` returns the stream.
    Closing it before then withdraws the XenStore entry.
    """

    def __init__(self, ring: VchanRing, ptr: Any, peer_domid: int, xs_path: str,
                 watch: DomainWatch | None = None) -> None:
        self._ring: VchanRing | None = ring
        self._ptr = ptr
        self._watch = watch
        self.peer_domid = peer_domid
        self.xs_path = xs_path
        self.read_size = ring.read_size
        self.write_size = ring.write_size

    @classmethod
    async def publish(
        cls,
        domid: int,
        path: str,
        *,
        read_min: int = DEFAULT_RING_SIZE,
        write_min: int = DEFAULT_RING_SIZE,
    ) -> XenVchanServer:
        """Share the rings with domain ``domid`` and publish them at ``path``.

        Args:
            domid: the client's domain id.
            path: an absolute XenStore path, a relative one (under
                ``/local/domain/<own>``, as libxenvchan reads it), or a port
                name (one word: ``/local/domain/<own>/data/vchan/<domid>/<path>``);
                see :func:`resolve_xs_path`.
            read_min: minimum size of the ring we read (<= 1 MiB).
            write_min: minimum size of the ring we write (<= 1 MiB).

        Raises:
            ProviderUnavailable: no Xen here.
            LocalProtocolError: a bad domain id, size or path.
            HandshakeError, AuthError: XenStore refused the entries.
        """
        _check_domid(domid)
        for what, size in (("read_min", read_min), ("write_min", write_min)):
            if not 0 <= size <= MAX_RING_SIZE:
                raise LocalProtocolError(f"{what} must be in [0, {MAX_RING_SIZE}], got {size}")
        require_xen()
        own = 0 if path.startswith("/") else await trio.to_thread.run_sync(own_domid)
        path = resolve_xs_path(path, own=own, server_domid=own, client_domid=domid)
        out = ffi.new("ml_vchan **")

        def setup() -> tuple[int, int, str]:
            return _in_thread(
                lambda: lib.ml_xen_server_new(domid, path.encode(), read_min, write_min, out)
            )

        rc, err, detail = await trio.to_thread.run_sync(setup)
        if rc < 0:
            _raise_setup_error(rc, err, detail, f"cannot publish vchan at {path}")
        ring = VchanRing(out[0])
        try:
            watch = await trio.to_thread.run_sync(_watch_domain, domid)
        except BaseException:
            ring.close()
            ring.free()
            raise
        return cls(ring, out[0], domid, path, watch)

    async def wait_connected(self) -> XenVchanStream:
        """Wait until the client has mapped the rings; return the stream.

        Cancellation: the server end is closed and withdrawn.
        """
        ring = self._ring
        if ring is None:
            raise trio.ClosedResourceError("this vchan server was closed")
        fd = int(lib.ml_xen_event_fd(self._ptr))
        try:
            while True:
                if lib.ml_xen_event_ack(self._ptr) < 0:
                    raise HandshakeError(f"vchan event channel failed: {xen_error()}")
                if ring.peer_live() != 2:
                    break
                await trio.lowlevel.wait_readable(fd)
        except BaseException:
            await self.aclose()
            raise
        self._ring = None
        watch, self._watch = self._watch, None
        return XenVchanStream(ring, self._ptr, self.peer_domid, self.xs_path, watch)

    def connected_now(self) -> bool:
        """Take pending events; True once the client has mapped the rings.

        Raises:
            HandshakeError: the event channel failed.
            trio.ClosedResourceError: this server was closed.
        """
        if self._ring is None:
            raise trio.ClosedResourceError("this vchan server was closed")
        if lib.ml_xen_event_ack(self._ptr) < 0:
            raise HandshakeError(f"vchan event channel failed: {xen_error()}")
        return self._ring.peer_live() != 2

    @property
    def event_fd(self) -> int:
        """The event channel's fd: readable when the client may have connected."""
        return int(lib.ml_xen_event_fd(self._ptr))

    async def aclose(self) -> None:
        """Withdraw the channel if no client connected yet.  Idempotent."""
        if self._ring is not None:
            ring, self._ring = self._ring, None
            ring.close()
            ring.free()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        await trio.lowlevel.checkpoint()


class XenVchanListener(trio.abc.Listener[XenVchanStream]):
    """vchan at one port name for a set of client domains (a trio listener).

    A libxenvchan channel serves one client: this keeps one published
    :class:`XenVchanServer` per client domain, at
    ``/local/domain/<own>/data/vchan/<client>/<port>``; when a client
    connects, the channel's nodes are withdrawn and the domain's next
    channel is published at the same path before the stream is handed out,
    so a domain may hold several connections and reconnect at once.  Made by
    :func:`open_xen_vchan_listener`.
    """

    def __init__(self, port: str, clients: tuple[int, ...], read_min: int,
                 write_min: int) -> None:
        self.port = port
        self.clients = clients
        self._sizes = (read_min, write_min)
        self._pending: dict[int, XenVchanServer] = {}
        self._closed = False

    async def _refill(self) -> None:
        for domid in self.clients:
            if domid not in self._pending:
                self._pending[domid] = await XenVchanServer.publish(
                    domid, self.port, read_min=self._sizes[0], write_min=self._sizes[1])

    async def accept(self) -> XenVchanStream:
        """Wait for the next client domain to connect; return its stream.

        Raises:
            trio.ClosedResourceError: the listener was closed.
            HandshakeError, AuthError: publishing failed.
        """
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this Xen vchan listener was closed")
            await self._refill()
            for domid, server in list(self._pending.items()):
                if server.connected_now():
                    del self._pending[domid]
                    stream = await server.wait_connected()
                    try:
                        await trio.to_thread.run_sync(lib.ml_xen_server_unpublish,
                                                      stream._ptr)
                        await self._refill()
                    except BaseException:
                        await stream.aclose()
                        raise
                    return stream
            async with trio.open_nursery() as nursery:
                for server in self._pending.values():

                    async def wake(fd: int = server.event_fd) -> None:
                        await trio.lowlevel.wait_readable(fd)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(wake)

    async def aclose(self) -> None:
        """Withdraw every channel not yet connected (streams handed out stay open)."""
        self._closed = True
        pending, self._pending = self._pending, {}
        for server in pending.values():
            await server.aclose()
        await trio.lowlevel.checkpoint()


async def open_xen_vchan_listener(
    port: str,
    clients: Iterable[int],
    *,
    read_min: int = DEFAULT_RING_SIZE,
    write_min: int = DEFAULT_RING_SIZE,
) -> XenVchanListener:
    """Serve vchan at port name ``port`` to the domains ``clients``.

    Publishes a channel for each client domain at once (so that a client
    that looked the service up can connect straight away).

    Args:
        port: the port name (one word, see :func:`resolve_xs_path`).
        clients: the client domains.
        read_min, write_min: ring sizes, as for :meth:`XenVchanServer.publish`.

    Raises:
        LocalProtocolError: a bad port name or domain id.
        ProviderUnavailable: no Xen here.
        HandshakeError, AuthError: XenStore refused the entries.
    """
    doms = tuple(sorted({_check_domid(d) for d in clients}))
    if not doms or "/" in port:
        raise LocalProtocolError("a Xen vchan listener needs client domains and a port name")
    listener = XenVchanListener(port, doms, read_min, write_min)
    try:
        await listener._refill()
    except BaseException:
        await listener.aclose()
        raise
    return listener


async def open_xen_vchan_server(
    domid: int,
    path: str,
    *,
    read_min: int = DEFAULT_RING_SIZE,
    write_min: int = DEFAULT_RING_SIZE,
) -> XenVchanStream:
    """Serve one vchan to domain ``domid`` at XenStore ``path``; wait for it.

    Same as ``libxenvchan_server_init(domid, path, read_min, write_min)``
    followed by waiting for the client.  See :meth:`XenVchanServer.publish`
    for the arguments and errors.

    Cancellation: safe; the XenStore entry is withdrawn.
    """
    server = await XenVchanServer.publish(domid, path, read_min=read_min, write_min=write_min)
    return await server.wait_connected()


async def connect_xen_vchan(domid: int, path: str) -> XenVchanStream:
    """Connect to the vchan server of domain ``domid`` at XenStore ``path``.

    Args:
        domid: the server's domain id.
        path: an absolute XenStore path, a relative one (under
            ``/local/domain/<own>``, as libxenvchan reads it), or a port
            name (one word: ``/local/domain/<domid>/data/vchan/<own>/<path>``);
            see :func:`resolve_xs_path`.

    Raises:
        ProviderUnavailable: no Xen here.
        LocalProtocolError: a bad domain id or path.
        ServiceNotFound: nothing published at ``path``.
        AuthError: the entries exist but are not readable by us.
        RingCorruptError: the server's page is not acceptable.
        HandshakeError: anything else went wrong.

    Cancellation: safe (the setup itself runs to completion in a thread and
    is then released).
    """
    _check_domid(domid)
    require_xen()
    own = 0 if path.startswith("/") else await trio.to_thread.run_sync(own_domid)
    path = resolve_xs_path(path, own=own, server_domid=domid, client_domid=own)
    out = ffi.new("ml_vchan **")

    def setup() -> tuple[int, int, str]:
        return _in_thread(lambda: lib.ml_xen_client_new(domid, path.encode(), out))

    rc, err, detail = await trio.to_thread.run_sync(setup)
    if rc < 0:
        _raise_setup_error(rc, err, detail, f"cannot connect to vchan at {path}")
    ring = VchanRing(out[0])
    try:
        watch = await trio.to_thread.run_sync(_watch_domain, domid)
    except BaseException:
        ring.close()
        ring.free()
        raise
    return XenVchanStream(ring, out[0], domid, path, watch)
