"""The rendezvous wire shared by the vchan and blk-ring handshakes.

Both meet over a Unix socket in the host store and exchange one small JSON
message each way, each prefixed by its length (u32, big-endian, at most
:data:`MAX_MESSAGE` bytes); file descriptors (memfd, eventfds) travel with a
message as ``SCM_RIGHTS``.  A refusal is ``{"ok": false, "code", "error"}``;
code ``"auth"`` means the peer's credentials were not allowed.

Servers face every local process that can reach the socket, so their side is
defensive: the peer's uid (``SO_PEERCRED``) is checked before a byte is read,
a message is at most :data:`MAX_MESSAGE` bytes and :data:`MAX_DEPTH` levels of
JSON nesting, any malformed message is a :class:`HandshakeError` for that
connection only, and :class:`MessageReader` receives a hello without ever
blocking, so one server can advance many handshakes at once, each under its
own deadline.  A refused client is told why before the server closes, and
:func:`send_hello` lets it read that refusal even when the server closed
before its hello went out.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from typing import TYPE_CHECKING, NamedTuple

from ..errors import AuthError, HandshakeError

if TYPE_CHECKING:
    import trio

__all__ = [
    "MAX_DEPTH",
    "MAX_MESSAGE",
    "MAX_PENDING",
    "MessageReader",
    "PeerCredentials",
    "check_reply",
    "encode",
    "peer_credentials",
    "receive_hello",
    "received_fds",
    "recv_message",
    "recv_message_with_fds",
    "refuse_now",
    "send_hello",
    "send_refusal",
]

#: Largest message body (bytes); a hello is well under 200.
MAX_MESSAGE = 4096
#: Deepest JSON nesting accepted; our messages have at most 2 levels.
MAX_DEPTH = 8
#: Handshakes one server runs at once; later clients are refused ("busy")
#: until one ends (each ends within its handshake timeout).
MAX_PENDING = 64


class PeerCredentials(NamedTuple):
    """The peer process as the kernel reports it (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> PeerCredentials:
    """The credentials of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def encode(msg: dict[str, object]) -> bytes:
    """One message, length prefix included."""
    # json is imported per handshake, not with the module: `meshlink disk
    # serve` loads this module before it is ready and sends nothing until a
    # client connects (a once-only import is then a dictionary lookup).
    import json

    body = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def _nesting(body: bytes) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for b in body:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _decode(body: bytes, what: str) -> dict[str, object]:
    # Checked before parsing: json would recurse once per level, and deep
    # enough nesting is a RecursionError, not a ValueError.
    if _nesting(body) > MAX_DEPTH:
        raise HandshakeError(f"malformed {what} handshake message: nested deeper than "
                             f"{MAX_DEPTH} levels")
    import json  # see encode()

    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HandshakeError(f"malformed {what} handshake message: {exc}") from exc
    if not isinstance(msg, dict):
        raise HandshakeError(f"malformed {what} handshake message: not an object")
    return msg


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors an ``SCM_RIGHTS`` message carried (``recvmsg`` ancdata).

    The caller owns them and must close every one, also on error.
    """
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return fds


async def _recv_exact(sock: trio.socket.SocketType, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await sock.recv(n - len(buf))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise HandshakeError(f"peer closed the connection during the {what} handshake")
        buf += chunk
    return bytes(buf)


def _length(prefix: bytes, what: str) -> int:
    (length,) = struct.unpack(">I", prefix)
    if length > MAX_MESSAGE:
        raise HandshakeError(f"{what} handshake message too long ({length} bytes)")
    return int(length)


async def recv_message(sock: trio.socket.SocketType, what: str) -> dict[str, object]:
    """Receive one message (no file descriptors expected).

    Raises:
        HandshakeError: EOF, an oversized or malformed message.
    """
    length = _length(await _recv_exact(sock, 4, what), what)
    return _decode(await _recv_exact(sock, length, what), what)


async def recv_message_with_fds(sock: trio.socket.SocketType, nfds: int,
                                what: str) -> tuple[dict[str, object], list[int]]:
    """Receive one message and the file descriptors sent with it (up to ``nfds``).

    Raises:
        HandshakeError: EOF, an oversized or malformed message (any
            descriptors received are closed first).
    """
    try:
        data, anc, _flags, _addr = await sock.recvmsg(MAX_MESSAGE + 4,
                                                      socket.CMSG_SPACE(nfds * 4))
    except ConnectionResetError:
        data, anc = b"", []
    fds = received_fds(anc)
    try:
        if len(data) < 4:
            raise HandshakeError(f"peer closed the connection during the {what} handshake")
        length = _length(data[:4], what)
        body = data[4:]
        if len(body) < length:
            body += await _recv_exact(sock, length - len(body), what)
        return _decode(body[:length], what), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class MessageReader:
    """Receives one message from a non-blocking socket without ever waiting.

    A server calls :meth:`poll` whenever the socket is readable; it reads at
    most what the message still needs (never past it: after the handshake the
    socket is the liveness channel) and returns the message once complete.

    Args:
        what: the protocol's name, for error messages.
        nfds: how many file descriptors may come with the message (more, or
            any when 0, is a :class:`HandshakeError`).
    """

    def __init__(self, what: str, nfds: int = 0) -> None:
        self.what = what
        self.nfds = nfds
        self.fds: list[int] = []
        self._buf = bytearray()
        self._length = -1

    def poll(self, sock: socket.socket) -> dict[str, object] | None:
        """Read what is there; the message when complete, else ``None``.

        The descriptors received are in :attr:`fds` (the caller closes them,
        also on error; see :meth:`close_fds`).

        Raises:
            HandshakeError: EOF, an oversized, malformed or over-equipped message.
        """
        what = self.what
        while True:
            need = (4 if self._length < 0 else 4 + self._length) - len(self._buf)
            anc_space = socket.CMSG_SPACE(self.nfds * 4) if self.nfds else 0
            try:
                data, anc, flags, _addr = sock.recvmsg(need, anc_space, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            self.fds.extend(received_fds(anc))
            if flags & socket.MSG_CTRUNC or len(self.fds) > self.nfds:
                raise HandshakeError(f"{what} handshake message carried too many descriptors")
            if not data:
                raise HandshakeError(f"peer closed the connection during the {what} handshake")
            self._buf += data
            if self._length < 0 and len(self._buf) == 4:
                self._length = _length(bytes(self._buf), what)
            if self._length >= 0 and len(self._buf) == 4 + self._length:
                return _decode(bytes(self._buf[4:]), what)

    def hello(self, sock: socket.socket) -> tuple[dict[str, object], list[int]] | None:
        """:meth:`poll`, with the descriptors: ``(message, fds)`` once complete."""
        msg = self.poll(sock)
        return None if msg is None else (msg, self.fds)

    def __enter__(self) -> MessageReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """On an exception (a cancellation included), close what was received."""
        if kind is not None:
            self.close_fds()

    def close_fds(self) -> None:
        """Close every descriptor received so far."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


async def receive_hello(sock: socket.socket, what: str,
                        nfds: int = 0) -> tuple[dict[str, object], list[int]]:
    """Receive a client's hello on a non-blocking socket (server side).

    Bound it with a deadline: a silent client is waited for.

    Raises:
        HandshakeError: as :meth:`MessageReader.poll` (descriptors closed).
    """
    import trio  # here, so that the trio-free disk server can use the rest

    with MessageReader(what, nfds) as reader:
        while (got := reader.hello(sock)) is None:
            await trio.lowlevel.wait_readable(sock)
        return got


def receive_hello_blocking(sock: socket.socket, what: str, nfds: int, timeout: float,
                           stop_fd: int) -> tuple[dict[str, object], list[int]] | None:
    """:func:`receive_hello` for a thread of its own (the trio-free disk server).

    Args:
        sock: the non-blocking connection.
        what: the protocol's name, for error messages.
        nfds: how many descriptors may come with the hello.
        timeout: seconds the whole hello may take.
        stop_fd: returns None (descriptors closed) as soon as it is readable.

    Raises:
        HandshakeError: as :meth:`MessageReader.poll` (descriptors closed).
        TimeoutError: no complete hello within ``timeout`` (descriptors closed).
    """
    deadline = time.monotonic() + timeout
    poller = select.poll()  # not select(): descriptors may be above FD_SETSIZE
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    with MessageReader(what, nfds) as reader:
        while (got := reader.hello(sock)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} hello within {timeout:g} s")
            events = poller.poll(max(1, round(left * 1000)))
            if any(fd == stop_fd for fd, _ in events):
                reader.close_fds()
                return None
        return got


def refuse_now(sock: socket.socket, why: str, code: str) -> None:
    """Send a refusal on a non-blocking socket without waiting (best effort).

    A refusal is a hundred bytes on a fresh socket: it fits in the buffer.
    """
    try:
        sock.send(encode({"ok": False, "code": code, "error": why[:1000]}), socket.MSG_DONTWAIT)
    except OSError:
        pass


async def send_hello(sock: trio.socket.SocketType, msg: dict[str, object],
                     fds: list[int] | None = None) -> None:
    """Send a client's hello (and ``fds``), tolerating a server that already hung up.

    A server that refuses a client (its uid, say) answers before reading
    anything and closes; our hello may then meet a closed socket
    (``EPIPE``/``ECONNRESET``).  The refusal is still queued for us, so we
    carry on and let the caller read it (or EOF).
    """
    data = [encode(msg)]
    anc = [] if not fds else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    try:
        await sock.sendmsg(data, anc)
    except (BrokenPipeError, ConnectionResetError):
        pass


async def send_refusal(sock: trio.socket.SocketType, why: str, code: str) -> None:
    """Tell the peer why it is refused (best effort: it may be gone already)."""
    try:
        await sock.send(encode({"ok": False, "code": code, "error": why[:1000]}))
    except OSError:
        pass


def check_reply(reply: dict[str, object], refused: str) -> None:
    """Raise the refusal a reply carries: AuthError for code "auth", else HandshakeError."""
    if reply.get("ok") is not True:
        why = str(reply.get("error", "refused"))
        cls = AuthError if reply.get("code") == "auth" else HandshakeError
        raise cls(f"{refused}: {why}")
