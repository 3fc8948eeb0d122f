"""Errors specific to the message bus.

They extend the hierarchy of :mod:`meshlink.errors`: everything the bus raises
on purpose is a :class:`meshlink.MeshlinkError`.  A dead peer is
:class:`meshlink.ConnectionLost` (also a :class:`trio.BrokenResourceError`);
malformed input is :class:`meshlink.RemoteProtocolError`; a misuse of the API
by our caller is :class:`meshlink.LocalProtocolError`.
"""

from __future__ import annotations

from ..errors import HandshakeError, MeshlinkError, RemoteProtocolError


class RemoteError(MeshlinkError):
    """The peer's handler raised an exception (or the peer refused the request).

    Attributes:
        remote_type: the name of the exception class on the peer, for example
            ``"KeyError"``; ``"MethodNotFound"`` when no handler had that name;
            ``"Cancelled"`` when the peer cancelled the handler on its own.
        remote_message: ``str()`` of that exception on the peer.
    """

    def __init__(self, remote_type: str, remote_message: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}" if remote_message else remote_type)
        self.remote_type = remote_type
        self.remote_message = remote_message

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str]]:
        # Exceptions pickle as ``cls(*args)``; args holds the joined message.
        return type(self), (self.remote_type, self.remote_message)


class VersionMismatch(HandshakeError, RemoteProtocolError):
    """The peer speaks a different version of the bus protocol.

    Both ends raise it: each one reads the other's hello frame.

    Attributes:
        local_version: the protocol version we speak.
        peer_version: the version the peer announced.
    """

    def __init__(self, local_version: int, peer_version: object) -> None:
        super().__init__(
            f"bus protocol version mismatch: we speak v{local_version}, "
            f"the peer speaks v{peer_version!r}"
        )
        self.local_version = local_version
        self.peer_version = peer_version

    def __reduce__(self) -> tuple[type[VersionMismatch], tuple[int, object]]:
        return type(self), (self.local_version, self.peer_version)


class PeerClosedError(RemoteProtocolError):
    """The peer closed the connection because it found a protocol error in what we sent.

    The peer's reason is in the message.
    """
