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
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from resolver import (
    DnsConfig,
    Endpoint,
    HostStore,
    InvalidName,
    Policy,
    Resolver,
    ZeroconfConfig,
)

from .bus import BusConfig, Connection, Handlers
from .client_session import MeshConnection, OnNewSession, SessionDriver
from .errors import (
    AuthError,
    LocalProtocolError,
    resolver_errors,
)
from .service import ATTEMPT_TIMEOUT, plaintext_allowed
from .session import SessionConfig, SessionStream, greet
from .transport.dial import dial, open_first
from .transport.tls import TLSConfig, ssl_reason

__all__ = ["MeshConnection", "connect"]

logger = logging.getLogger("meshlink.connect")

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
    endpoint co-located; None when there is none (the usual case).  The
    resolver asks only when such an endpoint turns up."""
    from .transport.vchan.ivshmem import local_region_host_id

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
                                ivshmem_host_id=None if forbid_vchan else _ivshmem_host_id)
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
