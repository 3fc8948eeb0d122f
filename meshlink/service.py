"""``meshlink.serve`` and ``meshlink.connect``: services by name over the best transport.

Theory of operation
-------------------
``serve(name, handlers)`` listens on vchan (claiming ``name`` in the host
store) and, when certificates are configured, on TLS; it listens on plain TCP
only when asked (``allow_plaintext=True`` or ``$MESHLINK_ALLOW_PLAINTEXT``):
plain TCP has no authentication at all, so it is never opened by default.
It runs the message bus (:func:`meshlink.bus.serve_bus`) on every accepted
connection, and advertises itself: a record beside its host store entry (host
id, TCP/TLS endpoints, TLS fingerprint) and, when enabled, a zeroconf DNS-SD
registration.  It withdraws all of them when it stops -- cancelled, SIGTERM,
or an error.  A server killed with SIGKILL cannot withdraw, but its host store
lock dies with it, so its entry is stale, ignored by resolvers and replaced by
the next server.

``connect(name)`` lives in :mod:`meshlink.client`.

Sessions: every accepted transport is handed to a
:class:`~meshlink.session.SessionTable`.  A client that opens with a session
greeting gets a session (the bus then runs over it, with the session's
keepalive instead of the bus heartbeat); a client resuming a session joins it
on its new transport, whatever transport that is; a client without sessions
(a bare bus hello) is served as before.  A session left without a transport
is kept ``session.resume_timeout`` seconds for its client to come back, and
counts as one of the service's connections meanwhile.

Alternatives rejected: a session per TCP connection only (as most RPC
libraries resume) would lose what makes ours useful: the same session moves
between shared memory and the network.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from resolver import (
    Advertisement,
    Endpoint,
    HostStore,
    ServiceRecord,
    ZeroconfConfig,
    default_host_id,
    remove_record,
    validate_service_name,
    write_record,
)
from resolver.zeroconf import Registration
from resolver.zeroconf import register as zeroconf_register

from .bus import BusConfig, Connection, Handlers, ServerLimits
from .errors import (
    AddressInUse,
    AuthError,
    HandshakeError,
    LocalProtocolError,
    MeshlinkError,
    resolver_errors,
)
from .session import SessionConfig, SessionStream, SessionTable
from .stats import STATS_METHOD, DiskStatsSource, ServiceStats
from .transport.tls import TLSConfig, tls_server_handshake
from .transport.vchan import VchanListener, open_vchan_listener

__all__ = ["ATTEMPT_TIMEOUT", "ENV_ALLOW_PLAINTEXT", "Server", "check_port",
           "plaintext_allowed", "serve"]

serve_logger = logging.getLogger("meshlink.serve")

#: Default bound on one connection attempt (transport + TLS + bus handshake).
ATTEMPT_TIMEOUT = 10.0
#: Environment variable: ``1`` lets :func:`serve` listen on plain TCP when its
#: ``allow_plaintext`` argument is not given (``0`` or unset: it does not).
ENV_ALLOW_PLAINTEXT = "MESHLINK_ALLOW_PLAINTEXT"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def plaintext_allowed(allow_plaintext: bool | None = None) -> bool:
    """Whether plain TCP may be served: the argument, else ``$MESHLINK_ALLOW_PLAINTEXT``.

    Raises:
        LocalProtocolError: the variable holds something other than a yes/no word.
    """
    if allow_plaintext is not None:
        return allow_plaintext
    value = os.environ.get(ENV_ALLOW_PLAINTEXT, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise LocalProtocolError(f"${ENV_ALLOW_PLAINTEXT} must be 1 or 0, not {value!r}")


def check_port(what: str, port: int | None) -> None:
    """Refuse a port number outside 0..65535 (0 = any free port; ``None`` = no listener).

    Raises:
        LocalProtocolError: ``port`` is not an integer in that range.
    """
    if port is None:
        return
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise LocalProtocolError(f"{what} must be a port number in 1..65535 "
                                 f"(or 0 for any free port), not {port!r}")


@dataclass
class Server:
    """A running :func:`serve`; delivered by ``nursery.start(serve, ...)``.

    Attributes:
        name: the service name.
        host_id: the host id it advertises.
        endpoints: every endpoint it offers (vchan first).
        tls_port: the TLS port, or 0.
        tcp_port: the plain TCP port, or 0.
        accepted: connections accepted so far, per transport.
        refused: connections refused (TLS authentication), per transport.
        last_refusal: why the last refused TLS client was refused ("" if none).
        stats: its counters (:mod:`meshlink.stats`; also the bus method
            ``meshlink.stats``).
        metrics_address: ``(host, port)`` of the Prometheus endpoint, if any.
        sessions: the sessions of its clients (resumes and moves are counted there).
    """

    name: str
    host_id: str
    endpoints: list[Endpoint]
    tls_port: int = 0
    tcp_port: int = 0
    accepted: dict[str, int] = field(default_factory=lambda: {"vchan": 0, "tls": 0, "tcp": 0})
    refused: dict[str, int] = field(default_factory=lambda: {"vchan": 0, "tls": 0, "tcp": 0})
    last_refusal: str = ""
    stats: ServiceStats = field(default_factory=lambda: ServiceStats(""))
    metrics_address: tuple[str, int] | None = None
    sessions: SessionTable | None = None
    _vchan: _VchanOffer | None = None
    _cancel: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def transports(self) -> tuple[str, ...]:
        """Transports offered, best first."""
        return tuple(dict.fromkeys(ep.scheme for ep in self.endpoints))

    def stop(self) -> None:
        """Ask the server to stop (it withdraws every registration, then returns)."""
        self._cancel.cancel()

    async def offer_vchan(self) -> None:
        """Start offering vchan (again): claim the name in the host store, listen.

        Clients on the same host whose sessions run over TLS or TCP move onto
        it at their next look (``SessionConfig.upgrade_interval``).  No-op if
        vchan is offered already.

        Raises:
            AddressInUse: another live server holds the name in the host store.
        """
        assert self._vchan is not None, "offer_vchan() before serve() started"
        await self._vchan.open()

    async def withdraw_vchan(self) -> None:
        """Stop offering vchan: close the listener, withdraw the host store entry,
        and cut the vchan transport of every session (their clients resume over
        what they resolve now, e.g. TLS).  For example before the machine
        migrates away.  No-op if vchan is not offered.
        """
        assert self._vchan is not None, "withdraw_vchan() before serve() started"
        await self._vchan.withdraw()
        if self.sessions is not None:
            self.sessions.cut("vchan")


def _port(listeners: Sequence[trio.SocketListener]) -> int:
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def serve(
    name: str,
    handlers: Handlers,
    *,
    host_store: HostStore | str | os.PathLike[str] | None = None,
    bind: str = "127.0.0.1",
    advertise: Sequence[str] | None = None,
    tls: TLSConfig | None = None,
    tls_port: int | None = 0,
    tcp_port: int | None = 0,
    allow_plaintext: bool | None = None,
    require_tls: bool = False,
    vchan: bool = True,
    ivshmem: str | os.PathLike[str] | None = None,
    xen_readers: Collection[int] | None = None,
    allow_uids: Collection[int] | None = None,
    zeroconf: ZeroconfConfig | bool | None = None,
    host_id: str | None = None,
    config: BusConfig | None = None,
    session: SessionConfig | None = None,
    handle_sigterm: bool = True,
    metrics: str | int | tuple[str, int] | None = None,
    disk_stats: DiskStatsSource | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handlers`` under ``name`` on vchan and TLS (plain TCP if asked) until stopped.

    What listens, by default: vchan through the host store (only the uids in
    ``allow_uids``, default our own, are admitted) and, when a certificate is
    configured, TLS on ``bind`` (loopback by default; with a CA, clients need
    a certificate it signed and, with ``tls.allow_names``, one of those
    names).  Plain TCP, which authenticates nobody, listens only with
    ``allow_plaintext=True`` (or ``$MESHLINK_ALLOW_PLAINTEXT=1``), and only
    on ``bind``.

    Args:
        name: the service name.
        handlers: the bus handlers every connection serves.
        host_store: where to publish the vchan rendezvous (default as in
            :mod:`resolver.hoststore.store`).
        bind: the address the TCP and TLS listeners bind (default loopback
            only: pass an interface address, or ``"0.0.0.0"``, to be
            reachable from other hosts).
        advertise: addresses to advertise for TCP/TLS (default: ``bind``, or
            the zeroconf interfaces when ``bind`` is a wildcard).
        tls: certificates (default: ``MESHLINK_TLS_*``; none = no TLS).  With
            a CA, clients must present a certificate it signed (mutual TLS).
        tls_port: TLS port (0 = any free port; ``None`` = no TLS listener).
        tcp_port: plain TCP port when ``allow_plaintext`` (0 = any; ``None`` =
            no plain TCP listener after all).
        allow_plaintext: listen on plain TCP, unauthenticated and unencrypted
            (``None``: ``$MESHLINK_ALLOW_PLAINTEXT``, unset = no).
        require_tls: offer no plain TCP at all, and fail without a certificate.
        vchan: offer vchan through the host store.
        ivshmem: also offer vchan through this ivshmem region (a host file
            given to KVM guests, a guest's ``resource2``, or ``"auto"`` for
            the guest's device): the endpoint ``vchan://ivshmem/NAME``.
            Whoever maps the region may connect (the region is the
            boundary: give it only to the VMs that may); see
            ``docs/guide/ivshmem.md``.
        xen_readers: on Xen, also serve vchan to these domains and publish
            the service in the XenStore registry for them (a guest's
            ``connect(name)`` then finds ``vchan://xen/DOMID/NAME``);
            withdrawn on the way out.  Needs dom0's registry index
            (``resolver.xenstore.prepare_index``).
        allow_uids: uids allowed to connect over every local path this server
            opens (vchan; default: our own uid only).
        zeroconf: DNS-SD advertisement: a config, ``True`` (all interfaces),
            ``False``, or ``None`` for ``$MESHLINK_ZEROCONF`` (unset: off).
        host_id: the host id to advertise (default: boot id + host store path).
        config: bus limits and timers of each connection.
        session: timers and bounds of the sessions clients open (how long a
            session without a transport is kept for its client to resume:
            ``resume_timeout``; keepalive; replay buffer).
        handle_sigterm: stop cleanly on SIGTERM (main thread only).
        metrics: serve Prometheus text exposition of this service's counters
            on ``"HOST:PORT"``, ``(host, port)`` or a port (host 127.0.0.1),
            at ``/metrics``; needs ``prometheus_client`` (``meshlink[metrics]``).
            ``None`` (default): nothing listens for metrics.
        disk_stats: the :class:`meshlink.disk.DiskStats` of disks this
            process serves (``meshlink.disk.serve(stats=)``); the built-in
            stats method then reports them under ``disks``.
        task_status: receives the :class:`Server` once every listener is up
            and the service is advertised.

    Raises:
        AddressInUse: a live server already publishes ``name`` in the host store.
        LocalProtocolError: bad name (:class:`~meshlink.InvalidName`), a port
            outside 0..65535, a ``tcp_port`` without ``allow_plaintext``,
            a handler named ``meshlink.stats`` (reserved), a bad ``metrics``
            address or ``metrics`` without ``prometheus_client``,
            ``allow_plaintext`` with ``require_tls``, TLS required but not
            configured, or nothing at all to listen on.
        StoreError: the host store cannot be used.
        OSError: a TCP port could not be bound.

    Cancellation:
        Stops accepting, closes every connection (handlers are cancelled) and
        withdraws every registration before returning; the zeroconf goodbye
        is shielded so it completes.

    Backpressure:
        Per connection, as set by ``config``; accepting is not limited.
    """
    with resolver_errors():
        validate_service_name(name)
    if STATS_METHOD in handlers.methods:
        raise LocalProtocolError(f"the method name {STATS_METHOD!r} is reserved "
                                 "(every server answers it with its counters)")
    metrics_at = None
    if metrics is not None:
        from .metrics import metrics_address, require_prometheus

        metrics_at = metrics_address(metrics)
        require_prometheus()
    check_port("tls_port", tls_port)
    check_port("tcp_port", tcp_port)
    plaintext = plaintext_allowed(allow_plaintext)
    if plaintext and require_tls:
        raise LocalProtocolError("allow_plaintext and require_tls contradict each other")
    if not plaintext:
        if tcp_port:  # a port asked for but not the plaintext: say so rather than ignore it
            raise LocalProtocolError(f"tcp_port={tcp_port} needs allow_plaintext=True "
                                     f"(or ${ENV_ALLOW_PLAINTEXT}=1): plain TCP is off by default")
        tcp_port = None
    if tls is None:
        tls = TLSConfig.from_env()
    if tls is not None and not tls.can_serve:
        tls = None
    if require_tls and (tls is None or tls_port is None):
        raise LocalProtocolError("require_tls needs a TLS certificate (tls= or MESHLINK_TLS_*)")
    if tls is None:
        tls_port = None
    if (not vchan and ivshmem is None and not xen_readers and tls_port is None
            and tcp_port is None):
        raise LocalProtocolError(f"service {name!r} would listen nowhere: no vchan, no TLS "
                                 "certificate, and plain TCP not allowed")
    zc = ZeroconfConfig.from_env() if zeroconf is None else (
        ZeroconfConfig() if zeroconf is True else (zeroconf or None))
    with resolver_errors():
        store = HostStore.of(host_store)
    hid = host_id or default_host_id(store)
    ssl_ctx = tls.server_context() if tls is not None else None

    async with AsyncExitStack() as stack:
        if vchan and store.is_live(name):  # fail before binding any port
            raise AddressInUse(errno.EADDRINUSE,
                               f"service {name!r} is already served in {store.path}")
        tls_listeners: list[trio.SocketListener] = []
        tcp_listeners: list[trio.SocketListener] = []
        if tls_port is not None:
            tls_listeners = await trio.open_tcp_listeners(tls_port, host=bind)
            for lst in tls_listeners:
                stack.push_async_callback(lst.aclose)
        if tcp_port is not None:
            tcp_listeners = await trio.open_tcp_listeners(tcp_port, host=bind)
            for lst in tcp_listeners:
                stack.push_async_callback(lst.aclose)
        if advertise is None:
            wildcard = bind in ("", "0.0.0.0", "::")
            advertise = list(zc.interfaces) if wildcard and zc else (
                ["127.0.0.1"] if wildcard else [bind])
        server = Server(name, hid, [])
        stats = server.stats = ServiceStats(name, disks=disk_stats)
        stats.opened, stats.refused = server.accepted, server.refused  # one count, two views
        served = _with_stats(handlers, stats)
        metrics_listeners: list[trio.SocketListener] = []
        if metrics_at is not None:
            from .metrics import open_metrics_listeners

            metrics_listeners = await open_metrics_listeners(*metrics_at)
            for lst in metrics_listeners:
                stack.push_async_callback(lst.aclose)
            server.metrics_address = (metrics_at[0], _port(metrics_listeners))
        if tls_listeners:
            server.tls_port = _port(tls_listeners)
            server.endpoints += [Endpoint("tls", a, server.tls_port, host_id=hid)
                                 for a in advertise]
        if tcp_listeners:
            server.tcp_port = _port(tcp_listeners)
            server.endpoints += [Endpoint("tcp", a, server.tcp_port, host_id=hid)
                                 for a in advertise]
        fingerprint = tls.fingerprint() if tls is not None else None
        offer = server._vchan = _VchanOffer(server, store, allow_uids, fingerprint)
        stack.push_async_callback(offer.withdraw)
        if vchan:
            await offer.open()
        ivs_listener = None
        if ivshmem is not None:
            from .transport.vchan.ivshmem import IvshmemRegion, open_ivshmem_listener

            region = IvshmemRegion.open(None if ivshmem == "auto" else ivshmem)
            stack.callback(region.close)
            ivs_listener = await open_ivshmem_listener(region, name)
            stack.push_async_callback(ivs_listener.aclose)
            server.endpoints.insert(1 if vchan else 0, Endpoint(
                "vchan", name, host_id=region.host_id, via="ivshmem"))
        xen_listener = None
        if xen_readers:
            from .transport import xenstore as xs_registry
            from .transport.vchan.xen import open_xen_vchan_listener, own_domid

            xen_listener = await open_xen_vchan_listener(name, xen_readers)
            stack.push_async_callback(xen_listener.aclose)
            me = own_domid()
            xs_registry.publish(name, me, name, readers=xen_readers)
            stack.callback(xs_registry.withdraw, name, me)
            server.endpoints.insert(1 if vchan else 0, Endpoint("vchan", name, domid=me))
        if zc is not None:
            ad = Advertisement(name, hid, server.transports, tuple(advertise),
                               server.tls_port, server.tcp_port, fingerprint)
            reg: Registration = await zeroconf_register(ad, zc)
            stack.push_async_callback(reg.withdraw)

        # One budget for every connection of this service, whatever its
        # transport: connections at once, bytes of incomplete frames.
        cfg = config or BusConfig()
        limits = ServerLimits(cfg.max_connections, cfg.max_partial_bytes)
        # Sessions: the bus over a session sends no heartbeat (the session's
        # keepalive does that, and a resume may take longer than a heartbeat).
        table = server.sessions = SessionTable(session or SessionConfig(), cfg.max_connections)
        stats.sessions = table
        session_cfg = dataclasses.replace(cfg, heartbeat_interval=None)

        async def accept(stream: trio.abc.Stream, label: str) -> None:
            async def run_bus(over: trio.abc.Stream, sess: SessionStream | None) -> None:
                await _serve_one(over, served, name, session_cfg if sess else cfg, limits,
                                 stats, label)

            try:
                await table.accept(stream, label, run_bus,
                                   greeting_timeout=cfg.handshake_timeout)
            except (MeshlinkError, trio.BrokenResourceError, OSError) as exc:
                stats.failed += 1
                serve_logger.info("%s: %s client failed its greeting: %r", name, label, exc)

        async def on_vchan(stream: trio.abc.Stream) -> None:
            async with _admitted(limits, stream) as ok:
                if ok:
                    server.accepted["vchan"] += 1
                    await accept(stream, "vchan")

        async def on_tcp(stream: trio.abc.Stream) -> None:
            async with _admitted(limits, stream) as ok:
                if ok:
                    server.accepted["tcp"] += 1
                    await accept(stream, "tcp")

        async def on_tls(stream: trio.SSLStream[trio.SocketStream]) -> None:
            assert tls is not None
            async with _admitted(limits, stream) as ok:
                if not ok:
                    return
                try:
                    who = await tls_server_handshake(stream, tls)
                except (AuthError, HandshakeError) as exc:
                    server.refused["tls"] += 1
                    serve_logger.warning("%s: TLS client refused: %s", name, exc)
                    server.last_refusal = str(exc)
                    await _refuse(stream)
                    return
                server.accepted["tls"] += 1
                serve_logger.debug("%s: TLS client %s", name, who)
                await accept(stream, "tls")

        with server._cancel:
            async with trio.open_nursery() as nursery:
                offer.start(nursery, on_vchan)
                if ivs_listener is not None:
                    nursery.start_soon(trio.serve_listeners, on_vchan, [ivs_listener])
                if xen_listener is not None:
                    nursery.start_soon(trio.serve_listeners, on_vchan, [xen_listener])
                if tcp_listeners:
                    nursery.start_soon(trio.serve_listeners, on_tcp, tcp_listeners)
                if tls_listeners:
                    assert ssl_ctx is not None
                    ssl_listeners = [trio.SSLListener(lst, ssl_ctx) for lst in tls_listeners]
                    nursery.start_soon(trio.serve_listeners, on_tls, ssl_listeners)
                if metrics_at is not None:
                    from .metrics import serve_metrics

                    nursery.start_soon(serve_metrics, metrics_listeners, stats)
                serve_logger.info("%s: serving on %s", name,
                                  ", ".join(ep.url for ep in server.endpoints))
                task_status.started(server)
                if handle_sigterm and threading.current_thread() is threading.main_thread():
                    with trio.open_signal_receiver(signal.SIGTERM) as signals:
                        async for _ in signals:
                            serve_logger.info("%s: SIGTERM, withdrawing", name)
                            break
                    nursery.cancel_scope.cancel()


