"""A session: one byte stream that survives the transports carrying it.

Theory of operation
-------------------
:class:`SessionStream` is a trio stream.  The bus runs over it exactly as
over a socket; underneath, the bytes travel in records (:mod:`.wire`) over
whichever transport is attached now -- vchan, TLS, TCP -- and a transport
that fails is replaced without the bus noticing.

Each direction counts payload bytes from the start of the session.  Every
record we send carries how many bytes we have received (a cumulative
acknowledgement); every byte we send stays in the *replay buffer* until the
peer acknowledges it.  When a transport is attached (:meth:`attach`), the
peer has told us how many bytes it received; we resend the rest.  Nothing
is delivered twice (the receiver counts what it has already handed to the
bus and the sender starts exactly there) and nothing is lost (a byte leaves
the replay buffer only once the peer said it has it).

Bytes are delivered to the bus as soon as they are read: "received" means
"handed to the bus", which is what the acknowledgement promises.  A chunk
read from a transport that is no longer the attached one is dropped without
being counted: the peer resends it on the new one.

Interrupting a transport is done by closing it: a task blocked in its
``send_all`` or ``receive_some`` wakes with an error, sees that the transport
is not the attached one any more, and carries on with the new one.  The hot
path therefore has no cancel scope and no lock: ``send_all`` takes a flag
(``_sending``) that only a re-attach contends for.

Liveness: :meth:`keep` (one task per session, run by its owner) sends an
``ACK`` record when we owe an acknowledgement or have sent nothing for
``keepalive_interval``, and declares the transport dead when nothing arrived
for ``keepalive_timeout`` (a cut link where no reset ever comes).  On a
server it also forgets a session left without a transport for
``resume_timeout``.

Bounds: the replay buffer holds at most ``replay_limit`` bytes (a writer
waits for acknowledgements beyond it, as it would for a full socket); a
record's payload is at most :data:`~.wire.MAX_RECORD`; an acknowledgement
beyond what we sent, an unknown record kind or a malformed header ends the
session with :class:`~meshlink.RemoteProtocolError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..errors import ConnectionLost, RemoteProtocolError, SessionLost
from ..transport.nowait import NowaitSender, nowait_sender
from .wire import ACK, DATA, END, HEADER, HEADER_SIZE, MAX_RECORD

__all__ = ["SessionConfig", "SessionStream"]

logger = logging.getLogger("meshlink.session")

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Timers and bounds of a session (each end chooses its own).

    Attributes:
        keepalive_interval: seconds of silence after which we send an ``ACK``
            record, so the peer knows the transport still works.
        keepalive_timeout: seconds without any byte from the peer after which
            the transport is declared dead and replaced (a cut link that never
            resets).
        resume_timeout: client: how long to keep trying to resume before
            callers get :class:`~meshlink.SessionLost`; server: how long a
            session without a transport is kept for its client to come back.
        replay_limit: bytes sent and not yet acknowledged that we keep for
            resending; a writer waits beyond it.
        backoff_min: first pause between resume attempts (seconds).
        backoff_max: longest pause between resume attempts.
        upgrade_interval: client: how often a session not on vchan looks for
            a co-located (vchan) endpoint to move to; ``None`` never looks.
    """

    keepalive_interval: float = 2.0
    keepalive_timeout: float = 6.0
    resume_timeout: float = 30.0
    replay_limit: int = 2 * 1024 * 1024
    backoff_min: float = 0.05
    backoff_max: float = 2.0
    upgrade_interval: float | None = 5.0

    def __post_init__(self) -> None:
        for name in ("keepalive_interval", "keepalive_timeout", "resume_timeout",
                     "backoff_min", "backoff_max"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.keepalive_timeout <= self.keepalive_interval:
            raise ValueError("keepalive_timeout must be longer than keepalive_interval")
        if self.replay_limit < 64 * 1024:
            raise ValueError("replay_limit must be at least 64 KiB")
        if self.upgrade_interval is not None and not self.upgrade_interval > 0:
            raise ValueError("upgrade_interval must be positive or None")


class SessionStream(trio.abc.Stream):
    """One session's byte stream over replaceable transports (see the module doc).

    Args:
        session_id: the 16-byte id both ends know the session by.
        token: the 16-byte secret a resumer must present.
        config: timers and bounds.
        server: True on the end that accepted the session (it forgets a
            session left detached for ``resume_timeout``).

    Attributes:
        transport: the attached transport, or None while detached.
        label: what the attached transport is (``"vchan"``, ``"tls"``, ``"tcp"``).
        resumes: times a transport was attached after the first.
        moves: resumes onto a transport of another kind.
        detached: set while no transport is attached (the client's resume
            driver waits on it).
    """

    def __init__(self, session_id: bytes, token: bytes, config: SessionConfig, *,
                 server: bool) -> None:
        self.session_id = session_id
        self.token = token
        self._cfg = config
        self._server = server
        self.transport: trio.abc.Stream | None = None
        self.label = ""
        self.resumes = 0
        self.moves = 0
        self._attached_once = False
        # outgoing: bytes [_base, _sent) are in _replay; [_base, _written)
        # went out on the attached transport.
        self._replay = bytearray()
        self._base = 0
        self._sent = 0
        self._written = 0
        self._room = trio.lowlevel.ParkingLot()
        self._room_waiters = 0  # plain counts: ParkingLot.__bool__ is a Python call
        self._send_waiters = 0
        self._sending = False
        self._send_lot = trio.lowlevel.ParkingLot()
        # incoming
        self._received = 0
        self._acked_out = 0
        self._ack_every = config.replay_limit // 4
        self._header = bytearray()
        self._remaining = 0
        self._partial = False  # a record is cut across chunks (_header or _remaining)
        self._peer_ended = False
        self._rx_halt = False  # peer ended or _over: one flag for the receive path
        # Activity: the keeper notices silence by these not moving, so the hot
        # path reads no clock.  The payload counts (_received, _sent) move with
        # every DATA record; these count the rest: chunks the slow receive
        # path read (ACK records among them) and records that did not add to
        # _sent (ACKs, resends).
        self._rx_chunks = 0
        self._tx_records = 0
        # lifecycle
        self._attached_lot = trio.lowlevel.ParkingLot()
        self._kick = trio.Event()
        self._dead: list[trio.abc.Stream] = []
        self._detached_at: float | None = None
        self.detached = trio.Event()
        self.detached.set()
        self._lost: BaseException | None = None
        self._closed = False
        self._over = False  # lost or closed: one flag for the hot paths
        self._limit = config.replay_limit
        # The attached transport's all-or-nothing write, if it has one
        # (vchan's try_send_whole): try_send then writes whole records or nothing.
        self._t_whole: Callable[[bytes], int] | None = None
        # Its receive_some() with the default size bound, if it has one
        # (vchan's bind_receive): a frame less on every resumption of a wait.
        self._t_recv: Callable[[], Awaitable[bytes | bytearray]] | None = None
        # Otherwise its non-waiting write, if it has one (a socket): try_send
        # writes what the socket takes, and the rest of a record that did not
        # fit whole is the tail, finished by the keeper (see try_send).
        self._t_write: NowaitSender | None = None
        self._tail: bytes | None = None

    # --- state ----------------------------------------------------------------

    @property
    def lost(self) -> BaseException | None:
        """Why the session ended for good (None while it lives)."""
        return self._lost

    @property
    def received(self) -> int:
        """Payload bytes received in this session (what a resume greeting reports)."""
        return self._received

    @property
    def unacknowledged(self) -> int:
        """Bytes we sent that the peer has not acknowledged (the replay buffer)."""
        return self._sent - self._base

    def _broken(self) -> trio.BrokenResourceError:
        assert self._lost is not None
        err = SessionLost(str(self._lost))
        err.__cause__ = self._lost
        return err

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this session was closed")
        if self._lost is not None:
            raise self._broken()

    def lose(self, exc: BaseException) -> None:
        """End the session for good: every waiter and later call raises
        :class:`~meshlink.SessionLost` (``exc`` chained).  Idempotent."""
        if self._lost is not None or self._closed:
            return
        self._lost = exc
        self._over = self._rx_halt = True
        logger.info("session %s lost: %s", self.session_id.hex()[:8], exc)
        self._drop_transport()
        self._wake()

    def _wake(self) -> None:
        self._attached_lot.unpark_all()
        self._room.unpark_all()
        self._send_lot.unpark_all()
        self._kick.set()

    def _drop_transport(self) -> None:
        t = self.transport
        if t is not None:
            self.transport = None
            self._t_whole = None
            self._t_recv = None
            self._t_write = None
            self._dead.append(t)
            self._detached_at = trio.current_time()
            self.detached.set()

    def transport_failed(self, t: trio.abc.Stream, why: BaseException | str) -> None:
        """``t`` broke (or was cut): detach it, unless another transport replaced it already."""
        if t is not self.transport:
            return
        logger.info("session %s: %s transport failed: %s", self.session_id.hex()[:8],
                    self.label, why)
        self._drop_transport()
        self._kick.set()

    def detach(self) -> None:
        """Stop using the attached transport now (before resuming elsewhere).

        From this moment no byte read from it counts, so the count we send
        in the next greeting is final.
        """
        t = self.transport
        if t is not None:
            self.transport_failed(t, "moving to another transport")

    # --- attaching ---------------------------------------------------------------

    async def attach(self, transport: trio.abc.Stream, peer_received: int, label: str,
                     preamble: Callable[[int], bytes] | None = None) -> None:
        """Make ``transport`` the session's transport; resend what the peer lacks.

        Args:
            transport: a transport whose greeting is done.
            peer_received: payload bytes the peer says it has received.
            label: what ``transport`` is, for ``conn.transport`` and the logs.
            preamble: called with our received count; its bytes go out first
                (the server's reply, which must carry the final count).

        Raises:
            RemoteProtocolError: ``peer_received`` is more than we sent or
                less than what it acknowledged already (the session is lost).
            SessionLost, trio.ClosedResourceError: the session is over.
        """
        self._check()
        if not self._base <= peer_received <= self._sent:
            exc = RemoteProtocolError(
                f"peer resumes at byte {peer_received}, we sent {self._sent} and "
                f"{self._base} are acknowledged")
            self.lose(exc)
            raise exc
        old = self.transport
        if old is not None:
            self.transport_failed(old, "replaced by a new transport")
        # Close the dead ones now: a send blocked on one of them wakes up and
        # releases the send flag.
        await self._close_dead()
        await self._acquire_send()
        try:
            self._check()
            self._ack_in(peer_received)
            self._header.clear()
            self._remaining = 0
            self._partial = False
            self.transport = transport
            self._t_whole = getattr(transport, "try_send_whole", None)
            bind = getattr(transport, "bind_receive", None)
            self._t_recv = None if bind is None else bind()
            self._t_write = None if self._t_whole is not None else nowait_sender(transport)
            self._tail = None
            self._written = peer_received
            if self._attached_once:
                self.resumes += 1
                if label != self.label:
                    self.moves += 1
            self._attached_once = True
            self.label = label
            self._detached_at = None
            self.detached = trio.Event()
            self._rx_chunks += 1  # a fresh transport counts as heard from
            self._attached_lot.unpark_all()
            if preamble is not None:
                head = preamble(self._received)
                try:
                    await transport.send_all(head)
                except _TRANSPORT_ERRORS as exc:
                    self.transport_failed(transport, exc)
                    return
            await self._flush(transport, None)
        finally:
            self._release_send()

    async def wait_replaced(self, transport: trio.abc.Stream) -> None:
        """Wait until ``transport`` no longer carries the session (it failed, was
        replaced, or the session ended).  Whoever accepted it keeps it open until then."""
        while self.transport is transport and not self._closed and self._lost is None:
            await self.detached.wait()

    async def _close_dead(self) -> None:
        while self._dead:
            await trio.aclose_forcefully(self._dead.pop())

    # --- sending ---------------------------------------------------------------------

    async def _acquire_send(self) -> None:
        while self._sending:
            self._send_waiters += 1
            try:
                await self._send_lot.park()
            finally:
                self._send_waiters -= 1
        self._sending = True

    def _release_send(self) -> None:
        self._sending = False
        if self._send_waiters:
            self._send_lot.unpark()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as part of the session (kept for replay until acknowledged).

        Returns once the bytes are in the replay buffer and, if a transport is
        attached, written to it; while detached it returns at once (the bytes
        go out on the next transport).

        Raises:
            SessionLost: the session ended for good (a ``BrokenResourceError``).
            trio.ClosedResourceError: this end closed the session.

        Backpressure:
            Waits while ``replay_limit`` bytes are unacknowledged.
        """
        if self._over:
            self._check()
        size = len(data)
        if not size:
            await trio.lowlevel.checkpoint()
            return
        replay = self._replay
        while replay and len(replay) + size > self._limit:
            self._room_waiters += 1
            try:
                await self._room.park()
            finally:
                self._room_waiters -= 1
            self._check()
        replay += data  # in place: the same bytearray as self._replay
        sent = self._sent = self._sent + size
        t = self.transport
        if t is None or self._sending:
            # Detached (the next attach replays it), or whoever holds the flag
            # (a re-attach, a keepalive) writes it before letting go.
            await trio.lowlevel.checkpoint()
            return
        self._sending = True
        try:
            if self._written + size == sent and size <= MAX_RECORD and type(
                    data) is not memoryview:
                # The common case, inline: one record, nothing else pending.
                self._written = sent
                received = self._acked_out = self._received
                try:
                    await t.send_all(HEADER.pack(DATA, size, received) + data)
                except _TRANSPORT_ERRORS as exc:
                    self.transport_failed(t, exc)
                    return
                if self._written != self._sent and t is self.transport:
                    await self._flush(t, None)  # appended while we wrote
            else:
                await self._flush(t, data)
        finally:
            self._sending = False  # _release_send, inline (hot path)
            if self._send_waiters:
                self._send_lot.unpark()

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send all of ``data`` now, without waiting, or none of it.

        For a writer with a queue of its own (the bus writes a small frame
        from the task that made it).  It takes the bytes when nothing else is
        pending, the replay buffer has room, and the attached transport can
        write without waiting; they are then kept for replay as with
        :meth:`send_all`:

        * a transport with an all-or-nothing write (vchan's
          ``try_send_whole``): the whole record is written, or nothing is;
        * a socket: its non-blocking write takes the record, or part of it.
          The rest (the *tail*) must go out before any other byte, so the
          send flag stays taken and :meth:`keep` writes the tail, and then
          whatever :meth:`send_all` queued meanwhile.  This needs the keeper
          running, as acknowledgements already do.

        A transport that breaks during the write is detached and the bytes go
        out again after the resume.

        Returns:
            ``len(data)``, or 0 when nothing was sent (then use :meth:`send_all`).

        Raises:
            SessionLost: the session ended for good.
            trio.ClosedResourceError: this end closed the session.
        """
        if self._over:
            self._check()
        size = len(data)
        if (self._sending or self._written != self._sent or not size
                or size > MAX_RECORD or len(self._replay) + size > self._limit):
            return 0
        whole = self._t_whole
        if whole is None:
            return self._try_write(data) if self._t_write is not None else 0
        received = self._received
        try:
            if not whole(HEADER.pack(DATA, size, received) + data):
                return 0
        except _TRANSPORT_ERRORS:
            return 0  # nothing was written; send_all meets the error and handles it
        self._acked_out = received
        self._replay += data
        self._sent = self._written = self._sent + size
        return size

    def _try_write(self, data: bytes | bytearray | memoryview) -> int:
        """:meth:`try_send` over a socket (checks done): the record, or its start."""
        write = self._t_write
        t = self.transport
        assert write is not None and t is not None
        received = self._received
        record = HEADER.pack(DATA, len(data), received) + data
        try:
            n = write(record)
        except _TRANSPORT_ERRORS as exc:
            n = 0
            self.transport_failed(t, exc)
        if not n:  # nothing left us: as if never called
            return 0
        self._acked_out = received
        size = len(data)
        self._replay += data
        self._sent += size
        self._written = self._sent
        self._tx_records += 1
        if n < len(record):
            self._sending = True  # released by _finish_tail once the record is whole
            self._tail = record[n:]
            self._kick.set()
        return size

    async def _finish_tail(self) -> None:
        """Write the rest of a record that :meth:`try_send` started, then what
        queued behind it; release the send flag that the tail held."""
        tail, self._tail = self._tail, None
        if tail is None:
            return
        t = self.transport
        try:
            if t is not None:
                await t.send_all(tail)
                if self._written != self._sent and t is self.transport:
                    await self._flush(t, None)  # send_all calls that found the flag taken
        except _TRANSPORT_ERRORS as exc:
            assert t is not None
            self.transport_failed(t, exc)  # the peer's count decides what is resent
        finally:
            self._release_send()

    async def _flush(self, t: trio.abc.Stream, data: bytes | bytearray | memoryview | None
                     ) -> None:
        """Write bytes ``[_written, _sent)`` to ``t`` in records (caller holds the flag).

        ``data``, when given, is exactly those bytes (the common case: no copy
        out of the replay buffer).
        """
        while self._written < self._sent and t is self.transport:
            start = self._written - self._base
            chunk: bytes | bytearray | memoryview
            if data is None or len(data) != self._sent - self._written:
                # Resending: a copy, since an acknowledgement may trim the
                # buffer while the write waits (an exported view would forbid it).
                chunk = bytes(self._replay[start:start + MAX_RECORD])
            else:
                chunk = bytes(data[:MAX_RECORD]) if len(data) > MAX_RECORD else data
            data = None
            n = len(chunk)
            self._written += n
            self._acked_out = self._received
            try:
                await t.send_all(b"".join((HEADER.pack(DATA, n, self._received), chunk)))
            except _TRANSPORT_ERRORS as exc:
                self.transport_failed(t, exc)
                return
            self._tx_records += 1

    async def _send_record(self, kind: int) -> None:
        """Send one ``ACK`` or ``END`` record (caller does not hold the flag)."""
        t = self.transport
        if t is None or self._sending:
            return  # a data write in progress carries the acknowledgement
        self._sending = True
        try:
            self._acked_out = self._received
            await t.send_all(HEADER.pack(kind, 0, self._received))
            self._tx_records += 1
            if kind != END:
                # send_all calls that found the flag taken left their bytes to us.
                await self._flush(t, None)
        except _TRANSPORT_ERRORS as exc:
            self.transport_failed(t, exc)
        finally:
            self._release_send()

    async def wait_send_all_might_not_block(self) -> None:
        """Return at once: ``send_all`` only waits for the replay buffer's room."""
        await trio.lowlevel.checkpoint()

    # --- receiving -----------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive the session's next bytes; ``b""`` once the peer ended the session.

        Waits across transport changes: a failing transport is not an error
        here, only the end of the session is.

        Args:
            max_bytes: at most this many bytes; by default, what the attached
                transport reads by default (a vchan: up to its ring; a socket:
                64 KiB, which costs less than a larger read, see
                docs/performance.md).

        Raises:
            SessionLost: the session ended for good (a ``BrokenResourceError``).
            trio.ClosedResourceError: this end closed the session.
            RemoteProtocolError: the peer sent a malformed record (the session
                is lost).
        """
        while True:
            t = self.transport
            if t is None or self._rx_halt:
                if self._peer_ended:
                    await trio.lowlevel.checkpoint()
                    return b""
                if self._over:
                    self._check()
                if t is None:
                    await self._attached_lot.park()
                    continue
            recv = self._t_recv
            try:
                if recv is not None and max_bytes is None:
                    chunk = await recv()
                else:
                    chunk = await t.receive_some(max_bytes)
            except _TRANSPORT_ERRORS as exc:
                self.transport_failed(t, exc)
                continue
            if t is not self.transport:
                continue  # read from a transport we left: the peer resends it
            if len(chunk) > HEADER_SIZE and not self._partial:
                # The common case: the chunk is exactly one whole DATA record.
                # _ack_in and _count_in, inline (hot path); the keeper sees
                # the activity in _received.
                kind, length, ack = HEADER.unpack_from(chunk)
                if kind == DATA and length == len(chunk) - HEADER_SIZE:
                    if ack > self._base:
                        if ack > self._sent:
                            bad = RemoteProtocolError(
                                f"peer acknowledges byte {ack}, we sent only {self._sent}")
                            self.lose(bad)
                            raise bad
                        del self._replay[:ack - self._base]
                        self._base = ack
                        if self._room_waiters:
                            self._room.unpark_all()
                    received = self._received = self._received + length
                    if received - self._acked_out >= self._ack_every:
                        self._kick.set()
                    return chunk[HEADER_SIZE:]
            if not chunk:
                self.transport_failed(t, "end of stream without an END record")
                continue
            self._rx_chunks += 1
            try:
                data = self._parse(chunk)
            except RemoteProtocolError as exc:
                self.lose(exc)
                raise
            if data:
                return data

    def _parse(self, chunk: bytes | bytearray) -> bytes | bytearray:
        """Strip record headers from ``chunk``; returns the payload bytes in it."""
        n = len(chunk)
        rem = self._remaining
        if rem >= n and not self._header:  # all payload (bulk)
            self._remaining = rem - n
            self._partial = rem > n
            self._count_in(n)
            return chunk
        pieces: list[bytes | bytearray] = []
        i = 0
        header = self._header
        while i < n:
            if rem:
                take = min(rem, n - i)
                pieces.append(chunk[i:i + take])
                rem -= take
                i += take
                continue
            if header or n - i < HEADER_SIZE:
                need = HEADER_SIZE - len(header)
                header += chunk[i:i + need]
                i += need
                if len(header) < HEADER_SIZE:
                    break
                kind, length, ack = HEADER.unpack(header)
                header.clear()
            else:
                kind, length, ack = HEADER.unpack_from(chunk, i)
                i += HEADER_SIZE
            self._ack_in(ack)
            if kind == DATA:
                if not 0 < length <= MAX_RECORD:
                    raise RemoteProtocolError(f"session record of {length} bytes")
                rem = length
            elif kind == ACK or kind == END:
                if length:
                    raise RemoteProtocolError(f"session record kind {kind} with a payload")
                if kind == END:
                    self._peer_ended = self._rx_halt = True
                    break
            else:
                raise RemoteProtocolError(f"unknown session record kind {kind}")
        self._remaining = rem
        self._partial = bool(rem or header)
        data: bytes | bytearray = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._count_in(len(data))
        return data

    def _count_in(self, n: int) -> None:
        self._received += n
        if self._received - self._acked_out >= self._ack_every:
            self._kick.set()  # the keeper acknowledges: the peer's buffer is filling

    def _ack_in(self, ack: int) -> None:
        if ack > self._base:
            if ack > self._sent:
                raise RemoteProtocolError(
                    f"peer acknowledges byte {ack}, we sent only {self._sent}")
            del self._replay[:ack - self._base]
            self._base = ack
            if self._room_waiters:
                self._room.unpark_all()

    # --- liveness -------------------------------------------------------------------

    async def keep(self) -> None:
        """Acknowledge, keep alive, and detect dead transports until the session ends.

        Run it in a task beside whoever uses the session; it returns when the
        session is closed or lost.
        """
        cfg = self._cfg
        seen_rx, seen_tx = -1, -1
        rx_since = tx_since = trio.current_time()
        while not self._closed and self._lost is None:
            with trio.move_on_after(cfg.keepalive_interval / 2):
                await self._kick.wait()
            self._kick = trio.Event()
            await self._close_dead()
            if self._tail is not None:
                await self._finish_tail()
            now = trio.current_time()
            rx = self._rx_chunks + self._received
            if rx != seen_rx:
                seen_rx, rx_since = rx, now
            tx = self._tx_records + self._sent
            if tx != seen_tx:
                seen_tx, tx_since = tx, now
            t = self.transport
            if t is None:
                if (self._server and self._detached_at is not None
                        and now - self._detached_at >= cfg.resume_timeout):
                    self.lose(ConnectionLost(
                        f"the client did not resume within {cfg.resume_timeout} s"))
                continue
            if now - rx_since >= cfg.keepalive_timeout:
                self.transport_failed(t, f"nothing received for {cfg.keepalive_timeout} s")
                continue
            if self._received != self._acked_out or now - tx_since >= cfg.keepalive_interval:
                await self._send_record(ACK)
        await self._close_dead()

    # --- closing ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """End the session: tell the peer (an ``END`` record, best effort) and close
        the transport.  The peer reads end of stream after our data.  Idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        t = self.transport
        if t is not None and self._lost is None and (self._tail is not None
                                                     or not self._sending):
            # Bounded and shielded: the bus closes its stream from a cancelled
            # scope, and a peer that never hears END keeps the session for
            # resume_timeout.  A record try_send started is finished first.
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self._finish_tail()
                await self._send_record(END)
        self._closed = True
        self._over = self._rx_halt = True
        self._drop_transport()
        self._wake()
        with trio.CancelScope(shield=True):
            await self._close_dead()
