"""The rendezvous wire shared by the vchan and blk-ring handshakes.

Both meet over a Unix socket in the host store and exchange one small JSON
message each way, each prefixed by its length (u32, big-endian, at most
:data:`MAX_MESSAGE` bytes); file descriptors (memfd, eventfds) travel with a
message as ``SCM_RIGHTS``.  A refusal is ``{"ok": false, "code", "error"}``;
code ``"auth"`` means the peer's credentials were not allowed.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from dataclasses import dataclass

import trio

from ..errors import AuthError, HandshakeError

__all__ = [
    "MAX_MESSAGE",
    "PeerCredentials",
    "check_reply",
    "encode",
    "peer_credentials",
    "received_fds",
    "recv_message",
    "recv_message_with_fds",
    "send_refusal",
]

MAX_MESSAGE = 4096


@dataclass(frozen=True)
class PeerCredentials:
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
    body = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def _decode(body: bytes, what: str) -> dict[str, object]:
    try:
        msg = json.loads(body)
    except ValueError as exc:
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
        chunk = await sock.recv(n - len(buf))
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
    data, anc, _flags, _addr = await sock.recvmsg(MAX_MESSAGE + 4, socket.CMSG_SPACE(nfds * 4))
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


async def send_refusal(sock: trio.socket.SocketType, why: str, code: str) -> None:
    """Tell the peer why it is refused (best effort: it may be gone already)."""
    try:
        await sock.send(encode({"ok": False, "code": code, "error": why}))
    except OSError:
        pass


def check_reply(reply: dict[str, object], refused: str) -> None:
    """Raise the refusal a reply carries: AuthError for code "auth", else HandshakeError."""
    if reply.get("ok") is not True:
        why = str(reply.get("error", "refused"))
        cls = AuthError if reply.get("code") == "auth" else HandshakeError
        raise cls(f"{refused}: {why}")
