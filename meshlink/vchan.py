"""vchan as a trio stream: shared-memory rings between processes on one host.

Theory of operation
-------------------
The bytes move through two rings in shared memory laid out exactly as Xen's
libxenvchan lays them out (``native/``, DESIGN.md section 2).  This module
adds what a trio stream needs on top:

*Rendezvous.*  A server claims its service name in the host store
(:mod:`meshlink.hoststore`) and listens on a Unix socket there.  A client
connects and sends a small JSON hello with the ring sizes it wants; the server
checks the client's credentials (``SO_PEERCRED``) against its allow list --
the local analogue of a grant table naming the one domain that may map a
page -- picks the ring orders, and answers with the orders and, by
``SCM_RIGHTS``, the sealed memfd holding the pages and the two eventfds.  The
client validates and maps the pages itself (a hostile server cannot make it
map more than it checked).

*Liveness.*  The Unix socket stays open for the life of the channel and
carries nothing more: EOF on it means the peer process is gone.  This is how
a peer killed with SIGKILL is noticed (Xen uses unmap-notify for the same).
A peer that closes cleanly clears its live byte first, so "live byte 0" is a
clean EOF and "socket gone, live byte still 1" is a crash
(:class:`~meshlink.ConnectionLost`).

*Waiting.*  C never blocks.  To wait, a task arms the notify bit in the
peer's byte, re-checks the ring, and only then sleeps on the doorbell
(:mod:`meshlink._doorbell`: our eventfd and the liveness socket in one epoll
set, one sleeper, the other waiters parked).  Before arming, it polls
cooperatively (each turn yields to trio), because waking a sleeping process
costs tens of microseconds: a writer for 50 us, a reader for about twice its
recent wait, up to 250 us for message-sized traffic (see
:meth:`VchanStream._read_spin_budget`); this is what makes small round trips
fast.

*Half-close.*  ``send_eof`` clears our live byte; the peer drains what we
wrote and then reads EOF, while the other direction keeps working.  Unlike
libxenvchan, everything written before a close is delivered.
"""

from __future__ import annotations

import array
import errno
import operator
import os
import socket
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import trio

from ._doorbell import Doorbell, spin
from ._errors import (
    ConnectionLost,
    HandshakeError,
    LocalProtocolError,
    ServiceNotFound,
)
from ._rendezvous import (
    PeerCredentials,
    check_reply,
    encode,
    peer_credentials,
    recv_message,
    recv_message_with_fds,
    send_refusal,
)
from ._ring import VchanRing, choose_orders
from .hoststore import HostStore, Publication

_R = TypeVar("_R", bytes, int)

__all__ = [
    "DEFAULT_RING_SIZE",
    "PeerCredentials",
    "VchanListener",
    "VchanStream",
    "connect_vchan",
    "open_vchan_listener",
]

#: Default size of each ring (bytes).  bench/bench_vchan.py with 64 KiB writes:
#: 64 KiB rings run lock-step (~0.7 GB/s), 256 KiB rings reach most of the
#: bulk rate of 1 MiB ones (~8 vs ~8.6 GB/s here) at a quarter of the memory.
DEFAULT_RING_SIZE = 1 << 18
MAX_RING_SIZE = 1 << 20
PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT = 5.0
#: How long a writer polls cooperatively for space before arming and sleeping.
SPIN_SECONDS = 50e-6
#: Bounds of a reader's adaptive spin (see VchanStream._read_spin_budget).
MIN_READ_SPIN = 5e-6
MAX_READ_SPIN = 250e-6
#: Reads at least this large count as bulk traffic for the spin heuristic.
BULK_READ = 16384