class _VchanOffer:
    """The vchan side of a server: its host store listener and record, which may
    come and go while the server runs (:meth:`Server.offer_vchan`)."""

    def __init__(self, server: Server, store: HostStore, allow_uids: Collection[int] | None,
                 fingerprint: str | None) -> None:
        self._server = server
        self._store = store
        self._allow_uids = allow_uids
        self._fingerprint = fingerprint
        self._listener: VchanListener | None = None
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._handler: Callable[[trio.abc.Stream], Awaitable[None]] | None = None

    async def open(self) -> None:
        if self._listener is not None:
            return
        server, store = self._server, self._store
        if store.is_live(server.name):
            raise AddressInUse(errno.EADDRINUSE,
                               f"service {server.name!r} is already served in {store.path}")
        self._listener = await open_vchan_listener(server.name, host_store=store,
                                                   allow_uids=self._allow_uids)
        server.endpoints.insert(0, Endpoint("vchan", server.name, store=str(store.path),
                                            host_id=server.host_id))
        # No checkpoint between binding and the record: resolvers in other
        # processes may still see the entry without it (see resolver.rank).
        write_record(store, ServiceRecord(
            server.name, server.host_id, server.transports,
            tuple(ep.url for ep in server.endpoints if ep.scheme != "vchan"),
            self._fingerprint, os.getpid()))
        if self._nursery is not None:
            self._serve_in(self._nursery)

    def start(self, nursery: trio.Nursery,
              handler: Callable[[trio.abc.Stream], Awaitable[None]]) -> None:
        """Serve the listener (now, and after every later :meth:`open`) in ``nursery``."""
        self._nursery, self._handler = nursery, handler
        if self._listener is not None:
            self._serve_in(nursery)

    def _serve_in(self, nursery: trio.Nursery) -> None:
        scope = self._scope = trio.CancelScope()
        listener, handler = self._listener, self._handler
        assert listener is not None and handler is not None

        async def run() -> None:
            # Only the accept loop runs in ``scope``: the connections (and the
            # sessions begun on them) live in the server's nursery, so
            # withdrawing vchan does not end them (Server.withdraw_vchan).
            with scope:
                await trio.serve_listeners(handler, [listener], handler_nursery=nursery)

        nursery.start_soon(run)

    async def withdraw(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        server = self._server
        server.endpoints[:] = [ep for ep in server.endpoints if ep.scheme != "vchan"]
        remove_record(self._store, server.name)
        await listener.aclose()


@asynccontextmanager
async def _admitted(limits: ServerLimits, stream: trio.abc.Stream) -> AsyncIterator[bool]:
    """Count a new connection in for as long as the block runs (yields True),
    or close it at once when the service is full (yields False; logged at most
    every 10 s by ``limits``)."""
    if not limits.admit():
        await trio.aclose_forcefully(stream)
        yield False
        return
    try:
        yield True
    finally:
        limits.release()


async def _refuse(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Close a refused TLS client so that it reads an end of stream, not a reset.

    The client may already have sent its first bytes (TLS 1.3 lets it write
    before we checked its certificate); closing with them unread would make
    the kernel answer with a reset that destroys our alert, and the client
    could not tell a refusal from a network failure.  So: shut our side,
    discard what it sends for at most a second, then close.
    """
    raw = stream.transport_stream
    with trio.move_on_after(1.0):
        try:
            await raw.send_eof()
            while await raw.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # deliberate: it is gone already, which is all we wanted
    await trio.aclose_forcefully(stream)


def _with_stats(handlers: Handlers, stats: ServiceStats) -> Handlers:
    """``handlers`` plus the built-in stats method (a copy: the caller's is not changed)."""
    served = Handlers()
    served.update(handlers)

    async def service_stats() -> dict[str, Any]:
        return stats.snapshot()

    served.add_method(STATS_METHOD, service_stats)
    return served


async def _serve_one(stream: trio.abc.Stream, handlers: Handlers, name: str,
                     config: BusConfig, limits: ServerLimits, stats: ServiceStats,
                     transport: str) -> None:
    """:func:`meshlink.bus.serve_bus`, with the connection counted in ``stats``."""
    try:
        async with Connection.open(stream, handlers, name=name, config=config,
                                   server_limits=limits) as conn:
            stats.add(conn, transport)
            try:
                await conn.wait_closed()
            finally:
                stats.remove(conn)
        if conn.error is not None:
            raise conn.error
    except (MeshlinkError, trio.BrokenResourceError, OSError) as exc:
        stats.failed += 1
        serve_logger.info("%s: connection ended with an error: %r", name, exc)
