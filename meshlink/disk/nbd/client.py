"""The NBD client: a trio adapter around :class:`ClientHandshake` / :class:`ClientTransmission`.

Theory of operation
-------------------
``open_nbd`` connects (TCP, Unix socket, optional STARTTLS), negotiates
structured replies, ``base:allocation`` and block sizes with NBD_OPT_GO, then
yields an :class:`NBDDisk`.  One reader task owns the receive side and
completes requests by cookie; callers send under a lock, so any number of
tasks may issue requests at once and they are pipelined on the wire, bounded
by ``max_in_flight``.

Every failure is typed: a server error reply raises :class:`~meshlink.DiskError`
with the server's errno; a lost connection raises
:class:`~meshlink.ConnectionLost` in every waiting caller; a READ is
either complete or an error - a short read that claims success is a
:class:`~meshlink.RemoteProtocolError`, never silently short data.
"""

from __future__ import annotations

import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ...errors import ConnectionLost, DiskError, HandshakeError, RemoteProtocolError
from . import wire as c
from .client_handshake import ClientHandshake, ExportList, Negotiated, OptionError
from .client_transmission import ClientTransmission, Reply
from .sansio import NEED_DATA, StartTLS

_ERRNO_TEXT = {c.EPERM: "operation not permitted", c.EIO: "input/output error",
               c.ENOMEM: "cannot allocate memory", c.EINVAL: "invalid argument",
               c.ENOSPC: "no space left on device", c.EOVERFLOW: "value too large",
               c.ENOTSUP: "operation not supported", c.ESHUTDOWN: "server shutting down"}


