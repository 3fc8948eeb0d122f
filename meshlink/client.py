"""``meshlink.connect``: a service by name, over a session that outlives its transports.

Theory of operation
-------------------
``connect(name)`` resolves the name (:class:`resolver.Resolver`: host store,
rules file, unicast DNS, zeroconf; ranked vchan > tls > tcp) and tries each
endpoint in order (:mod:`meshlink.transport.dial`).  Co-location is proved,
not guessed: a vchan endpoint is ranked only when its advertised host id is
ours, and used only if the vchan handshake succeeds (and the server's uid is
the owner of its record); a failure is logged on ``meshlink.connect`` and the
next endpoint is tried -- except a refusal of credentials
(:class:`~meshlink.AuthError`), which ends the attempt at once: falling back
to a weaker transport after being told "not you" would turn every refusal
into a downgrade.  The bus handshake is part of each attempt, so a TLS server
that refuses our certificate (TLS 1.3 says so only after the handshake) is
also an :class:`~meshlink.AuthError`.

By default the bus runs over a session (:mod:`meshlink.session`), and the
connection survives what clusters do:

* **Resume.** When the transport fails (vchan torn down, TCP reset, a link
  cut: no byte for ``keepalive_timeout``), the name is resolved again and the
  session resumed over the best endpoint allowed *now* (vchan gone: TLS),
  with capped exponential backoff and jitter.  Every frame is delivered once,
  in order; calls in flight are answered after the resume.  After
  ``resume_timeout`` pending and later operations raise
  :class:`~meshlink.SessionLost`.
* **Upgrade.** A session not on vchan looks every ``upgrade_interval`` for a
  co-located endpoint (same host id, vchan published) and moves onto it;
  ``forbid_vchan`` and ``pin`` are respected.
* **Server restarted.** A server that no longer knows the session answers
  with a new one: calls in flight fail with :class:`~meshlink.SessionLost`
  (never re-sent: the server may have run them), subscriptions made through
  the connection are made again on the new session, and ``on_new_session``
  is called so the application can re-sync.

``conn.transport`` says what carries the session now; ``conn.resumes`` and
``conn.moves`` count what happened, and every resume and move is logged on
``meshlink.connect``.  A clean close by the server (its bus close frame) ends
the connection: that is a goodbye, not a failure.

Alternatives rejected: racing all endpoints at once (happy eyeballs) would
open TCP connections that the policy says must not be made when a better
transport works; endpoints are tried one at a time, each bounded by
``attempt_timeout``.  Re-sending a call after the server restarted would run
it twice whenever the first run had happened; the caller decides instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import trio

from resolver import (
    Choice,
    DnsConfig,
    Endpoint,
    HostStore,
    InvalidName,
    Policy,
    Resolver,
    ZeroconfConfig,
)

from .bus import BusConfig, Connection, Handlers
from .bus.pubsub import Subscription
from .bus.streams import MessageStream
from .client_session import OnNewSession, SessionDriver
from .errors import (
    AuthError,
    ConnectionLost,
    LocalProtocolError,
    SessionLost,
    resolver_errors,
)
from .service import ATTEMPT_TIMEOUT, plaintext_allowed
from .session import SessionConfig, SessionStream, greet
from .transport.dial import dial, open_first
from .transport.tls import TLSConfig, ssl_reason

__all__ = ["MeshConnection", "connect"]

logger = logging.getLogger("meshlink.connect")

class MeshConnection:
    """A connection made by :func:`connect`: the bus calls of
    :class:`~meshlink.bus.Connection`, over a session that survives its transports.

    ``call``, ``notify``, ``publish`` and ``open_stream`` are the current bus
    connection's own methods (see :class:`~meshlink.bus.Connection` for
    their arguments, errors and backpressure), re-bound when a restarted
    server gives us a new session.

    Attributes:
        service: the service name connected to.
        endpoint: the endpoint in use (the latest one after a resume).
        choice: the ranking's choice for it, with the reason.
        session: the session under the bus (None with ``resume=False``).
        sessions: sessions opened so far (more than 1 after server restarts).
    """

    call: Callable[..., Awaitable[Any]]
    notify: Callable[..., Awaitable[None]]
    publish: Callable[[str, Any], Awaitable[None]]
    open_stream: Callable[..., AbstractAsyncContextManager[MessageStream]]

    def __init__(self, service: str, bus: Connection, session: SessionStream | None,
                 choice: Choice) -> None:
        self.service = service
        self.session = session
        self.choice = choice
        self.endpoint = choice.endpoint
        self.sessions = 1
        self._past_resumes = 0
        self._past_moves = 0
        self._subs: set[_Resubscription] = set()
        self._error: BaseException | None = None
        self._ended = trio.Event()
        self._closing = False
        self._replacing = False
        self._new_bus = trio.Event()
        self._bind(bus)

    def _bind(self, bus: Connection) -> None:
        self.bus = bus
        self.call = bus.call
        self.notify = bus.notify
        self.publish = bus.publish
        self.open_stream = bus.open_stream

    def _hold(self) -> None:
        """Until the next :meth:`_bind`, new calls wait for the new session
        (those in flight on the old one fail with SessionLost)."""
        self._new_bus = trio.Event()

        async def call(method: str, *args: Any, **kw: Any) -> Any:
            await self._next_bus()
            return await self.call(method, *args, **kw)

        async def notify(method: str, *args: Any) -> None:
            await self._next_bus()
            await self.notify(method, *args)

        async def publish(topic: str, message: Any) -> None:
            await self._next_bus()
            await self.publish(topic, message)

        @asynccontextmanager
        async def open_stream(method: str, *args: Any) -> AsyncIterator[MessageStream]:
            await self._next_bus()
            async with self.open_stream(method, *args) as stream:
                yield stream

        self.call, self.notify, self.publish, self.open_stream = (
            call, notify, publish, open_stream)

    async def _next_bus(self) -> None:
        await self._new_bus.wait()
        if self._error is not None:
            raise self._error
        if self._closing or self.closed:
            raise trio.ClosedResourceError("the connection was closed")

    # --- what it is -------------------------------------------------------------

    @property
    def transport(self) -> str:
        """``"vchan"``, ``"tls"`` or ``"tcp"``: what carries the connection now
        (the last one while a resume is under way)."""
        if self.session is not None and self.session.label:
            return self.session.label
        return self.endpoint.scheme

    @property
    def resumes(self) -> int:
        """Times the session continued on a new transport (all sessions)."""
        return self._past_resumes + (self.session.resumes if self.session else 0)

    @property
    def moves(self) -> int:
        """Resumes onto another kind of transport (vchan to TLS, TLS to vchan...)."""
        return self._past_moves + (self.session.moves if self.session else 0)

    @property
    def session_id(self) -> str:
        """The current session's id in hex ("" without sessions)."""
        return self.session.session_id.hex() if self.session is not None else ""

    @property
    def name(self) -> str:
        """Our name, as sent in the bus hello."""
        return self.bus.name

    @property
    def peer_name(self) -> str:
        """The service name the server announced."""
        return self.bus.peer_name

    @property
    def peer_features(self) -> frozenset[str]:
        """The bus features the server announced."""
        return self.bus.peer_features

    @property
    def features(self) -> frozenset[str]:
        """The bus features both ends speak."""
        return self.bus.features

    @property
    def closed(self) -> bool:
        """True once the connection ended for good."""
        return self._ended.is_set()

    @property
    def error(self) -> BaseException | None:
        """Why it ended (None while open or after a close by us)."""
        return self._error

    async def wait_closed(self) -> None:
        """Wait until the connection has ended for good.

        Cancellation:
            Safe; has no effect on the connection.
        """
        await self._ended.wait()

    async def aclose(self) -> None:
        """Close the connection (the server is told; the session ends).  Idempotent."""
        self._closing = True
        await self.bus.aclose()
        self._end(None)

    def _end(self, error: BaseException | None) -> None:
        if self._ended.is_set():
            return
        self._error = error
        self._ended.set()
        self._new_bus.set()  # subscriptions waiting for a new session give up

    def subscribe(
        self,
        prefix: str = "",
        *,
        policy: Literal["block", "drop_oldest"] = "block",
        queue_size: int = 1024,
        window: int | None = None,
    ) -> Subscription | _Resubscription:
        """Subscribe to the server's messages whose topic starts with ``prefix``.

        As :meth:`meshlink.bus.Connection.subscribe`; over a session, the
        subscription is made again on the new session when the server
        restarted (messages published meanwhile are lost: ``on_new_session``
        says when to re-sync).
        """
        if self.session is None:
            return self.bus.subscribe(prefix, policy=policy, queue_size=queue_size,
                                      window=window)
        return _Resubscription(self, prefix, policy, queue_size, window)

    async def _watch(self, bus: Connection) -> None:
        """End the connection when its bus ends, unless a new session replaces it."""
        await bus.wait_closed()
        if self._closing:
            self._end(None)
        elif bus is self.bus and not self._replacing:
            self._end(bus.error)