def _int_field(msg: dict[str, object], key: str, lo: int, hi: int) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise HandshakeError(f"vchan handshake: {key} must be an integer in [{lo}, {hi}]")
    return v


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class VchanStream(trio.abc.HalfCloseableStream):
    """One end of a vchan connection, as a trio stream.

    Made by :func:`connect_vchan` or :meth:`VchanListener.accept`; do not
    construct directly.

    Attributes:
        peer: credentials of the peer process.
        read_size: size in bytes of the ring we read from.
        write_size: size in bytes of the ring we write to.
    """

    def __init__(
        self,
        ring: VchanRing,
        own_evfd: int,
        peer_evfd: int,
        liveness: socket.socket | None,
        peer: PeerCredentials | None,
        *,
        on_event: Callable[[], None] | None = None,
        owns_fds: bool = True,
    ) -> None:
        # Other providers (meshlink.xenvchan): no liveness socket (the ring's
        # live bytes carry death), an event fd that ``on_event`` acknowledges
        # instead of reading it, and fds owned by the ring (owns_fds=False).
        self._ring = ring
        self._bell = Doorbell(own_evfd, peer_evfd, liveness, on_event=on_event,
                              owns_fds=owns_fds)
        self.peer = peer
        self.read_size = ring.read_size
        self.write_size = ring.write_size
        self._closed = False
        self._eof_sent = False
        self._sending = False
        self._receiving = False
        self._read_wait_avg = SPIN_SECONDS
        self._last_read = 0

    # -- waiting -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this vchan stream was closed")

    async def _sleep(self) -> None:
        """Sleep until the peer signals (or dies).  Callers armed and re-checked."""
        await self._bell.wait()
        self._check_open()

    def _read_spin_budget(self) -> float:
        """How long a reader should poll before sleeping.

        Spinning pays when data usually comes sooner than a wakeup would cost
        (tens of microseconds here), so the budget follows a moving average
        of how long recent reads waited: twice that, within
        [MIN_READ_SPIN, MAX_READ_SPIN]; when the peer usually takes longer
        than MAX_READ_SPIN (an idle or slow peer) spinning is pointless and
        we barely spin at all.  After a large read (bulk transfer) the cap
        is the writer's SPIN_SECONDS: there the peer is busy producing, and
        on a loaded machine a long spin takes the CPU it needs.
        """
        avg = self._read_wait_avg
        cap = MAX_READ_SPIN if self._last_read < BULK_READ else SPIN_SECONDS
        if avg > cap:
            return MIN_READ_SPIN
        return max(MIN_READ_SPIN, min(cap, 2 * avg))

    def _note_read_wait(self, started: float) -> None:
        # Samples are capped so one long idle gap is forgotten within a few
        # quick exchanges.
        sample = min(time.perf_counter() - started, 2 * MAX_READ_SPIN)
        self._read_wait_avg += (sample - self._read_wait_avg) / 4

    async def _spin(self, ready: Callable[[], bool], budget: float = SPIN_SECONDS) -> bool:
        """Poll cooperatively for ``budget`` seconds; True if ``ready()`` came true."""
        return await spin(ready, budget, self._check_open)

    # -- receiving -----------------------------------------------------------

    def _readable_now(self) -> bool:
        return self._ring.data_ready() > 0 or self._ring.peer_live() != 1

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive at least one byte, or ``b""`` at end of stream.

        Args:
            max_bytes: upper bound on the bytes returned (default: one ring).

        Returns:
            The bytes, or ``b""`` once the peer sent EOF and
            everything it wrote has been read.

        Raises:
            trio.BusyResourceError: another task is already receiving.
            trio.ClosedResourceError: this stream was closed.
            ConnectionLost: the peer process died without closing.
            RingCorruptError: the peer corrupted the shared page.

        Cancellation: safe; no data is lost when a waiting receive is cancelled.
        """
        if max_bytes is None:
            max_bytes = self.read_size
        max_bytes = operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        ring = self._ring
        return await self._receive(lambda: ring.read_bytes(max_bytes), b"")

    async def receive_into(self, buf: bytearray | memoryview) -> int:
        """Receive into ``buf``; returns the byte count, 0 at end of stream.

        The zero-copy-friendly form of :meth:`receive_some` (one copy, from
        the ring into ``buf``).  Same errors and cancellation behaviour.
        """
        if len(buf) < 1:
            raise ValueError("buffer must not be empty")
        ring = self._ring
        return await self._receive(lambda: ring.read_into(buf), 0)

    async def _receive(self, read: Callable[[], _R], eof: _R) -> _R:
        """Run ``read`` until it returns something (a non-empty result) or EOF."""
        self._begin_receive()
        try:
            await trio.lowlevel.checkpoint()
            while True:
                self._check_open()
                got = read()
                if got:
                    self._last_read = got if isinstance(got, int) else len(got)
                    return got
                if await self._wait_readable():
                    return eof
        finally:
            self._receiving = False

    def _begin_receive(self) -> None:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True

    async def _wait_readable(self) -> bool:
        """Wait until the ring has data; True means end of stream instead.

        Called with the ring found empty.
        """
        ring = self._ring
        started = time.perf_counter()
        while True:
            if ring.peer_live() == 0:
                # Clean EOF, but only after everything written before it:
                # the live byte was read (acquire) after the ring was seen
                # empty, so one more look sees data published before the close.
                return ring.data_ready() == 0
            if self._bell.peer_dead:
                if ring.data_ready():
                    return False
                raise ConnectionLost("vchan peer process died without closing")
            if await self._spin(self._readable_now, self._read_spin_budget()):
                self._note_read_wait(started)
                return False
            if ring.arm_read() or ring.peer_live() != 1:
                return False
            await self._sleep()
            self._check_open()
            if ring.data_ready():
                self._note_read_wait(started)
                return False

    # -- sending -------------------------------------------------------------

    def _check_can_send(self) -> None:
        self._check_open()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this vchan stream")
        if self._bell.peer_dead:
            raise ConnectionLost("vchan peer process is gone")

    def _writable_now(self) -> bool:
        return self._ring.buffer_space() > 0 or self._bell.peer_dead

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` into the ring, waiting for space as needed.

        Raises:
            trio.BusyResourceError: another task is already sending.
            trio.ClosedResourceError: this stream was closed, or send_eof() called.
            ConnectionLost: the peer process is gone.
            RingCorruptError: the peer corrupted the shared page.

        Cancellation: if cancelled, some prefix of ``data`` may have been sent
        and the stream is still usable, as with any trio stream.

        Backpressure: waits while the ring (``write_size`` bytes) is full.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            # As trio's own sockets do: honour a pending cancel first, write,
            # and yield afterwards only if we never had to wait; yielding
            # before the write would hold the bytes back a scheduler pass.
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            ring = self._ring
            with memoryview(data) as mv, mv.cast("B") as view:
                while True:
                    self._check_can_send()
                    if not view:
                        break
                    n = ring.write(view)
                    view = view[n:]
                    if not n:
                        await self._wait_space()
                        waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def _wait_space(self) -> None:
        if await self._spin(self._writable_now):
            return
        if self._ring.arm_write() > 0:
            return
        await self._sleep()

    async def wait_send_all_might_not_block(self) -> None:
        """Return when the ring has room (or the stream is broken or closed).

        Cancellation: safe.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                self._check_open()
                if self._bell.peer_dead or self._ring.buffer_space() > 0:
                    return
                await self._wait_space()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Tell the peer we will send nothing more; it reads EOF after our data.

        Idempotent.  The other direction keeps working.

        Raises:
            trio.BusyResourceError: a send_all is in progress.
            trio.ClosedResourceError: this stream was closed.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint()
        self._check_open()
        if not self._eof_sent:
            self._eof_sent = True
            self._ring.close()

    async def aclose(self) -> None:
        """Close both directions and release the shared memory.

        The peer still receives everything we wrote, then EOF.  Tasks blocked
        in this stream's methods get :class:`trio.ClosedResourceError`.
        """
        if not self._closed:
            self._closed = True
            self._ring.close()  # clears our live byte and signals: fds still open
            self._bell.close()
            self._ring.free()
        await trio.lowlevel.checkpoint()


