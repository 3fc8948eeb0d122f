"""Serving disks without trio: the synchronous driver of ``meshlink disk serve``.

Why it exists: importing trio takes about 90 ms here, more than the whole
start-up budget of ``disk serve`` (ready within 100 ms of exec, as harnesses
that start a server per test expect from nbdkit).  This driver serves the
same protocols with the standard library and threads, so a process that
uses it never imports trio (a test checks ``sys.modules``).

What it reuses, unchanged: the sans-io NBD machines (``nbd/server_handshake``,
``nbd/server_transmission``), the NBD executor's threaded driver
(:meth:`~.nbd.server_executor.Executor.run_thread`, the one the trio server
runs in its worker threads), the export table (``nbd/exports``), the
listeners (``nbd/server_listen.bind_sockets``), and for the blk ring the
hello check, the native ring loop and the doorbell of ``blk/back_conn``.
Only the waiting differs: blocking calls in one thread per connection.

Threads: the caller's thread runs :meth:`SyncServer.run`, which waits on the
listening sockets and a wake-up pipe (:meth:`SyncServer.stop`, safe from a
signal handler).  Each accepted connection gets a daemon thread.  Stopping
closes the listeners, shuts every connection's socket down (which wakes a
thread blocked in ``recv``/``readv``) and writes the stop pipe (which wakes
a blk thread waiting on its doorbell); then the threads are joined, each for
a bounded time.

The same limits as the trio server: at most ``max_connections`` NBD
connections (more are closed at once, with a rate-limited warning); the
NBD option phase must finish within ``handshake_timeout`` (one deadline for
the whole phase); a blk handshake within the blk handshake timeout, at most
``MAX_PENDING`` at once, the client's uid checked before a byte is read;
``accept`` backs off when out of descriptors.  The log lines are the trio
server's.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping

from resolver import HostStore, blk_entry_name

from ..errors import HandshakeError, RemoteProtocolError, resolver_errors
from ..ratelog import RateLimitedLog
from ..transport.rendezvous import receive_hello_blocking, refuse_now
from .backends._base import Backend
from .blk.back_conn import admit, blk_native, check_hello
from .blk.handshake import HANDSHAKE_TIMEOUT as BLK_HANDSHAKE_TIMEOUT
from .counters import DiskStats
from .nbd.exports import ExportTable
from .nbd.sansio import NEED_DATA, HardDisconnect
from .nbd.server_executor import MAX_REPLY_BYTES, Executor
from .nbd.server_handshake import Aborted, EnterTransmission, ServerHandshake, TLSMode
from .nbd.server_listen import (
    ACCEPT_CAPACITY_ERRNOS,
    BACKOFF_FIRST,
    BACKOFF_MAX,
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    size_buffers,
)
from .nbd.server_transmission import ServerTransmission

__all__ = ["SyncServer"]

log = logging.getLogger("meshlink.disk.nbd")
log_blk = logging.getLogger("meshlink.disk.blk")
#: accept() errors that concern one connection only (as trio retries them).
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
#: How long stopping waits for each connection's thread.
_JOIN_SECONDS = 5.0
#: How long an aborting client has to read the ABORT acknowledgement.
_ABORT_SEND_SECONDS = 5.0


class SyncServer:
    """Accepts on listening sockets and serves each connection on a thread.

    Args:
        handshake_timeout: seconds an NBD client has to enter transmission.
        max_connections: NBD connections open at once.
        max_reply_bytes: READ data one NBD connection may have queued.
        stats: request counters (default: counted, not reported).

    Raises:
        ValueError: a limit below 1, or a timeout not above 0.
    """

    def __init__(self, *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_reply_bytes: int = MAX_REPLY_BYTES,
                 stats: DiskStats | None = None) -> None:
        if not handshake_timeout > 0 or max_connections < 1 or max_reply_bytes < 1:
            raise ValueError("handshake_timeout must be above 0, max_connections and "
                             "max_reply_bytes at least 1")
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_reply_bytes = max_reply_bytes
        self.stats = stats if stats is not None else DiskStats()
        self._selector = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._stop_r, selectors.EVENT_READ, None)
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()
        self._open: dict[socket.socket, threading.Thread] = {}
        self._rlog = RateLimitedLog(log)
        self._stopping = False
        self._on_stop: list[Callable[[], None]] = []
        #: Open NBD connections.
        self.connections = 0

    @property
    def stop_fd(self) -> int:
        """Readable once :meth:`stop` was called (for threads that wait on other fds)."""
        return self._stop_r

    def add_listener(self, sock: socket.socket,
                     handler: Callable[[socket.socket], bool]) -> None:
        """Accept on ``sock`` (listening) and pass each connection to ``handler``.

        ``handler(conn)`` runs in the accepting thread and must not block:
        it returns True to have ``conn`` served on a thread of its own (by
        :meth:`serve_nbd` or the callable it was set up with), or closes
        ``conn`` and returns False.
        """
        sock.setblocking(False)
        self._listeners.append(sock)
        self._selector.register(sock, selectors.EVENT_READ, handler)

    def add_nbd(self, sock: socket.socket, exports: ExportTable) -> None:
        """Serve NBD (no TLS) on the listening ``sock``, from ``exports``."""
        def admit(conn: socket.socket) -> bool:
            with self._lock:
                if self.connections >= self.max_connections:
                    self._rlog.warning("limit", "refusing a connection: %d open, the limit "
                                       "(max_connections)", self.connections)
                    conn.close()
                    return False
                self.connections += 1
            conn.setblocking(True)
            self.start_thread(conn, lambda: self._serve_nbd(conn, exports))
            return True

        self.add_listener(sock, admit)

    def start_thread(self, conn: socket.socket, target: Callable[[], None]) -> None:
        """Run ``target`` on a daemon thread; ``conn`` is shut down when stopping."""
        thread = threading.Thread(target=self._run_client, args=(conn, target), daemon=True)
        with self._lock:
            self._open[conn] = thread
        thread.start()

    def _run_client(self, conn: socket.socket, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception:  # one connection's bug must not be silent, nor reach others
            log.exception("connection handler failed")
        finally:
            with self._lock:
                self._open.pop(conn, None)
            conn.close()

    # -- NBD ------------------------------------------------------------------------

    def _serve_nbd(self, conn: socket.socket, exports: ExportTable) -> None:
        try:
            self._nbd(conn, exports)
        except HardDisconnect as exc:
            log.info("dropping client: %s", exc)
        except RemoteProtocolError as exc:
            log.debug("client left: %s", exc)
        except OSError as exc:
            log.info("connection failed: %s", exc)
        finally:
            with self._lock:
                self.connections -= 1

    def _nbd(self, conn: socket.socket, exports: ExportTable) -> None:
        """The option phase against one deadline, then the threaded transmission loop."""
        core = ServerHandshake(exports.lookup, exports.names, tls=TLSMode.OFF)
        deadline = time.monotonic() + self.handshake_timeout
        entered: EnterTransmission | None = None

        def within_deadline() -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)

        try:
            within_deadline()
            conn.sendall(core.data_to_send())
            while entered is None:
                ev = core.next_event()
                out = core.data_to_send()
                if isinstance(ev, Aborted):
                    # The client may close without reading the ACK; that is fine.
                    conn.settimeout(_ABORT_SEND_SECONDS)
                    try:
                        conn.sendall(out)
                    except OSError:
                        pass
                    log.debug("client aborted the handshake")
                    return
                if out:
                    within_deadline()
                    conn.sendall(out)
                if ev is NEED_DATA:
                    within_deadline()
                    core.receive_data(conn.recv(65536))
                elif isinstance(ev, EnterTransmission):
                    entered = ev
                else:  # StartTLS cannot come: TLS is off on this path
                    raise HardDisconnect(f"unexpected handshake event {ev!r}")
        except TimeoutError:
            log.info("dropping client: no transmission phase within %g s",
                     self.handshake_timeout)
            return
        conn.settimeout(None)
        size_buffers(conn)
        export = exports.find(entered.export.name)
        assert export is not None  # the handshake found it
        counters = self.stats.open(export.name, "nbd")
        try:
            executor = Executor(export.backend, ServerTransmission(entered),
                                self.max_reply_bytes, counters)
            fd = conn.fileno()
            failure, detail = executor.run_thread(fd, fd)
        finally:
            self.stats.close(counters)
        if failure is not None:
            raise failure(detail)
        log.debug("connection ended: %s", detail)

    # -- the blk ring -------------------------------------------------------------------

    def add_blk(self, service: str, disks: Mapping[str, Backend], *,
                host_store: HostStore | str | os.PathLike[str] | None = None,
                allow_uids: Collection[int] | None = None) -> HostStore:
        """Publish ``<service>.blk`` and serve ``disks`` over the blk ring (as
        :func:`~.blk.serve_blk`); the service is withdrawn when :meth:`run` ends.

        Every backend must be one the native ring loop serves
        (:func:`blk_native`); the Python loop runs on trio only.

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
        self._on_stop.append(pub.withdraw)
        pending = [0]  # handshakes under way, guarded by self._lock

        def admit_blk(conn: socket.socket) -> bool:
            conn.setblocking(False)
            with self._lock:
                if not admit(conn, uids, pending[0]):
                    return False
                pending[0] += 1
            self.start_thread(conn, lambda: self._serve_blk(conn, disks, pending))
            return True

        self.add_listener(sock, admit_blk)
        return store

    def _serve_blk(self, conn: socket.socket, disks: Mapping[str, Backend],
                   pending: list[int]) -> None:
        try:
            try:
                got = receive_hello_blocking(conn, "blk", 3, BLK_HANDSHAKE_TIMEOUT,
                                             self._stop_r)
            except HandshakeError as exc:
                refuse_now(conn, str(exc), "refused")
                raise
            if got is None:
                return
            c = check_hello(conn, *got, disks, self.stats)  # refuses by itself
        except (HandshakeError, OSError) as exc:  # TimeoutError included
            log_blk.info("blk client refused: %s", exc)
            return
        finally:
            with self._lock:
                pending[0] -= 1
        try:
            c.run_native_blocking(self._stop_r)
        except RemoteProtocolError as exc:  # RingCorruptError: the frontend broke the ring
            log_blk.warning("blk client dropped: %s", exc)
        finally:
            c.close()

    # -- the accepting thread -----------------------------------------------------------

    def run(self) -> None:
        """Accept until :meth:`stop`; then stop every connection (see the module doc).

        Raises:
            OSError: a listener failed for good.
        """
        delay = 0.0
        try:
            while not self._stopping:
                if delay:
                    # Out of descriptors: the pending connection keeps the
                    # listener readable, so wait on the stop pipe alone.
                    if select.select([self._stop_r], [], [], delay)[0]:
                        break
                for key, _ in self._selector.select():
                    if key.data is None:
                        self._stopping = True
                        break
                    delay = self._accept(key.fileobj, key.data, delay)  # type: ignore[arg-type]
        finally:
            self._shut_down()

    def _accept(self, sock: socket.socket, handler: Callable[[socket.socket], bool],
                delay: float) -> float:
        """Accept one connection; returns the back-off before the next select."""
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return 0.0
        except OSError as exc:
            if exc.errno in _ACCEPT_TRANSIENT:
                return 0.0
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            delay = min(max(delay * 2, BACKOFF_FIRST), BACKOFF_MAX)
            self._rlog.warning("accept", "cannot accept a connection: %s; retrying in %d ms",
                               os.strerror(exc.errno or 0), round(delay * 1000))
            return delay
        handler(conn)
        return 0.0

    def stop(self) -> None:
        """Make :meth:`run` return (from any thread or a signal handler)."""
        try:
            os.write(self._stop_w, b"x")
        except BlockingIOError:  # the pipe is full: a stop is already pending
            pass

    def _shut_down(self) -> None:
        self.stop()  # also wakes blk threads waiting on stop_fd
        for sock in self._listeners:
            self._selector.unregister(sock)
            sock.close()
        self._listeners.clear()
        for withdraw in self._on_stop:
            withdraw()
        self._on_stop.clear()
        with self._lock:
            conns = list(self._open.items())
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_SECONDS
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Release the selector and the stop pipe (after :meth:`run` returned)."""
        self._selector.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


