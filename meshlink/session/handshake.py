"""Opening and resuming sessions on a fresh transport: the client's greeting and
the server's table of sessions.

The client speaks first (48 bytes: :func:`.wire.pack_greeting`); the server
answers and, from then on, both ends exchange records.  A server reads the
first byte of every accepted transport: ``0xC1`` starts a greeting, anything
else is a client without sessions (a bare bus hello), served as before
through :class:`PrefixedStream`.

Security: the transport under a greeting is already authenticated (vchan uid,
TLS certificate); the token, 128 random bits known only to the two ends,
proves that a resumer is the client that opened the session, whatever
transport it comes back on.  Tokens are compared in constant time.  A server
keeps at most ``max_sessions`` sessions; a session left without a transport
is forgotten after ``resume_timeout`` (:meth:`SessionStream.keep`).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable

import trio

from ..errors import HandshakeError, RemoteProtocolError
from ..transport.nowait import NowaitSender, nowait_sender
from .stream import SessionConfig, SessionStream
from .wire import (
    GREETING_SIZE,
    ID_SIZE,
    MAGIC,
    NEW,
    REFUSED,
    RESUMED,
    ZERO_ID,
    Greeting,
    pack_greeting,
    parse_greeting,
)

__all__ = ["PrefixedStream", "SessionTable", "greet", "receive_exactly"]

logger = logging.getLogger("meshlink.session")


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    """Read exactly ``size`` bytes.

    Raises:
        HandshakeError: the stream ended first.
    """
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.receive_some(size - len(buf))
        if not chunk:
            raise HandshakeError("the peer closed the transport during the session greeting")
        buf += chunk
    return bytes(buf)


async def greet(transport: trio.abc.Stream, session: SessionStream | None) -> Greeting:
    """The client's half: ask for a new session (``session=None``) or to resume one.

    Returns:
        The server's reply: :data:`~.wire.NEW` (a new session; when resuming,
        the server did not know ours any more), :data:`~.wire.RESUMED`.

    Raises:
        HandshakeError: the transport ended, or the server refused our token.
        RemoteProtocolError: the reply is malformed.
    """
    if session is None:
        hello = pack_greeting(0, ZERO_ID, ZERO_ID, 0)
    else:
        hello = pack_greeting(0, session.session_id, session.token, session.received)
    await transport.send_all(hello)
    reply = parse_greeting(await receive_exactly(transport, GREETING_SIZE), reply=True)
    if reply.status == REFUSED:
        raise HandshakeError("the server refused to resume the session (wrong token)")
    if reply.status == RESUMED and (session is None or reply.session_id != session.session_id):
        raise RemoteProtocolError("the server resumed a session we did not ask for")
    if reply.status == NEW and reply.session_id == ZERO_ID:
        raise RemoteProtocolError("the server opened a session with an empty id")
    return reply


class PrefixedStream(trio.abc.Stream):
    """A stream whose first bytes were already read: they come back first.

    Used for clients without sessions, whose first byte the server read to
    tell them apart.
    """

    #: The wrapped stream's non-waiting write, when it has one (set per
    #: instance, so that :func:`~meshlink.transport.nowait.nowait_sender`
    #: finds it only then).  Without it every reply of the bus to a client
    #: without sessions took an awaited send_all, with its schedule point.
    try_send: NowaitSender

    def __init__(self, first: bytes, stream: trio.abc.Stream) -> None:
        self._first = first
        self.stream = stream
        nowait = nowait_sender(stream)
        if nowait is not None:
            self.try_send = nowait

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The bytes read ahead first, then the stream's."""
        if self._first:
            first, self._first = self._first, b""
            await trio.lowlevel.checkpoint()
            if max_bytes is not None and len(first) > max_bytes:
                first, self._first = first[:max_bytes], first[max_bytes:]
            return first
        return await self.stream.receive_some(max_bytes)

    def split_read_ahead(self) -> tuple[bytes, trio.abc.Stream]:
        """Hand over the bytes read ahead and the wrapped stream, for a reader
        that takes those bytes first and then reads the stream itself (the
        bus does: a Python frame less on every receive).  This wrapper's own
        :meth:`receive_some` then reads the stream directly."""
        first, self._first = self._first, b""
        return first, self.stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """The wrapped stream's ``send_all``."""
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """The wrapped stream's."""
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the wrapped stream."""
        await self.stream.aclose()


class SessionTable:
    """The sessions one server keeps, by id.

    Args:
        config: timers and bounds of every session.
        max_sessions: sessions kept at once (live or waiting for a resume);
            a client asking for one more is closed.

    Attributes:
        resumed: sessions resumed on a new transport so far.
        moved: of those, resumed on another kind of transport.
    """

    def __init__(self, config: SessionConfig, max_sessions: int) -> None:
        self.config = config
        self.max_sessions = max_sessions
        self._sessions: dict[bytes, SessionStream] = {}
        self.resumed = 0
        self.moved = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def cut(self, label: str | None = None) -> int:
        """Drop the transport of every session (of those on ``label`` only, if given).

        The clients resume at once, over whatever their resolver offers then:
        call it after withdrawing a transport (``Server.withdraw_vchan``) so
        that sessions leave it.  Returns how many transports were dropped.
        """
        cut = 0
        for session in list(self._sessions.values()):
            t = session.transport
            if t is not None and (label is None or session.label == label):
                session.transport_failed(t, "cut by the server")
                cut += 1
        return cut

    async def accept(
        self,
        stream: trio.abc.Stream,
        label: str,
        serve: Callable[[trio.abc.Stream, SessionStream | None], Awaitable[None]],
        *,
        greeting_timeout: float,
    ) -> None:
        """Serve one accepted transport: a session greeting or a bare bus client.

        ``serve(stream, session)`` runs the bus over ``stream``: the session
        itself for a new session, the transport (``session=None``) for a
        client without sessions.  A resumed transport joins its session and
        this returns when the session stops using it.

        Raises:
            HandshakeError, RemoteProtocolError: a bad or truncated greeting,
                or none within ``greeting_timeout`` seconds (the transport is closed).
        """
        try:
            with trio.fail_after(greeting_timeout):
                first = await stream.receive_some(GREETING_SIZE)
                if not first:
                    raise HandshakeError("the client closed before saying anything")
                data = bytes(first)
                if first[:1] == MAGIC[:1] and len(data) < GREETING_SIZE:
                    data += await receive_exactly(stream, GREETING_SIZE - len(data))
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise HandshakeError(f"no greeting within {greeting_timeout} s") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if data[:1] != MAGIC[:1]:
            await serve(PrefixedStream(data, stream), None)
            return
        try:
            hello = parse_greeting(data, reply=False)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        session = self._sessions.get(hello.session_id)
        if session is not None:
            if not hmac.compare_digest(session.token, hello.token):
                logger.warning("refused to resume session %s: wrong token",
                               hello.session_id.hex()[:8])
                with trio.move_on_after(1):
                    await stream.send_all(pack_greeting(REFUSED, ZERO_ID, ZERO_ID, 0))
                await trio.aclose_forcefully(stream)
                return
            moves = session.moves
            sid, token = session.session_id, session.token
            await session.attach(stream, hello.received, label,
                                 lambda got: pack_greeting(RESUMED, sid, token, got))
            self.resumed += 1
            self.moved += session.moves - moves
            logger.info("session %s resumed over %s", sid.hex()[:8], label)
            # Our caller (trio.serve_listeners) closes the transport when we
            # return: not before the session is done with it.
            await session.wait_replaced(stream)
            return
        if len(self._sessions) >= self.max_sessions:
            logger.warning("refused a new session: %d sessions kept", len(self._sessions))
            await trio.aclose_forcefully(stream)
            return
        sid, token = secrets.token_bytes(ID_SIZE), secrets.token_bytes(ID_SIZE)
        session = SessionStream(sid, token, self.config, server=True)
        self._sessions[sid] = session
        try:
            await session.attach(stream, 0, label, lambda got: pack_greeting(NEW, sid, token, got))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.keep)
                try:
                    await serve(session, session)
                finally:
                    await session.aclose()
        finally:
            del self._sessions[sid]
