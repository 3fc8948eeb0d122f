"""Blocking calls to a meshlink service, for code that does not run trio.

``meshlink.connect_blocking(name)`` finds the service as
:func:`meshlink.connect` does and returns a :class:`BlockingConnection`:
``call``, ``notify`` and ``close`` are ordinary functions that return when
their work is done.  It is for scripts, threads and frameworks without an
event loop, and for many small client processes: a call costs no scheduler
pass and no task switch.

Theory of operation
-------------------
*Finding the service.*  The name is resolved by the same
:class:`resolver.Resolver`, under the same :class:`resolver.Policy`, and the
endpoints are tried in the same order (vchan, then TLS, then TCP when
allowed).  The same rule holds for refusals: an :class:`~meshlink.AuthError`
ends the attempt at once, and never falls back to a weaker transport.  The
resolver and the vchan rendezvous are trio code; each runs in a short
``trio.run`` of its own, and nothing of trio is left running afterwards.

*Transports.*  On vchan the rings are driven from the calling thread: the
copies are C (``native/vchan_ring.c``), and a wait first polls the ring for
a short, adaptive time (as :class:`~meshlink.transport.vchan.VchanStream`
does), then sleeps in ``poll(2)`` with the GIL released
(``native/vchan_wait.c``).  A call's common case is two C calls: one looks
that the connection is idle (nothing has come in, the server is alive), the
other writes the whole request and waits for the reply.  A reply that came
alone and whole is decoded by :meth:`BusProtocol.take_reply
<meshlink.bus.proto.BusProtocol.take_reply>`; anything else (a ping, a
request larger than the free ring, a slow reply) goes the general way.
Under load that common case is most of the client's CPU: it went from
about 830 to 350 bytecodes per call (``docs/performance.md``, section 4).
TLS and TCP are standard library sockets, verified as
:func:`meshlink.connect` verifies them (the server's certificate must name
the service).

*The bus.*  Over the transport runs the bus's sans-io core
(:class:`~meshlink.bus.proto.BusProtocol`), with no task of its own: a call
writes its request, then reads until its reply is in.  Whatever else
arrives meanwhile is answered on the spot: a ping gets a pong, notify credit
is counted, a request from the server gets ``MethodNotFound``, a
subscription is accepted (nothing is ever published on it).  The server's
heartbeat (a ping every 5 s) keeps a long call alive.

What it leaves out, and why:

* **No session.**  The connection is one transport.  If it fails during a
  call, the call raises :class:`~meshlink.ConnectionLost`: the request may
  have run, so it is never sent again.  The next call opens a new connection.
* **Nothing runs between calls.**  Nobody answers the server's pings while
  no call runs, so a server ends a connection left idle past its heartbeat
  timeout (15 s by default).  The next call then opens a new one; a call
  never starts on a connection known to be closed.
* **No pub/sub, streams or handlers of our own.**  Those need tasks; use
  :func:`meshlink.connect`.
* **vchan through the host store only** (a server on the same host).  vchan
  over Xen or ivshmem needs the async client.

One thread at a time: a connection is not locked.  Give each thread its own.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Protocol

from resolver import Endpoint, HostStore, InvalidName, Policy, Resolver

from ._native import ffi, lib
from .bus.config import BusConfig
from .bus.errors import RemoteError
from .bus.events import (
    NEED_DATA,
    Cancel,
    Channel,
    Close,
    ConnectionClosed,
    Credit,
    Error,
    Event,
    Hello,
    Ping,
    Pong,
    StreamOpen,
    StreamReset,
    Subscribe,
    Subscribed,
)
from .bus.proto import BusProtocol
from .errors import (
    AuthError,
    ConnectionLost,
    HandshakeError,
    LocalProtocolError,
    MeshlinkError,
    RemoteProtocolError,
    resolver_errors,
)
from .service import ATTEMPT_TIMEOUT, plaintext_allowed
from .transport.dial import ATTEMPT_ERRORS, Attempts, dial_vchan, note_fingerprint
from .transport.doorbell import Doorbell
from .transport.tls import TLSConfig, ssl_reason
from .transport.vchan.ring import VchanRing
from .transport.vchan.stream import MAX_READ_SPIN, MIN_READ_SPIN, READ_SPIN_FACTOR, SPIN_SECONDS

ML_ETIMEDOUT: Final = lib.ML_ETIMEDOUT
ML_ENOROOM: Final = lib.ML_ENOROOM

__all__ = ["BlockingConnection", "connect_blocking"]

logger = logging.getLogger("meshlink.connect")

#: What this client speaks (announced in its hello; informational in version 2).
FEATURES: Final = ("rpc", "cancel", "notify", "heartbeat")
#: Bytes asked of a socket per read.
_READ_SIZE: Final = 256 * 1024
#: The reader spins as VchanStream's does (see its _read_spin_budget): a
#: multiple of its recent waits, within bounds, and not at all when the peer
#: usually takes longer than the cap; a writer waiting for room, SPIN_SECONDS.
_SPIN_FACTOR: Final = READ_SPIN_FACTOR
_MIN_SPIN: Final = MIN_READ_SPIN
_MAX_SPIN: Final = MAX_READ_SPIN
_WRITE_SPIN: Final = SPIN_SECONDS
#: A wait in C returns to Python at least this often (ms).  A signal that
#: arrives while it spins, or between arming and poll(2), does not interrupt
#: the poll; Python runs its handler (Ctrl-C) only once the call returns.
_SLICE_MS: Final = 100


def _nothing() -> None:
    """The ``pump`` of a write that must not read meanwhile."""


def _remaining(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic``), never negative; None: no limit."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class _Pipe(Protocol):
    """One open transport, driven from the calling thread."""

    scheme: str

    def write(self, data: bytes, deadline: float | None, pump: Callable[[], None]) -> None:
        """Write all of ``data``; ``pump`` reads what came in while it waits."""

    def read(self, deadline: float | None) -> bytes:
        """Wait for bytes: ``b""`` at end of stream; TimeoutError at ``deadline``."""

    def check(self) -> None:
        """Raise ConnectionLost if the peer is known to be gone (no bytes read)."""

    def idle(self) -> bool:
        """True when a call may go out without a look first: nothing has
        come in, the peer is there (False: :meth:`check` and read first)."""

    def exchange(self, data: bytes, timeout: float | None) -> bytes | None:
        """Write ``data`` (one whole frame) and wait, briefly, for bytes back.

        Returns:
            The bytes that came; ``b""`` when none came yet (go on with
            :meth:`read`); None when nothing was written (write with :meth:`write`).
        """

    def read_now(self) -> bytes | None:
        """Bytes that are there now (``b""``: end of stream), or None."""

    def close(self) -> None:
        """Release the transport.  Idempotent."""


class _VchanPipe:
    """A vchan end driven without trio: the ring in C, waits in ``poll(2)``."""

    scheme = "vchan"

    def __init__(self, ring: VchanRing, bell: Doorbell) -> None:
        self._ring = ring
        self._bell = bell
        self._wait_avg = _MIN_SPIN
        self._closed = False
        self._size = ring.read_size
        self._buf = ffi.new("char[]", self._size)  # what read_wait copies into
        self._wait_fd = bell.wait_fd
        self._ack_fd = bell.ack_fd
        self._live_fd = bell.live_fd

    def write(self, data: bytes, deadline: float | None, pump: Callable[[], None]) -> None:
        ring = self._ring
        view = memoryview(data)
        while True:
            if self._bell.peer_dead or ring.peer_live() != 1:
                raise ConnectionLost("the vchan peer closed the connection")
            n = ring.write(view)
            view = view[n:]
            if not view:
                return
            if n:
                continue
            # Full: the peer may be waiting for us to read before it reads on.
            pump()
            end = time.perf_counter() + _WRITE_SPIN
            while ring.buffer_space() == 0 and time.perf_counter() < end:
                pass
            if ring.buffer_space() or ring.arm_write() > 0:
                continue
            if not self._bell.wait_blocking(timeout=_remaining(deadline)):
                raise TimeoutError("timed out waiting for room in the vchan ring")

    def idle(self) -> bool:
        return self._ring.idle(self._live_fd)

    def exchange(self, data: bytes, timeout: float | None) -> bytes | None:
        # One C call writes the request and waits for the reply (a call's
        # common case): what write() and read() do, without their Python.
        avg = self._wait_avg
        spin = 0.0 if avg > _MAX_SPIN else max(_MIN_SPIN, min(_MAX_SPIN, _SPIN_FACTOR * avg))
        timeout_ms = _SLICE_MS if timeout is None else min(_SLICE_MS, math.ceil(timeout * 1000))
        started = time.perf_counter()
        n = self._ring.write_wait(data, self._buf, self._size, self._wait_fd, self._ack_fd,
                                  int(spin * 1e9), timeout_ms)
        if n > 0:
            self._wait_avg = avg + (min(time.perf_counter() - started, 2 * _MAX_SPIN) - avg) / 4
            got: bytes = ffi.buffer(self._buf, n)[:]
            return got
        return None if n == ML_ENOROOM else b""

    def check(self) -> None:
        """Raise ConnectionLost if the peer process is known to be gone."""
        if self._bell.look_for_death() and not self._ring.data_ready():
            raise ConnectionLost("vchan peer process died without closing")

    def read_now(self) -> bytes | None:
        ring = self._ring
        data = ring.read_bytes(ring.read_size)
        if data:
            return data
        live = ring.peer_live()
        if live == 0 and not ring.data_ready():
            return b""  # a clean close, after everything written before it
        if live != 1 or self._bell.peer_dead:
            if ring.data_ready():
                return ring.read_bytes(ring.read_size)
            raise ConnectionLost("vchan peer process died without closing")
        return None

    def read(self, deadline: float | None) -> bytes:
        ring = self._ring
        started = time.perf_counter()
        avg = self._wait_avg
        # Waking a sleeping process costs more than a short poll here.
        spin = 0.0 if avg > _MAX_SPIN else max(_MIN_SPIN, min(_MAX_SPIN, _SPIN_FACTOR * avg))
        spin_ns = int(spin * 1e9)
        data: bytes
        while True:
            left = _remaining(deadline)
            timeout_ms = _SLICE_MS if left is None else min(_SLICE_MS, math.ceil(left * 1000))
            # The whole wait in C, without the GIL: spin, arm, poll, acknowledge.
            n = ring.read_wait(self._buf, self._size, self._bell.wait_fd, self._bell.ack_fd,
                               spin_ns, timeout_ms)
            if n > 0:
                data = ffi.buffer(self._buf, n)[:]
                break
            if n == ML_ETIMEDOUT:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("timed out waiting for the vchan peer")
                spin_ns = 0
                continue  # a slice ended: Python runs any signal handler that is due
            # Nothing to read but something to look at: its end, or its death.
            self._bell.look_for_death()
            data_now = self.read_now()
            if data_now is not None:
                data = data_now
                break
            spin_ns = 0
        # One long idle wait is forgotten within a few quick exchanges.
        sample = min(time.perf_counter() - started, 2 * _MAX_SPIN)
        self._wait_avg += (sample - avg) / 4
        return data

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ring.close()  # clears our live byte and signals the peer
            self._bell.close()
            self._ring.free()


class _SocketPipe:
    """A TCP or TLS connection as a standard library socket."""

    def __init__(self, sock: socket.socket, scheme: str) -> None:
        self._sock = sock
        self.scheme = scheme

    def write(self, data: bytes, deadline: float | None, pump: Callable[[], None]) -> None:
        self._sock.settimeout(_remaining(deadline))
        self._sock.sendall(data)  # the kernel buffers; the server's reader runs on

    def read(self, deadline: float | None) -> bytes:
        self._sock.settimeout(_remaining(deadline))
        return self._sock.recv(_READ_SIZE)

    def check(self) -> None:
        """Nothing to do: a closed socket reads as EOF in :meth:`read_now`."""

    def idle(self) -> bool:
        return False  # read_now looks, with one poll(2)

    def exchange(self, data: bytes, timeout: float | None) -> None:
        return None  # write() and read() are already one system call each

    def read_now(self) -> bytes | None:
        sock = self._sock
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            ready = select.poll()
            ready.register(sock.fileno(), select.POLLIN)
            if not ready.poll(0):
                return None
        sock.settimeout(0.0)
        try:
            return sock.recv(_READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None  # readable, but not a whole TLS record yet

    def close(self) -> None:
        self._sock.close()


def _dial_vchan(ep: Endpoint, store: HostStore, timeout: float) -> _Pipe:
    if ep.via == "ivshmem" or ep.domid is not None:
        raise LocalProtocolError("vchan over Xen or ivshmem needs meshlink.connect "
                                 "(the blocking client drives host store rings only)")
    import trio

    async def dial() -> tuple[VchanRing, Doorbell]:
        with trio.fail_after(timeout):
            stream = await dial_vchan(ep, store)
        return stream.detach()

    ring, bell = trio.run(dial)
    return _VchanPipe(ring, bell)


def _dial_socket(ep: Endpoint, tls: TLSConfig | None, name: str, timeout: float) -> _Pipe:
    if ep.scheme == "tls" and (tls is None or not tls.can_connect):
        raise LocalProtocolError("TLS endpoint but no CA configured (tls= or MESHLINK_TLS_CA)")
    sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ep.scheme != "tls":
            return _SocketPipe(sock, "tcp")
        assert tls is not None
        try:
            wrapped = tls.client_context().wrap_socket(sock, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            raise AuthError(f"server certificate refused: {ssl_reason(exc)}") from exc
        except ssl.SSLError as exc:
            raise AuthError(f"TLS handshake refused: {ssl_reason(exc)}") from exc
        note_fingerprint(ep, name, wrapped.getpeercert(binary_form=True))
        return _SocketPipe(wrapped, "tls")
    except BaseException:
        sock.close()
        raise


#: What a failed transport raises as itself (RingCorruptError is a
#: RemoteProtocolError); other OS errors become ConnectionLost.  TimeoutError
#: is one too: a write cut short by it leaves the stream out of step.
_BROKEN = (TimeoutError, ConnectionLost, RemoteProtocolError)


class BlockingConnection:
    """A bus connection to one service, used from one thread without trio.

    Made by :func:`connect_blocking`.  Use it as a context manager, or call
    :meth:`close`.

    Attributes:
        name: the service name.
        transport: what carries the connection now: ``"vchan"``, ``"tls"`` or
            ``"tcp"``.
        reconnects: connections opened again after the server ended one
            (between calls: an idle connection, a restarted server).
    """

    def __init__(self, name: str, open_one: Callable[[], tuple[_Pipe, BusProtocol]],
                 config: BusConfig) -> None:
        self.name = name
        self._open_one = open_one
        self._cfg = config
        self._pipe: _Pipe | None = None
        self._proto: BusProtocol | None = None
        self._closed = False
        self.reconnects = 0
        self.transport = ""
        self._next_id = 0
        self._waiting = -1
        self._outcome: tuple[bool, Any] | None = None
        self._notify_sent = 0  # notify bytes the server has not credited back
        self._notify_window = 1
        self._out = bytearray()  # control frames to send (pongs, credit, refusals)
        self._pong_queued = False
        self._peer_gone = False  # the server ended this connection (close frame or EOF)
        self._open()

    # --- opening and closing -------------------------------------------------------

    def _open(self) -> None:
        pipe, proto = self._open_one()
        self._pipe, self._proto = pipe, proto
        self.transport = pipe.scheme
        assert proto.peer_hello is not None
        self._notify_window = proto.peer_hello.notify_window
        self._notify_sent = 0
        self._peer_gone = False
        self._out.clear()

    def _drop(self) -> None:
        pipe, self._pipe, self._proto = self._pipe, None, None
        if pipe is not None:
            pipe.close()

    def _usable(self) -> tuple[_Pipe, BusProtocol]:
        """The open connection; a new one if the server ended the last one."""
        if self._closed:
            import trio

            raise trio.ClosedResourceError("this connection was closed")
        pipe = self._pipe
        if pipe is not None and not self._peer_gone:
            try:
                if pipe.idle():
                    assert self._proto is not None
                    return pipe, self._proto
                pipe.check()  # a server that crashed since the last call
                self._pump_now()  # a close frame or an EOF waiting for us, pings
            except _BROKEN:
                # The server died, left, or corrupted the ring since the last
                # call; nothing of this call was sent: connect again.
                self._peer_gone = True
        if self._pipe is None or self._peer_gone:
            had = self._pipe is not None
            self._drop()
            self._open()
            if had:
                self.reconnects += 1
                logger.info("%s: connected again over %s", self.name, self.transport)
        assert self._pipe is not None and self._proto is not None
        return self._pipe, self._proto

    def close(self) -> None:
        """Say goodbye to the server (a close frame) and release the transport.

        Idempotent.  A call made afterwards raises ``trio.ClosedResourceError``.
        """
        if self._closed:
            return
        self._closed = True
        pipe, proto = self._pipe, self._proto
        if pipe is not None and proto is not None and not self._peer_gone:
            try:
                pipe.write(proto.send(Close()), time.monotonic() + self._cfg.close_timeout,
                           _nothing)
            except (OSError, MeshlinkError):
                pass  # deliberate: best effort; the transport's end tells the server too
        self._drop()

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- calls -----------------------------------------------------------------------

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call ``method(*args)`` on the server and return its result.

        Args:
            method: a method the server registered.
            *args: msgpack-serialisable arguments.
            timeout: seconds to wait for the reply (None: as long as the
                server's heartbeat says it is alive).

        Returns:
            What the handler returned.

        Raises:
            RemoteError: the handler raised, or no method has that name
                (``remote_type == "MethodNotFound"``).
            TimeoutError: ``timeout`` passed; the server is told to cancel the
                handler and its late reply is discarded.
            ConnectionLost: the connection failed before the reply came (the
                handler may have run); or nothing at all came from the server
                for ``heartbeat_timeout``.
            LocalProtocolError: an argument cannot be packed, or the request
                is larger than the server accepts.
            RemoteProtocolError: the server broke the bus protocol (the
                connection is dropped; the next call opens a new one).
            ResolveError, AuthError: a new connection was needed, and it
                could not be made.
            trio.ClosedResourceError: this connection was closed.
        """
        pipe, proto = self._usable()
        deadline = None if timeout is None else time.monotonic() + timeout
        call_id = self._next_id
        self._next_id += 1
        data = proto.pack_request(call_id, method, args)
        got: bytes | None = None
        if not self._out:
            # The common case in one step: write, wait, and a reply that
            # came whole and alone.  Anything else goes on below.
            try:
                got = pipe.exchange(data, timeout)
            except _BROKEN:
                self._peer_gone = True
                raise
            except OSError as exc:
                raise self._lost(exc) from exc
            if got:
                reply = proto.take_reply(got, call_id)
                if reply is not None:
                    return reply[0]
        self._waiting = call_id
        self._outcome = None
        try:
            if got is None:
                self._write(pipe, data, deadline)
            elif got:
                self._feed(pipe, got)
            while self._outcome is None:
                self._pump(pipe, deadline)
        except TimeoutError:
            if self._outcome is None:
                self._cancel(pipe, proto, call_id)
                raise
        finally:
            self._waiting = -1
        ok, value = self._outcome
        self._outcome = None
        if ok:
            return value
        raise value

    def notify(self, method: str, *args: Any) -> None:
        """Run ``method(*args)`` on the server without waiting for it.

        The server runs notifications in the order sent, and a later
        :meth:`call` starts only after them.

        Raises:
            ConnectionLost: the connection failed (the notification may or
                may not have arrived).
            LocalProtocolError: an argument cannot be packed or is too large.
            RemoteProtocolError: the server broke the bus protocol.
            ResolveError, AuthError: a new connection was needed and could
                not be made.
            trio.ClosedResourceError: this connection was closed.

        Backpressure:
            Waits while the server's notify window is full (its handlers are
            behind), reading its credit as it comes.
        """
        pipe, proto = self._usable()
        data = proto.pack_notify(method, args)
        size = len(data)
        while self._notify_sent and self._notify_sent + size > self._notify_window:
            self._pump(pipe, None)
        self._notify_sent += size
        self._write(pipe, data, None)

    def _cancel(self, pipe: _Pipe, proto: BusProtocol, call_id: int) -> None:
        if self._peer_gone:
            return  # half a frame may be out: the next call opens a new connection
        try:
            self._write(pipe, proto.send(Cancel(call_id)),
                        time.monotonic() + self._cfg.close_timeout)
        except (OSError, MeshlinkError):
            pass  # _write marked the connection gone: the timeout is what the caller hears

    # --- the wire ----------------------------------------------------------------------

    def _write(self, pipe: _Pipe, data: bytes, deadline: float | None,
               pump: bool = True) -> None:
        """Write ``data`` after the control frames waiting in ``_out``; while the
        transport is full, read what comes in (``pump``), so that a server
        waiting for us to read does not wait forever."""
        if self._out:
            data = bytes(self._out) + data
            self._out.clear()
            self._pong_queued = False
        try:
            pipe.write(data, deadline, self._pump_now if pump else _nothing)
        except _BROKEN:
            # After a timeout part of a frame may be out: out of step, too.
            self._peer_gone = True
            raise
        except OSError as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: OSError) -> ConnectionLost:
        """The error for a transport that failed; the next call opens another."""
        self._peer_gone = True
        return ConnectionLost(f"connection to {self.name!r} failed: {exc}")

    def _pump(self, pipe: _Pipe, deadline: float | None) -> None:
        """Wait for bytes (until ``deadline``, or the heartbeat timeout) and act on them."""
        limit = time.monotonic() + self._cfg.heartbeat_timeout
        try:
            data = pipe.read(limit if deadline is None else min(deadline, limit))
        except TimeoutError:
            if deadline is not None and deadline <= limit:
                raise
            self._peer_gone = True
            raise ConnectionLost(f"no data from {self.name!r} for "
                                 f"{self._cfg.heartbeat_timeout} s (heartbeat)") from None
        except _BROKEN:
            self._peer_gone = True
            raise
        except OSError as exc:
            raise self._lost(exc) from exc
        self._feed(pipe, data)

    def _pump_now(self) -> None:
        """Act on whatever bytes are there now, without waiting."""
        pipe = self._pipe
        while pipe is not None and not self._peer_gone:
            try:
                data = pipe.read_now()
            except _BROKEN:
                self._peer_gone = True
                raise
            except OSError as exc:
                raise self._lost(exc) from exc
            if data is None:
                return
            self._feed(pipe, data)

    def _feed(self, pipe: _Pipe, data: bytes) -> None:
        proto = self._proto
        assert proto is not None
        proto.receive_data(data)
        try:
            proto.receive_frames(self)
        except RemoteProtocolError:
            self._peer_gone = True
            raise
        if self._peer_gone and self._waiting >= 0 and self._outcome is None:
            raise ConnectionLost(f"{self.name!r} ended the connection before the reply")
        if self._out and not self._peer_gone:
            self._write(pipe, b"", time.monotonic() + self._cfg.close_timeout, pump=False)

    # --- frames from the server (BusProtocol's FrameSink) ------------------------------

    def reply(self, id: int, result: Any) -> None:
        if id == self._waiting:
            self._outcome = (True, result)
        # else: the reply to a call that timed out: discarded

    def error(self, id: int, type: str, message: str) -> None:
        if id == self._waiting:
            self._outcome = (False, RemoteError(type, message))

    def request(self, id: int, method: str, args: list[Any]) -> None:
        assert self._proto is not None
        self._out += self._proto.send(Error(id, "MethodNotFound",
                                            f"the blocking client serves no {method!r}"))

    def notifications(self, batch: list[tuple[str, list[Any], int]], total: int) -> None:
        assert self._proto is not None
        for method, _args, _size in batch:
            logger.debug("%s: notification %r ignored (the blocking client serves nothing)",
                         self.name, method)
        self._out += self._proto.send(Credit(Channel.NOTIFY, total))

    def publish(self, id: int, topic: str, data: Any, size: int) -> None:
        raise RemoteProtocolError(f"publish on subscription {id}, which we never made")

    def stream_data(self, id: int, opened_by_sender: bool, data: Any, size: int) -> None:
        raise RemoteProtocolError(f"data on stream {id}, which is not open")

    def event(self, event: Event) -> None:
        proto = self._proto
        assert proto is not None
        t = type(event)
        if t is Ping:
            if not self._pong_queued:  # one pong answers every ping before it
                assert isinstance(event, Ping)
                self._pong_queued = True
                self._out += proto.send(Pong(event.nonce))
        elif t is Credit:
            assert isinstance(event, Credit)
            if event.channel is Channel.NOTIFY:
                self._notify_sent = max(0, self._notify_sent - event.amount)
        elif t is Subscribe:
            assert isinstance(event, Subscribe)
            self._out += proto.send(Subscribed(event.id))  # nothing is ever published
        elif t is StreamOpen:
            assert isinstance(event, StreamOpen)
            self._out += proto.send(StreamReset(event.id, False, "MethodNotFound",
                                                f"no stream {event.method!r:.80}"))
        elif t is Close or t is ConnectionClosed:
            self._peer_gone = True
        # Pong, Cancel (of a request we refused at once), Unsubscribe, Subscribed,
        # StreamEnd, StreamReset: nothing to do.


