"""vchan between processes of one host: the host-store listener and dialer.

A server claims its service name in the host store and listens on a Unix
socket there (:mod:`meshlink.transport.rendezvous` has the wire); a client
connects, asks for ring sizes, and receives the sealed memfd and the two
eventfds by ``SCM_RIGHTS``.  The server checks the client's uid
(``SO_PEERCRED``) against its allow list before it answers; the client
validates and maps the pages itself.  Both ends then hold a
:class:`~meshlink.transport.vchan.stream.VchanStream` over the local provider.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Collection
from pathlib import Path

import trio

from resolver import HostStore, Publication

from ...errors import (
    AuthError,
    HandshakeError,
    LocalProtocolError,
    ServiceNotFound,
    resolver_errors,
)
from ..rendezvous import (
    check_reply,
    encode,
    peer_credentials,
    recv_message,
    recv_message_with_fds,
    send_refusal,
)
from .ring import VchanRing, choose_orders
from .stream import DEFAULT_RING_SIZE, MAX_RING_SIZE, VchanStream

__all__ = ["VchanListener", "connect_vchan", "open_vchan_listener"]

PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT = 5.0


def _int_field(msg: dict[str, object], key: str, lo: int, hi: int) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise HandshakeError(f"vchan handshake: {key} must be an integer in [{lo}, {hi}]")
    return v


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class VchanListener(trio.abc.Listener[VchanStream]):
    """Accepts vchan connections for one service of a host store.

    Made by :func:`open_vchan_listener`.

    Attributes:
        service: the service name.
        store: the :class:`~resolver.HostStore` it is published in.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        publication: Publication,
        store: HostStore,
        allow_uids: frozenset[int],
        read_min: int,
        write_min: int,
    ) -> None:
        self._sock = sock
        self._publication = publication
        self.store = store
        self.service = publication.service
        self._allow_uids = allow_uids
        self._read_min = read_min
        self._write_min = write_min
        self._closed = False

    async def accept(self) -> VchanStream:
        """Wait for a client and complete its handshake.

        Clients that fail the handshake (not allowed, malformed hello, too
        slow) are answered with an error and dropped; ``accept`` keeps
        waiting for the next one.

        Raises:
            trio.ClosedResourceError: the listener was closed.
        """
        while True:
            if self._closed:
                raise trio.ClosedResourceError("listener closed")
            try:
                conn, _ = await self._sock.accept()
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("listener closed") from exc
                raise
            stream: VchanStream | None = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                try:
                    stream = await self._handshake(conn)
                except (HandshakeError, OSError):
                    pass
            if stream is not None:
                return stream
            conn.close()

    async def _refuse(self, conn: trio.socket.SocketType, why: str, code: str) -> None:
        await send_refusal(conn, why, code)
        raise HandshakeError(why)

    async def _handshake(self, conn: trio.socket.SocketType) -> VchanStream:
        creds = peer_credentials(conn)
        if creds.uid not in self._allow_uids:
            await self._refuse(
                conn, f"uid {creds.uid} is not allowed to connect to {self.service!r}", "auth"
            )
        hello = await recv_message(conn, "vchan")
        if hello.get("meshlink") != "vchan" or hello.get("version") != PROTOCOL_VERSION:
            await self._refuse(conn, f"unsupported vchan hello (want version {PROTOCOL_VERSION})",
                               "version")
        cli_read = _int_field(hello, "read_min", 0, MAX_RING_SIZE)
        cli_write = _int_field(hello, "write_min", 0, MAX_RING_SIZE)
        # Left ring: client -> server; right ring: server -> client.
        left, right = choose_orders(max(self._read_min, cli_write), max(self._write_min, cli_read))
        own = _new_eventfd()
        peer = _new_eventfd()
        try:
            ring = VchanRing.server(left, right, own, peer)
        except BaseException:
            os.close(own)
            os.close(peer)
            raise
        try:
            reply = encode(
                {"ok": True, "version": PROTOCOL_VERSION, "ctrl_ref": 0,
                 "left_order": left, "right_order": right}
            )
            fds = array.array("i", [ring.memfd, peer, own])
            await conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except BaseException:
            ring.free()
            os.close(own)
            os.close(peer)
            raise
        raw = socket.socket(fileno=conn.detach())
        return VchanStream(ring, own, peer, raw, creds)

    async def aclose(self) -> None:
        """Stop listening and withdraw the service from the host store."""
        if not self._closed:
            self._closed = True
            self._sock.close()
            self._publication.withdraw()
        await trio.lowlevel.checkpoint()


