"""Serving disks without trio: the synchronous core of ``meshlink disk serve``'s fast path.

Why it exists: importing trio takes about 90 ms here, more than the whole
start-up budget of ``disk serve`` (ready within 100 ms of exec, as harnesses
that start a server per test expect from nbdkit).  The fast path serves the
same protocols with the standard library and threads, so a process that
uses it never imports trio (``tests/test_disk_syncserve.py`` checks
``sys.modules`` after serving real clients).

This module is the protocol-free part: :class:`SyncServer` accepts on
listening sockets and runs one thread per connection.  The protocols plug
in beside their trio drivers, reusing everything but the waiting:
:mod:`.nbd.server_sync` (the sans-io NBD machines and the executor's
threaded loop, as :class:`~.nbd.NBDServer` runs them) and
:mod:`.blk.back_sync` (the hello check and native ring loop of
:mod:`.blk.back_conn`, as :func:`~.blk.serve_blk` runs them).  Each is
imported only when used.

Threads: the caller's thread runs :meth:`SyncServer.run`, which waits on the
listening sockets and a wake-up pipe (:meth:`SyncServer.stop`, safe from a
signal handler).  Each accepted connection gets a daemon thread.  Stopping
closes the listeners, runs the ``on_stop`` callbacks (withdrawing services),
shuts every connection's socket down (which wakes a thread blocked in
``recv``/``readv``) and leaves the stop pipe readable (which wakes a thread
waiting on a doorbell or a hello); then the threads are joined, each for a
bounded time.  ``accept`` backs off when out of descriptors, as
:func:`~.nbd.server_listen.accept_connections` does, with the same log line.
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
from collections.abc import Callable

from ..ratelog import RateLimitedLog
from .counters import DiskStats
from .nbd.server_listen import ACCEPT_CAPACITY_ERRNOS, BACKOFF_FIRST, BACKOFF_MAX

__all__ = ["SyncServer"]

log = logging.getLogger("meshlink.disk.nbd")
#: accept() errors that concern one connection only (as trio retries them).
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
#: How long stopping waits for each connection's thread.
_JOIN_SECONDS = 5.0


class SyncServer:
    """Accepts on listening sockets and serves each connection on a thread.

    The protocols add their listeners: :func:`~.nbd.server_sync.serve_nbd_sync`
    and :func:`~.blk.back_sync.serve_blk_sync`.

    Args:
        stats: request counters (default: counted, not reported).
    """

    def __init__(self, *, stats: DiskStats | None = None) -> None:
        self.stats = stats if stats is not None else DiskStats()
        self._selector = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._stop_r, selectors.EVENT_READ, None)
        self._listeners: list[socket.socket] = []
        #: Guards the protocols' counters, taken by their admission callbacks.
        self.lock = threading.Lock()
        self._open: dict[socket.socket, threading.Thread] = {}
        #: Rate-limited warnings (refused connections, failing accepts).
        self.rlog = RateLimitedLog(log)
        self._stopping = False
        self._on_stop: list[Callable[[], None]] = []

    @property
    def stop_fd(self) -> int:
        """Readable once :meth:`stop` was called (for threads that wait on other fds)."""
        return self._stop_r

    def add_listener(self, sock: socket.socket,
                     handler: Callable[[socket.socket], None]) -> None:
        """Accept on ``sock`` (listening) and pass each connection to ``handler``.

        ``handler(conn)`` runs in the accepting thread and must not block:
        it starts a thread for ``conn`` (:meth:`start_thread`) or closes it.
        """
        sock.setblocking(False)
        self._listeners.append(sock)
        self._selector.register(sock, selectors.EVENT_READ, handler)

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the listeners are closed (e.g. to withdraw a service)."""
        self._on_stop.append(fn)

    def start_thread(self, conn: socket.socket, target: Callable[[], None]) -> None:
        """Run ``target`` on a daemon thread; ``conn`` is shut down when stopping."""
        thread = threading.Thread(target=self._run_client, args=(conn, target), daemon=True)
        with self.lock:
            self._open[conn] = thread
        thread.start()

    def _run_client(self, conn: socket.socket, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception:  # one connection's bug must not be silent, nor reach others
            log.exception("connection handler failed")
        finally:
            with self.lock:
                self._open.pop(conn, None)
            conn.close()

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
                    stop = select.poll()  # not select(): the fd may be above FD_SETSIZE
                    stop.register(self._stop_r, select.POLLIN)
                    if stop.poll(round(delay * 1000)):
                        break
                for key, _ in self._selector.select():
                    if key.data is None:
                        self._stopping = True
                        break
                    delay = self._accept(key.fileobj, key.data, delay)  # type: ignore[arg-type]
        finally:
            self._shut_down()

    def _accept(self, sock: socket.socket, handler: Callable[[socket.socket], None],
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
            self.rlog.warning("accept", "cannot accept a connection: %s; retrying in %d ms",
                               os.strerror(exc.errno or 0), round(delay * 1000))
            return delay
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # As trio's SocketStream does on the trio path, and nbdkit: without
            # it Nagle holds a small reply back while an earlier one is unacked.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        with self.lock:
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