def parse_nbd_url(url: str) -> tuple[str, str | tuple[str, int], str, bool]:
    """Split an NBD URI (``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbds+unix://``).

    Returns:
        ``(kind, where, export, tls)`` with kind ``"tcp"`` (where = (host, port))
        or ``"unix"`` (where = socket path).

    Raises:
        ValueError: not an NBD URI we can use.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise ValueError(f"not an NBD URI: {url!r}")
    tls = scheme.startswith("nbds")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if scheme.endswith("+unix"):
        query = urllib.parse.parse_qs(parts.query)
        sockets = query.get("socket")
        if not sockets:
            raise ValueError(f"{url!r}: nbd+unix needs ?socket=PATH")
        return "unix", sockets[0], export, tls
    return "tcp", (parts.hostname or "localhost", parts.port or 10809), export, tls


class NBDDisk:
    """An open NBD export; get one from :func:`open_nbd`.

    All methods are safe to call from several tasks at once; requests are
    pipelined.  Ranges are checked locally first (``DiskError(EINVAL)``);
    writes to a read-only export fail with ``DiskError(EPERM)`` unsent.
    """

    def __init__(self, stream: trio.abc.Stream, negotiated: Negotiated, *,
                 max_in_flight: int = 64) -> None:
        self._stream = stream
        self._tx = ClientTransmission(negotiated)
        self.info = negotiated
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(max_in_flight)
        self._waiters: dict[int, tuple[trio.Event, list[Reply]]] = {}
        self._broken: BaseException | None = None
        self._closed = False
        self._max = max(512, min(negotiated.max_block, c.MAX_REQUEST))

    # -- properties ---------------------------------------------------------

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self.info.size

    @property
    def read_only(self) -> bool:
        """True if the server said the export is read-only."""
        return bool(self.info.flags & c.TF_READ_ONLY)

    @property
    def flags(self) -> int:
        """Raw transmission flags (``TF_*``)."""
        return self.info.flags

    def can(self, flag: int) -> bool:
        """True if the transmission flag ``flag`` was advertised."""
        return bool(self.info.flags & flag)

    # -- the reader task ------------------------------------------------------

    async def _reader(self) -> None:
        tx = self._tx
        try:
            while True:
                data = await self._stream.receive_some(1 << 18)
                tx.receive_data(data)
                while True:
                    ev = tx.next_event()
                    if ev is NEED_DATA:
                        break
                    assert isinstance(ev, Reply)
                    waiter = self._waiters.pop(ev.cookie, None)
                    if waiter is not None:  # None: its caller was cancelled; drop it
                        waiter[1].append(ev)
                        waiter[0].set()
                if not data:
                    raise ConnectionLost("server closed the connection")
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError,
                ssl.SSLError, OSError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        for event, _ in self._waiters.values():
            event.set()
        self._waiters.clear()

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("disk is closed")
        if self._broken is not None:
            raise ConnectionLost(f"connection to the NBD server failed: {self._broken}") \
                from self._broken

    async def _call(self, cmd: int, offset: int, length: int, flags: int = 0,
                    payload: bytes | bytearray | memoryview | None = None) -> Reply:
        self._check_usable()
        async with self._slots:
            self._check_usable()
            cookie, header = self._tx.request(cmd, offset, length, flags)
            event, box = trio.Event(), list[Reply]()
            self._waiters[cookie] = (event, box)
            try:
                async with self._send_lock:
                    self._check_usable()
                    if payload is not None and len(payload) <= 65536:
                        await self._stream.send_all(header + bytes(payload))
                    else:
                        await self._stream.send_all(header)
                        if payload is not None:
                            await self._stream.send_all(payload)
            except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
                self._fail(exc)
                raise ConnectionLost(f"sending to the NBD server failed: {exc}") from exc
            except trio.Cancelled:
                # A half-sent request leaves the stream unusable for everyone.
                self._fail(ConnectionLost("a request was cancelled while being sent"))
                raise
            try:
                await event.wait()
            finally:
                self._waiters.pop(cookie, None)
            if not box:
                self._check_usable()
                raise ConnectionLost("no reply")  # pragma: no cover - _fail sets _broken
            reply = box[0]
        if reply.error:
            text = reply.message or _ERRNO_TEXT.get(reply.error, "error")
            raise DiskError(f"NBD {c.CMD_NAMES.get(cmd, cmd)} at {offset}+{length}: {text}",
                            reply.error)
        return reply

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"range {offset}+{length} outside the export (size {self.size})",
                            c.EINVAL)

    def _writable(self) -> None:
        if self.read_only:
            raise DiskError("export is read-only", c.EPERM)

    # -- the API ------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset``.

        Returns:
            The bytes (never fewer than asked).

        Raises:
            DiskError: the server refused or failed (errno attached), or the range is bad.
            ConnectionLost: the connection failed.
            RemoteProtocolError: the server sent a malformed or short reply.

        Cancellation: safe once the request is sent (the reply is discarded);
        cancelling mid-send breaks the connection.

        Backpressure: waits while ``max_in_flight`` requests are outstanding.
        """
        self._range(offset, length)
        if length <= self._max:
            reply = await self._call(c.CMD_READ, offset, length)
            assert reply.data is not None
            return bytes(reply.data)
        pieces: list[bytes] = [b""] * math.ceil(length / self._max)

        async def one(i: int) -> None:
            start = i * self._max
            pieces[i] = await self.read(offset + start, min(self._max, length - start))

        async with trio.open_nursery() as nursery:
            for i in range(len(pieces)):
                nursery.start_soon(one, i)
        return b"".join(pieces)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        """Write all of ``data`` at ``offset`` (split into several requests if large).

        Raises:
            DiskError: EPERM (read-only), EINVAL/ENOSPC (range), or the server's error.
            ConnectionLost: the connection failed.

        Cancellation: as :meth:`read`.  Backpressure: as :meth:`read`.
        """
        view = memoryview(data).cast("B")
        self._range(offset, len(view))
        self._writable()
        flags = c.CMD_FLAG_FUA if fua and self.can(c.TF_SEND_FUA) else 0
        if len(view) <= self._max:
            await self._call(c.CMD_WRITE, offset, len(view), flags, view)
            return
        async with trio.open_nursery() as nursery:
            for start in range(0, len(view), self._max):
                chunk = view[start : start + self._max]
                nursery.start_soon(self._call, c.CMD_WRITE, offset + start, len(chunk), flags,
                                   chunk)

    async def flush(self) -> None:
        """Make every completed write durable (a no-op if the server cannot flush).

        Raises:
            DiskError / ConnectionLost: as :meth:`read`.
        """
        if self.can(c.TF_SEND_FLUSH):
            await self._call(c.CMD_FLUSH, 0, 0)

    async def discard(self, offset: int, length: int) -> None:
        """Tell the server the range is unused (trim); a no-op if it cannot trim.

        Raises:
            DiskError / ConnectionLost: as :meth:`write`.
        """
        self._range(offset, length)
        self._writable()
        if self.can(c.TF_SEND_TRIM):
            for start in range(0, length, 1 << 30):
                await self._call(c.CMD_TRIM, offset + start, min(1 << 30, length - start))

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False) -> None:
        """Make the range read as zeroes.

        Args:
            offset: first byte.
            length: bytes to zero.
            may_trim: allow the server to deallocate (otherwise NO_HOLE).
            fast: fail with ``DiskError(ENOTSUP)`` unless the server can do it quickly.

        Raises:
            DiskError / ConnectionLost: as :meth:`write`.
        """
        self._range(offset, length)
        self._writable()
        if not self.can(c.TF_SEND_WRITE_ZEROES):
            if fast:
                raise DiskError("server cannot zero quickly", c.ENOTSUP)
            for start in range(0, length, 1 << 20):
                await self.write(offset + start, bytes(min(1 << 20, length - start)))
            return
        if fast and not self.can(c.TF_SEND_FAST_ZERO):
            raise DiskError("server cannot zero quickly", c.ENOTSUP)
        flags = (0 if may_trim else c.CMD_FLAG_NO_HOLE) | (c.CMD_FLAG_FAST_ZERO if fast else 0)
        for start in range(0, length, 1 << 30):
            await self._call(c.CMD_WRITE_ZEROES, offset + start,
                             min(1 << 30, length - start), flags)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Allocation (``base:allocation``) from ``offset``: ``(length, flags)`` extents.

        The extents may cover less or (the last one) more than ``length``.

        Raises:
            DiskError: EINVAL if the server offered no ``base:allocation``.
        """
        self._range(offset, max(length, 1))
        ids = [k for k, v in self.info.contexts.items() if v == c.BASE_ALLOCATION]
        if not ids:
            raise DiskError("server did not offer base:allocation", c.EINVAL)
        reply = await self._call(c.CMD_BLOCK_STATUS, offset, min(length, 0xFFFFFFFF))
        return list((reply.extents or {}).get(ids[0], []))

    async def aclose(self) -> None:
        """Send NBD_CMD_DISC (after in-flight requests finish) and close.

        Cancellation: closes the connection forcefully.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._broken is None:
                with trio.move_on_after(10):
                    for event, _ in list(self._waiters.values()):
                        await event.wait()  # let in-flight replies arrive first
                    async with self._send_lock:
                        _, header = self._tx.request(c.CMD_DISC)
                        await self._stream.send_all(header)
        except (trio.BrokenResourceError, OSError, ssl.SSLError):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)