async def open_vchan_listener(
    service: str,
    *,
    host_store: HostStore | str | os.PathLike[str] | None = None,
    allow_uids: Collection[int] | None = None,
    read_min: int = DEFAULT_RING_SIZE,
    write_min: int = DEFAULT_RING_SIZE,
    backlog: int = 128,
) -> VchanListener:
    """Publish ``service`` in the host store and listen for vchan clients.

    Args:
        service: the service name (see :func:`~resolver.validate_service_name`).
        host_store: a :class:`~resolver.HostStore` or its directory (default: see
            :mod:`resolver.hoststore.store`).
        allow_uids: user ids allowed to connect (default: only our own uid).
        read_min: minimum size of the ring this server reads (<= 1 MiB).
        write_min: minimum size of the ring this server writes (<= 1 MiB).
        backlog: listen backlog of the rendezvous socket.

    Returns:
        A :class:`VchanListener`; close it to withdraw the service.

    Raises:
        AddressInUse: a live server already publishes ``service``.
        LocalProtocolError: bad name (:class:`~meshlink.InvalidName`) or ring size.
        StoreError: the host store cannot be used.
    """
    for what, size in (("read_min", read_min), ("write_min", write_min)):
        if not 0 <= size <= MAX_RING_SIZE:
            raise LocalProtocolError(f"{what} must be in [0, {MAX_RING_SIZE}], got {size}")
    with resolver_errors():
        store = host_store if isinstance(host_store, HostStore) else HostStore(host_store)
        pub = store.claim(service)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(pub.socket_path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        pub.withdraw()
        raise
    uids = frozenset(allow_uids) if allow_uids is not None else frozenset({os.getuid()})
    return VchanListener(sock, pub, store, uids, read_min, write_min)


async def connect_vchan(
    service: str,
    *,
    host_store: HostStore | str | os.PathLike[str] | None = None,
    read_min: int = DEFAULT_RING_SIZE,
    write_min: int = DEFAULT_RING_SIZE,
    expect_uid: int | None = None,
) -> VchanStream:
    """Connect to ``service`` over vchan through the host store.

    Args:
        service: the service name.
        host_store: a :class:`HostStore` or its directory.
        read_min: minimum size of the ring we read (the server may choose more).
        write_min: minimum size of the ring we write.
        expect_uid: the uid the server must run as (``SO_PEERCRED`` of the
            rendezvous socket), checked before anything is sent; ``None``
            checks nothing.

    Returns:
        A connected :class:`VchanStream`.

    Raises:
        ServiceNotFound: no live server publishes ``service`` (a socket left
            by a crashed server counts as none).
        AuthError: the server refused us (for example, our uid is not allowed),
            the socket's permissions keep us out, or the server does not run
            as ``expect_uid``.
        HandshakeError: the handshake failed.
        RingCorruptError: the server's shared pages are not acceptable.

    Cancellation: safe; nothing is left behind.
    """
    with resolver_errors():
        store = host_store if isinstance(host_store, HostStore) else HostStore(host_store)
        path: Path = store.socket_path(service)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            await sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ServiceNotFound(
                errno.ENOENT, f"no live vchan service {service!r} in {store.path}"
            ) from exc
        except PermissionError as exc:
            raise AuthError(f"not allowed to reach vchan service {service!r}: {exc}") from exc
        if expect_uid is not None:
            server = peer_credentials(sock)
            if server.uid != expect_uid:
                raise AuthError(
                    f"vchan server of {service!r} runs as uid {server.uid}, but its host "
                    f"store record belongs to uid {expect_uid}: refusing to talk to it")
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            try:
                await sock.send(encode({"meshlink": "vchan", "version": PROTOCOL_VERSION,
                                        "read_min": read_min, "write_min": write_min}))
            except (BrokenPipeError, ConnectionResetError):
                pass  # a server refusing our uid may answer and hang up first: read why
            reply, fds = await recv_message_with_fds(sock, 3, "vchan")
        try:
            check_reply(reply, f"vchan server {service!r} refused the connection")
            if len(fds) != 3:
                raise HandshakeError(f"vchan handshake carried {len(fds)} fds, expected 3")
            ctrl_ref = _int_field(reply, "ctrl_ref", 0, 2**32 - 1)
            memfd, own, peer = fds
            ring = VchanRing.client(memfd, ctrl_ref, own, peer)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(memfd)  # the mapping keeps the pages alive
        creds = peer_credentials(sock)
        raw = socket.socket(fileno=sock.detach())
        return VchanStream(ring, own, peer, raw, creds)
    finally:
        sock.close()
