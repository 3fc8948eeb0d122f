"""Listening for NBD clients: addresses, listeners, and a bounded accept loop.

Why a module of its own: accepting is where a server meets clients it has not
vetted yet, so the limits that keep one host from exhausting the server live
here, next to the listeners they guard (trio is imported only by the async
functions: :func:`bind_sockets` also serves the trio-free
:mod:`meshlink.disk.syncserve`):

* :func:`accept_connections` backs off (10 ms doubling to 1 s) when ``accept``
  fails for lack of file descriptors or memory (``EMFILE``, ``ENFILE``,
  ``ENOBUFS``, ``ENOMEM``).  The pending connection stays in the backlog and
  keeps the listener readable, so retrying at once would spin a core; waiting
  lets connections that are closing give their descriptors back.
* :class:`~meshlink.ratelog.RateLimitedLog` keeps a flood (refused connections, failing accepts)
  to one log line per interval, with a count of what it held back, so a
  client cannot fill the disk through our log.

The connection limit itself is :class:`~meshlink.disk.nbd.NBDServer`'s
(it knows how many connections are open); this module only accepts.
"""

from __future__ import annotations

import errno as _errno
import os
import socket as _socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import AddressInUse
from ...ratelog import RateLimitedLog

if TYPE_CHECKING:
    import ssl

    import trio

#: Defaults of the per-client bounds (see :class:`~meshlink.disk.nbd.NBDServer`
#: and :mod:`meshlink.disk.syncserve`).  Ten seconds is ample for a handshake,
#: even over TLS on a slow link, yet frees a slot soon.
HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
#: Socket buffer size asked for on each connection (the kernel caps the value).
SOCKET_BUFFER = 4 << 20
#: listen() backlog; the kernel caps it at net.core.somaxconn.
_BACKLOG = 0xFFFF

#: accept() errors that mean "out of resources for now", not "broken listener".
ACCEPT_CAPACITY_ERRNOS = frozenset({_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS,
                                    _errno.ENOMEM})
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 1.0


async def accept_connections(listener: trio.SocketListener,
                             admit: Callable[[trio.SocketStream], None],
                             rlog: RateLimitedLog) -> None:
    """Accept on ``listener`` until cancelled; hand every connection to ``admit``.

    ``admit`` runs synchronously in this task (it must not block): it either
    starts a task for the connection or closes it.

    Raises:
        OSError: ``accept`` failed for a reason other than lack of resources
            (trio already retries the transient per-connection errors).

    Cancellation: stops accepting; connections already admitted are not touched.
    """
    import trio

    delay = 0.0
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            delay = min(max(delay * 2, BACKOFF_FIRST), BACKOFF_MAX)
            rlog.warning("accept", "cannot accept a connection: %s; retrying in %d ms",
                         os.strerror(exc.errno or 0), round(delay * 1000))
            await trio.sleep(delay)
            continue
        delay = 0.0
        admit(stream)



def parse_listen_address(addr: str) -> tuple[str, str | tuple[str, int]]:
    """Parse ``unix:/path``, ``tcp:host:port``, ``host:port`` or ``[v6]:port``.

    Returns:
        ``("unix", path)`` or ``("tcp", (host, port))``.

    Raises:
        ValueError: not an address we understand.
    """
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ValueError("unix: needs a path")
        return "unix", path
    if addr.startswith("tcp:"):
        addr = addr[4:]
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, unix:/path or tcp:host:port, got {addr!r}")
    host = host.strip("[]") or "127.0.0.1"
    return "tcp", (host, int(port))


async def open_listeners(addr: str) -> list[trio.SocketListener]:
    """Bind listeners for a ``--listen`` address (see :func:`bind_sockets`).

    Raises:
        AddressInUse: something already serves that address.
        ValueError: bad address.
        OSError: binding failed.
    """
    import trio

    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            for sock in bind_sockets(addr)]


def bind_sockets(addr: str) -> list[_socket.socket]:
    """Bind and listen on a ``--listen`` address: plain blocking sockets.

    TCP binds every address ``getaddrinfo`` gives for the host (passive), each
    with ``SO_REUSEADDR`` and IPv6 ones ``IPV6_V6ONLY``, as trio's
    ``open_tcp_listeners`` does.  A stale Unix socket file (nobody
    accepting) is replaced; a live one, or anything else at the path, is not.

    Raises:
        AddressInUse: something already serves that address.
        ValueError: bad address.
        OSError: binding failed (nothing is left bound).
    """
    kind, where = parse_listen_address(addr)
    socks: list[_socket.socket] = []
    try:
        if kind == "tcp":
            assert isinstance(where, tuple)
            host, port = where
            infos = _socket.getaddrinfo(host, port, _socket.AF_UNSPEC, _socket.SOCK_STREAM,
                                        0, _socket.AI_PASSIVE)
            for family, type_, proto, _name, sockaddr in infos:
                sock = _socket.socket(family, type_, proto)
                socks.append(sock)
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                if family == _socket.AF_INET6:
                    sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(sockaddr)
                except OSError as exc:
                    if exc.errno == _errno.EADDRINUSE:
                        raise AddressInUse(f"{host}:{port} is in use") from exc
                    raise
                sock.listen(_BACKLOG)
        else:
            assert isinstance(where, str)
            _clear_stale_socket(where)
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(where)
            sock.listen(128)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def size_buffers(sock: Any) -> None:
    """Enlarge an accepted connection's socket buffers (best effort).

    Bigger buffers mean fewer wake-ups per MiB.  TCP gets only the send side:
    a fixed SO_RCVBUF would switch off the receive window's auto-tuning
    (measured: 1 MiB reads over TCP loopback 0.92x -> 1.02-1.19x nbdkit;
    writes unchanged).

    Args:
        sock: a stdlib or trio socket.
    """
    options: tuple[int, ...]
    if sock.family == _socket.AF_UNIX:
        options = (_socket.SO_SNDBUF, _socket.SO_RCVBUF)
    else:
        options = (_socket.SO_SNDBUF,)
    for opt in options:
        try:
            sock.setsockopt(_socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


def _clear_stale_socket(path: str) -> None:
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise AddressInUse(f"{path} exists and is not a socket")
        probe = _socket.socket(_socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody is accepting
        else:
            raise AddressInUse(f"a server is already listening on {path}")
        finally:
            probe.close()


def activation_listeners(environ: dict[str, str] | None = None) -> list[trio.SocketListener]:
    """Listeners passed by systemd-style socket activation (LISTEN_PID/LISTEN_FDS).

    The variables are removed from ``environ`` (default ``os.environ``) so
    children do not inherit them.

    Returns:
        One listener per passed fd (fds 3, 4, ...), or [] if not activated.
    """
    env: Any = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or count is None or pid != str(os.getpid()):
        return []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    import trio

    listeners = []
    for fd in range(3, 3 + int(count)):
        os.set_inheritable(fd, False)
        sock = trio.socket.from_stdlib_socket(_socket.socket(fileno=fd))
        listeners.append(trio.SocketListener(sock))
    return listeners


def server_ssl_context(cert: str, key: str | None = None,
                       ca: str | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``ca``, client certificates are required.

    The same context meshlink's other TLS servers use (:class:`meshlink.transport.tls.TLSConfig`).

    Raises:
        LocalProtocolError: unreadable or invalid files.
    """
    from ...transport.tls import TLSConfig

    return TLSConfig(cert, key, ca).server_context()