class VchanListener(trio.abc.Listener[VchanStream]):
    """Accepts vchan connections for one service of a host store.

    Made by :func:`open_vchan_listener`.

    Attributes:
        service: the service name.
        store: the :class:`~meshlink.hoststore.HostStore` it is published in.
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
        service: the service name (see :func:`~meshlink.hoststore.validate_service_name`).
        host_store: a :class:`HostStore` or its directory (default: see
            :mod:`meshlink.hoststore`).
        allow_uids: user ids allowed to connect (default: only our own uid).
        read_min: minimum size of the ring this server reads (<= 1 MiB).
        write_min: minimum size of the ring this server writes (<= 1 MiB).
        backlog: listen backlog of the rendezvous socket.

    Returns:
        A :class:`VchanListener`; close it to withdraw the service.

    Raises:
        AddressInUse: a live server already publishes ``service``.
        LocalProtocolError: bad name or ring size.
    """
    for what, size in (("read_min", read_min), ("write_min", write_min)):
        if not 0 <= size <= MAX_RING_SIZE:
            raise LocalProtocolError(f"{what} must be in [0, {MAX_RING_SIZE}], got {size}")
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
) -> VchanStream:
    """Connect to ``service`` over vchan through the host store.

    Args:
        service: the service name.
        host_store: a :class:`HostStore` or its directory.
        read_min: minimum size of the ring we read (the server may choose more).
        write_min: minimum size of the ring we write.

    Returns:
        A connected :class:`VchanStream`.

    Raises:
        ServiceNotFound: no live server publishes ``service`` (a socket left
            by a crashed server counts as none).
        AuthError: the server refused us (for example, our uid is not allowed).
        HandshakeError: the handshake failed.
        RingCorruptError: the server's shared pages are not acceptable.

    Cancellation: safe; nothing is left behind.
    """
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
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await sock.send(encode({"meshlink": "vchan", "version": PROTOCOL_VERSION,
                                    "read_min": read_min, "write_min": write_min}))
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