class _Resubscription:
    """A subscription of a :class:`MeshConnection` that follows it to new sessions.

    Same use as :class:`meshlink.bus.Subscription`: ``async with`` it, then
    ``async for topic, message in sub``.
    """

    def __init__(self, conn: MeshConnection, prefix: str,
                 policy: Literal["block", "drop_oldest"], queue_size: int,
                 window: int | None) -> None:
        self._conn = conn
        self.prefix = prefix
        self._args = (policy, queue_size, window)
        self._sub: Subscription | None = None
        self._dropped_before = 0

    def _new(self) -> Subscription:
        policy, queue_size, window = self._args
        return self._conn.bus.subscribe(self.prefix, policy=policy, queue_size=queue_size,
                                        window=window)

    @property
    def dropped(self) -> int:
        """Messages dropped because the queue was full (``"drop_oldest"``)."""
        return self._dropped_before + (self._sub.dropped if self._sub else 0)

    async def _renew(self) -> None:
        """Subscribe again on the connection's current bus (after a new session)."""
        if self._sub is not None:
            self._dropped_before += self._sub.dropped
        sub = self._new()
        await sub.__aenter__()
        self._sub = sub

    async def __aenter__(self) -> _Resubscription:
        sub = self._new()
        await sub.__aenter__()
        self._sub = sub
        self._conn._subs.add(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._conn._subs.discard(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.__aexit__(None, None, None)
            except (ConnectionLost, trio.ClosedResourceError):
                pass  # deliberate: its connection is gone, nothing to withdraw

    def __aiter__(self) -> _Resubscription:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        while True:
            sub = self._sub
            if sub is None:
                raise trio.ClosedResourceError("subscription not active")
            try:
                return await sub.__anext__()
            except SessionLost:
                conn = self._conn
                await conn._new_bus.wait()
                if conn.closed:
                    raise
                if self._sub is sub:  # not renewed (it was made meanwhile): do it now
                    await self._renew()


def _tls_refusal(ep: Endpoint, exc: BaseException) -> BaseException:
    """A TLS server's refusal of our certificate, seen only in the bus handshake.

    TLS 1.3 servers reject a client certificate after the client's handshake
    has completed, so the refusal surfaces as a broken bus handshake; the TLS
    alert buried in its causes says it was a credentials problem.
    """
    import ssl

    if ep.scheme != "tls" or isinstance(exc, AuthError):
        return exc
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            if isinstance(seen, ssl.SSLEOFError) or seen.reason == "UNEXPECTED_EOF_WHILE_READING":
                why = ("it closed the session right after the handshake without an alert "
                       "(our certificate is signed by its CA, but its name is probably not "
                       "in the server's allow list)")
            else:
                why = ssl_reason(seen)
            err = AuthError(f"TLS server refused our certificate: {why}")
            err.__cause__ = exc
            return err
        seen = seen.__cause__ or seen.__context__
    return exc


def _ivshmem_host_id() -> str | None:
    """The host id of the ivshmem region we map (``$MESHLINK_IVSHMEM``, or a guest's
    ivshmem PCI device), which makes the server's ``vchan://ivshmem/NAME``
    endpoint co-located; None when there is none (the usual case)."""
    from .transport.vchan.ivshmem import REGION_ENV, local_region_host_id

    if REGION_ENV not in os.environ and not os.path.isdir("/sys/bus/pci/devices"):
        return None
    return local_region_host_id()


@asynccontextmanager
async def connect(
    name: str,
    handlers: Handlers | None = None,
    *,
    resolver: Resolver | None = None,
    host_store: HostStore | str | os.PathLike[str] | None = None,
    rules: Any = None,
    zeroconf: ZeroconfConfig | bool | None = None,
    dns: DnsConfig | str | bool | None = None,
    host_id: str | None = None,
    tls: TLSConfig | None = None,
    require_tls: bool = False,
    allow_plaintext: bool | None = None,
    forbid_vchan: bool = False,
    pin: str | Endpoint | None = None,
    client_name: str = "",
    config: BusConfig | None = None,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
    resume: bool = True,
    session: SessionConfig | None = None,
    on_new_session: OnNewSession | None = None,
) -> AsyncIterator[MeshConnection]:
    """Connect to the service ``name`` over the best transport that works.

    Use as ``async with meshlink.connect("storage-node") as conn:``.

    Args:
        name: the service name.
        handlers: what this end serves to the server (the bus is symmetric).
        resolver: a :class:`resolver.Resolver`; by default one is built from
            ``host_store``, ``rules``, ``zeroconf`` and ``host_id``.
        host_store: our host store (default as in :mod:`resolver.hoststore.store`).
        rules: rules file path or parsed rules (default ``$MESHLINK_RULES``).
        zeroconf: DNS-SD lookup config, ``True``, ``False``, or ``None`` for
            ``$MESHLINK_ZEROCONF`` (unset: off).
        dns: unicast DNS source (SRV + TXT): a :class:`resolver.DnsConfig`,
            ``"SERVER[:PORT]"`` (domain ``$MESHLINK_DNS_DOMAIN``), ``False``, or
            ``None`` for ``$MESHLINK_DNS`` (unset: off).
        host_id: our host id (default: boot id + host store path).
        tls: certificates (default ``MESHLINK_TLS_*``).  TLS endpoints need a
            CA; mutual-TLS servers need our certificate too.
        require_tls: never use plain TCP (not even attempted).
        allow_plaintext: also try plain TCP endpoints that only a DNS answer
            vouches for (default ``$MESHLINK_ALLOW_PLAINTEXT``, unset: no).
        forbid_vchan: never use shared memory (not even by upgrading).
            Otherwise, a ``vchan://ivshmem/NAME`` endpoint (a KVM guest's
            server, see ``docs/guide/ivshmem.md``) counts as co-located when
            the ivshmem region we map (``$MESHLINK_IVSHMEM`` or the guest's
            device) carries its host id.
        pin: use exactly this endpoint (URL or :class:`Endpoint`); resumes
            use it too, and the session never moves.
        client_name: our name, sent in the bus hello.
        config: bus limits and timers.  Over a session the bus sends no
            heartbeats of its own: the session's keepalive does that job.
        attempt_timeout: bound on opening each transport (connect, vchan or
            TLS handshake, session greeting); the bus handshake is bounded by
            ``config``.
        resume: run the bus over a session that resumes across transport
            failures (default).  ``False``: the bus runs on the transport
            itself and ends with it (also for servers older than sessions).
        session: the session's timers and bounds (``resume_timeout``,
            keepalive, replay buffer, backoff, ``upgrade_interval``).
        on_new_session: called with the connection (awaited if it returns an
            awaitable) after a restarted server gave us a new session.

    Returns:
        An async context manager yielding a :class:`MeshConnection`.

    Raises:
        ResolveError: no usable endpoint, or every attempt failed (the message
            lists each attempt and why; the last error is chained).
        AuthError: an attempt was refused for credentials -- ours (TLS
            certificate, vchan uid) or the server's (TLS certificate, or a
            vchan server whose uid is not the owner of its host store record).
            No later endpoint is tried: a refusal never falls back to a
            weaker transport.
        RulesError: the rules file is malformed.
        LocalProtocolError: a bad name (:class:`~meshlink.InvalidName`) or pin.
        SessionLost: (from the connection's calls, later) the session could
            not be resumed within ``resume_timeout``, or calls were in flight
            when the server restarted.

    Cancellation:
        Safe at any point: a half-made transport is closed.  Leaving the block
        closes the connection.

    Backpressure:
        Each attempt waits at most ``attempt_timeout``; then the bus's.  While
        a session resumes, sends are buffered up to ``session.replay_limit``.
    """
    if tls is None:
        tls = TLSConfig.from_env()
    policy = Policy(require_tls=require_tls, forbid_vchan=forbid_vchan, pin=pin,
                    allow_plaintext=plaintext_allowed(allow_plaintext))
    with resolver_errors():
        if resolver is None:
            resolver = Resolver(host_store=host_store, rules=rules, zeroconf=zeroconf,
                                dns=dns, host_id=host_id,
                                tls_configured=tls is not None and tls.can_connect,
                                ivshmem_host_id=None if forbid_vchan else _ivshmem_host_id())
        try:
            choices = await resolver.resolve(name, policy)
        except InvalidName:
            raise
        except ValueError as exc:
            raise LocalProtocolError(f"bad pin: {exc}") from exc
    store = resolver.store
    scfg = session or SessionConfig()
    bus_cfg = config or BusConfig()
    if resume:
        bus_cfg = dataclasses.replace(bus_cfg, heartbeat_interval=None)

    async def dial_one(ep: Endpoint) -> trio.abc.Stream:
        return await dial(ep, host_store=store, tls=tls, server_hostname=name)

    def open_bus(stream: trio.abc.Stream) -> AbstractAsyncContextManager[Connection]:
        return Connection.open(stream, handlers, name=client_name, config=bus_cfg)

    @asynccontextmanager
    async def attempt(ep: Endpoint) -> AsyncIterator[tuple[Connection, SessionStream | None]]:
        sess: SessionStream | None = None
        with trio.fail_after(attempt_timeout):
            stream = await dial_one(ep)
            if resume:
                try:
                    reply = await greet(stream, None)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                sess = SessionStream(reply.session_id, reply.token, scfg, server=False)
                await sess.attach(stream, reply.received, ep.scheme)
        # Not inside the fail_after: the connection's nursery outlives this
        # statement.  The bus bounds its own handshake (handshake_timeout).
        async with open_bus(sess if sess is not None else stream) as opened:
            yield opened, sess

    async with open_first(choices, attempt, subject=name, log=logger, blame=_tls_refusal,
                          failure=f"could not connect to {name!r}") as ((bus, sess), choice):
        ep = choice.endpoint
        conn = MeshConnection(name, bus, sess, choice)
        logger.info("%s: connected over %s to %s (%s)%s", name, ep.scheme, ep.url,
                    choice.reason, f", session {conn.session_id[:8]}" if sess else "")
        if sess is None:
            try:
                yield conn
            finally:
                await conn.aclose()
            return
        # What the caller's block raises is re-raised as itself after the
        # nursery (not wrapped in an exception group), as Connection.open does.
        to_raise: BaseException | None = None
        async with trio.open_nursery() as nursery:
            driver = SessionDriver(conn, nursery, name, resolver, policy, dial_one, open_bus, scfg,
                                   attempt_timeout, not forbid_vchan and pin is None,
                                   on_new_session)
            nursery.start_soon(sess.keep)
            nursery.start_soon(driver.resumer)
            nursery.start_soon(driver.upgrader)
            nursery.start_soon(conn._watch, bus)
            try:
                yield conn
            except BaseException as exc:
                to_raise = exc
            finally:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
                nursery.cancel_scope.cancel()
        if to_raise is not None:
            raise to_raise