class _ClosedBeforeHello(HandshakeError):
    """The server closed the transport before its bus hello."""


def _handshake(pipe: _Pipe, cfg: BusConfig, client_name: str, deadline: float) -> BusProtocol:
    """Exchange hellos; returns the core with the server's hello in."""
    proto = BusProtocol.from_config(cfg, client_name, FEATURES)
    pipe.write(proto.send(proto.our_hello), deadline, _nothing)
    while True:
        ev = proto.next_event()
        if ev is NEED_DATA:
            try:
                proto.receive_data(pipe.read(deadline))
            except TimeoutError as exc:
                raise HandshakeError("no bus hello from the server in time") from exc
            continue
        if isinstance(ev, Hello):
            return proto
        if isinstance(ev, ConnectionClosed):
            raise _ClosedBeforeHello("the server closed the connection before its hello")
        raise RemoteProtocolError(f"unexpected frame before the hello: {ev!r:.80}")


def connect_blocking(
    name: str,
    *,
    host_store: HostStore | str | None = None,
    rules: Any = None,
    zeroconf: Any = None,
    dns: Any = None,
    host_id: str | None = None,
    tls: TLSConfig | None = None,
    require_tls: bool = False,
    allow_plaintext: bool | None = None,
    forbid_vchan: bool = False,
    pin: str | Endpoint | None = None,
    client_name: str = "",
    config: BusConfig | None = None,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
) -> BlockingConnection:
    """Connect to the service ``name``, without trio.

    The arguments are those of :func:`meshlink.connect` that apply here
    (see its documentation): where to look (``host_store``, ``rules``,
    ``zeroconf``, ``dns``, ``host_id``), what is allowed (``tls``,
    ``require_tls``, ``allow_plaintext``, ``forbid_vchan``, ``pin``), our
    name in the hello (``client_name``), bus limits and timers (``config``:
    ``heartbeat_timeout`` bounds a silent server, ``handshake_timeout`` the
    hello) and ``attempt_timeout`` for each transport.  The name is resolved
    again, and the best endpoint chosen again, whenever a new connection is
    needed.

    Returns:
        A :class:`BlockingConnection`, connected.

    Raises:
        ResolveError: no usable endpoint, or every attempt failed (the message
            lists each attempt and why).
        AuthError: an attempt was refused for credentials; no weaker
            transport is tried after it.
        LocalProtocolError: a bad name or pin, or a call from inside a trio
            run (which it would block: use :func:`meshlink.connect` there).
    """
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        pass  # not inside trio: as it should be
    else:
        raise LocalProtocolError("connect_blocking would block the trio run it is called "
                                 "from: use meshlink.connect there")
    if tls is None:
        tls = TLSConfig.from_env()
    cfg = config or BusConfig()
    policy = Policy(require_tls=require_tls, forbid_vchan=forbid_vchan, pin=pin,
                    allow_plaintext=plaintext_allowed(allow_plaintext))
    with resolver_errors():
        resolver = Resolver(host_store=host_store, rules=rules, zeroconf=zeroconf, dns=dns,
                            host_id=host_id, tls_configured=tls is not None and tls.can_connect)
    store = resolver.store

    def open_one() -> tuple[_Pipe, BusProtocol]:
        with resolver_errors():
            try:
                choices = trio.run(resolver.resolve, name, policy)
            except InvalidName:
                raise
            except ValueError as exc:
                raise LocalProtocolError(f"bad pin: {exc}") from exc
        attempts = Attempts(name, f"could not connect to {name!r}", logger)
        for choice in choices:
            ep = choice.endpoint
            try:
                if ep.scheme == "vchan":
                    pipe = _dial_vchan(ep, store, attempt_timeout)
                else:
                    pipe = _dial_socket(ep, tls, name, attempt_timeout)
                try:
                    proto = _handshake(pipe, cfg, client_name,
                                       time.monotonic() + cfg.handshake_timeout)
                except BaseException as exc:
                    pipe.close()
                    if pipe.scheme == "tls" and isinstance(
                            exc, ssl.SSLError | ConnectionResetError | _ClosedBeforeHello):
                        # TLS 1.3 servers refuse a client certificate after the
                        # handshake: an alert, or a close, before the bus hello.
                        raise AuthError("TLS server refused our certificate (or its name "
                                        f"is not in the server's allow list): {exc}") from exc
                    raise
            except ATTEMPT_ERRORS as exc:
                attempts.failed(ep.url, exc)
                continue
            logger.info("%s: connected over %s to %s (%s), blocking", name, ep.scheme,
                        ep.url, choice.reason)
            return pipe, proto
        attempts.all_failed()

    return BlockingConnection(name, open_one, cfg)