async def _connect(kind: str, where: str | tuple[str, int]) -> trio.abc.Stream:
    try:
        if kind == "unix":
            assert isinstance(where, str)
            return await trio.open_unix_socket(where)
        assert isinstance(where, tuple)
        return await trio.open_tcp_stream(*where)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {where}: {exc}") from exc


async def _handshake(stream: trio.abc.Stream, core: ClientHandshake,
                     ssl_context: ssl.SSLContext | None,
                     server_hostname: str | None) -> tuple[trio.abc.Stream,
                                                           Negotiated | ExportList]:
    try:
        while True:
            ev = core.next_event()
            out = core.data_to_send()
            if out:
                await stream.send_all(out)
            if ev is NEED_DATA:
                core.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, StartTLS):
                assert ssl_context is not None
                stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname)
                await stream.do_handshake()
                core.tls_established()
            else:
                assert isinstance(ev, Negotiated | ExportList)
                return stream, ev
    except OptionError as exc:
        raise HandshakeError(str(exc)) from exc
    except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
        raise HandshakeError(f"NBD handshake failed: {exc}") from exc


def _target(url: str | None, export: str | None, host: str | None, port: int | None,
            unix_path: str | None, ssl_context: ssl.SSLContext | None
            ) -> tuple[str, str | tuple[str, int], str, bool]:
    if url is not None:
        kind, where, name, tls = parse_nbd_url(url)
        if export is not None:
            name = export
        if tls and ssl_context is None:
            raise ValueError(f"{url!r} asks for TLS: pass ssl_context")
        return kind, where, name, tls or ssl_context is not None
    if unix_path is not None:
        return "unix", unix_path, export or "", ssl_context is not None
    return "tcp", (host or "localhost", port or 10809), export or "", ssl_context is not None


@asynccontextmanager
async def open_nbd(url: str | None = None, *, export: str | None = None,
                   host: str | None = None, port: int | None = None,
                   unix_path: str | None = None, ssl_context: ssl.SSLContext | None = None,
                   server_hostname: str | None = None,
                   max_in_flight: int = 64) -> AsyncIterator[NBDDisk]:
    """Connect to an NBD export: ``async with open_nbd("nbd://host/name") as disk: ...``.

    Args:
        url: ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``, or
            the ``nbds`` forms (TLS; needs ``ssl_context``).  Alternatively give
            ``host``/``port`` or ``unix_path`` and ``export``.
        export: export name (overrides the URL's).
        host / port / unix_path: where to connect when no URL is given.
        ssl_context: client context; when given, STARTTLS is required.
        server_hostname: name to verify the server certificate against
            (default: the host, or ``localhost`` for Unix sockets).
        max_in_flight: requests outstanding at once.

    Yields:
        The open :class:`NBDDisk`; it is closed (NBD_CMD_DISC) on exit.

    Raises:
        ValueError: bad URL or TLS without a context.
        ConnectionLost: cannot connect.
        HandshakeError: the server refused the export, TLS, or the negotiation failed.

    Cancellation: a cancelled open leaves nothing behind.
    """
    kind, where, name, tls = _target(url, export, host, port, unix_path, ssl_context)
    if server_hostname is None:
        server_hostname = where[0] if isinstance(where, tuple) else "localhost"
    stream = await _connect(kind, where)
    try:
        core = ClientHandshake(name, tls=tls, meta_contexts=(c.BASE_ALLOCATION,))
        stream, ev = await _handshake(stream, core, ssl_context if tls else None,
                                      server_hostname)
        assert isinstance(ev, Negotiated)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    disk = NBDDisk(stream, ev, max_in_flight=max_in_flight)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(disk._reader)
        try:
            yield disk
        finally:
            await disk.aclose()
            nursery.cancel_scope.cancel()


async def list_exports(url: str | None = None, *, host: str | None = None,
                       port: int | None = None, unix_path: str | None = None,
                       ssl_context: ssl.SSLContext | None = None,
                       server_hostname: str | None = None) -> list[tuple[str, str]]:
    """Ask a server for its exports (NBD_OPT_LIST).

    Returns:
        ``(name, description)`` pairs.

    Raises:
        ConnectionLost / HandshakeError: as :func:`open_nbd`.
    """
    kind, where, _, tls = _target(url, None, host, port, unix_path, ssl_context)
    if server_hostname is None:
        server_hostname = where[0] if isinstance(where, tuple) else "localhost"
    stream = await _connect(kind, where)
    try:
        core = ClientHandshake(tls=tls, list_exports=True)
        stream, ev = await _handshake(stream, core, ssl_context if tls else None,
                                      server_hostname)
        assert isinstance(ev, ExportList)
        out = core.data_to_send()  # the ABORT
        if out:
            await stream.send_all(out)
        return list(ev.exports)
    finally:
        await trio.aclose_forcefully(stream)
