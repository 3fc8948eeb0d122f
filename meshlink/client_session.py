"""The connection a client holds, and what keeps its session alive (``docs/sessions.md``).

:class:`MeshConnection` is what ``meshlink.connect`` yields: the bus calls of
the current bus connection, re-bound when a restarted server gives a new
session, and its subscriptions (:class:`_Resubscription`) made again then.
:class:`SessionDriver` runs beside every one made with sessions:

* ``resumer``: whenever the session loses its transport, resolve the name
  again and resume over the best endpoint allowed now, with capped,
  jittered exponential backoff, until ``resume_timeout`` (then
  :class:`~meshlink.SessionLost`);
* ``upgrader``: every ``upgrade_interval``, when the session is not on vchan
  and the name now resolves to vchan first, move it there;
* ``renew``: when the server answers a resume with a new session (it
  restarted), fail the calls in flight, run a new bus over the new session,
  renew subscriptions and tell the application.

One lock serialises resume and move, so a move never races a resume.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import trio

from resolver import Choice, Endpoint, Policy, Resolver

from .bus import Connection
from .bus.pubsub import Subscription
from .bus.streams import MessageStream
from .errors import AuthError, ConnectionLost, MeshlinkError, SessionLost, resolver_errors
from .session import NEW, RESUMED, Greeting, SessionConfig, SessionStream, greet
from .transport.dial import ATTEMPT_ERRORS

__all__ = ["MeshConnection", "OnNewSession", "SessionDriver"]

logger = logging.getLogger("meshlink.connect")

OnNewSession = Callable[["MeshConnection"], Awaitable[None] | None]


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


@dataclasses.dataclass
class SessionDriver:
    """What keeps a :class:`~meshlink.client.MeshConnection`'s session alive:
    resume, upgrade, renew (one per connection, its methods run as tasks)."""

    conn: MeshConnection
    nursery: trio.Nursery
    name: str
    resolver: Resolver
    policy: Policy
    dial_one: Callable[[Endpoint], Awaitable[trio.abc.Stream]]
    open_bus: Callable[[trio.abc.Stream], AbstractAsyncContextManager[Connection]]
    config: SessionConfig
    attempt_timeout: float
    may_upgrade: bool
    on_new_session: OnNewSession | None
    lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    rng: random.Random = dataclasses.field(default_factory=random.Random)

    async def choices(self) -> list[Choice]:
        with resolver_errors():
            return list(await self.resolver.resolve(self.name, self.policy))

    async def open_transport(self, ep: Endpoint, session: SessionStream,
                             within: float) -> tuple[trio.abc.Stream, Greeting]:
        with trio.fail_after(within):
            transport = await self.dial_one(ep)
            try:
                reply = await greet(transport, session)
            except BaseException:
                await trio.aclose_forcefully(transport)
                raise
        return transport, reply

    # --- resume ----------------------------------------------------------------------

    async def resumer(self) -> None:
        """Whenever the session loses its transport, get it another one."""
        conn = self.conn
        while not conn.closed:
            session = conn.session
            assert session is not None
            await session.detached.wait()
            async with self.lock:
                if conn.closed or conn._closing or session is not conn.session:
                    continue
                if session.lost is not None:
                    return
                if session.transport is None:
                    await self.resume(session)

    async def resume(self, session: SessionStream) -> None:
        cfg = self.config
        deadline = trio.current_time() + cfg.resume_timeout
        delay = cfg.backoff_min
        why: BaseException | str = "no endpoint"
        started = trio.current_time()
        while not self.conn._closing:
            try:
                choices = await self.choices()
            except (MeshlinkError, OSError) as exc:
                why, choices = exc, []
            for choice in choices:
                left = deadline - trio.current_time()
                if left <= 0:
                    break
                ep = choice.endpoint
                try:
                    transport, reply = await self.open_transport(
                        ep, session, min(self.attempt_timeout, left))
                except AuthError as exc:
                    self.give_up(session, f"resuming over {ep.url} was refused: {exc}", exc)
                    return
                except ATTEMPT_ERRORS as exc:
                    why = exc
                    logger.debug("%s: resume over %s failed: %r", self.name, ep.url, exc)
                    continue
                if reply.status == RESUMED:
                    before = session.label
                    try:
                        await session.attach(transport, reply.received, ep.scheme)
                    except MeshlinkError as exc:
                        self.give_up(session, f"resume failed: {exc}", exc)
                        return
                    if session.transport is None:
                        why = "the new transport failed at once"
                        continue
                    self.conn.endpoint, self.conn.choice = ep, choice
                    logger.info("%s: session resumed over %s (%s%s) after %.3f s", self.name,
                                ep.url, choice.reason,
                                f"; moved from {before}" if before != ep.scheme else "",
                                trio.current_time() - started)
                    return
                await self.renew(transport, reply, choice)
                return
            now = trio.current_time()
            if now >= deadline:
                break
            pause = min(delay * (0.5 + self.rng.random() / 2), deadline - now)
            await trio.sleep(pause)
            delay = min(delay * 2, cfg.backoff_max)
        if not self.conn._closing:
            self.give_up(session, f"could not resume within {cfg.resume_timeout} s: {why}",
                         why if isinstance(why, BaseException) else None)

    def give_up(self, session: SessionStream, why: str, cause: BaseException | None) -> None:
        err = SessionLost(f"session with {self.name!r} lost: {why}")
        err.__cause__ = cause
        logger.warning("%s: %s", self.name, err)
        self.conn.bus.abort(err)
        session.lose(err)
        self.conn._end(err)

    # --- a new session (the server forgot ours) ------------------------------------

    async def renew(self, transport: trio.abc.Stream, reply: Greeting, choice: Choice) -> None:
        """The server answered NEW: fail what was in flight, carry on in a new session."""
        conn = self.conn
        old = conn.session
        assert old is not None
        err = SessionLost(f"the server of {self.name!r} restarted and forgot the session; "
                          "calls in flight were not re-sent")
        conn._replacing = True
        conn._hold()
        try:
            conn.bus.abort(err)
            old.lose(err)
            conn._past_resumes += old.resumes
            conn._past_moves += old.moves
            session = SessionStream(reply.session_id, reply.token, self.config, server=False)
            await session.attach(transport, reply.received, choice.endpoint.scheme)
            self.nursery.start_soon(session.keep)
            bus = await self.nursery.start(self._run_bus, session)
            conn.session = session
            conn.endpoint, conn.choice = choice.endpoint, choice
            conn._bind(bus)
            conn.sessions += 1
            self.nursery.start_soon(conn._watch, bus)
            for sub in list(conn._subs):
                await sub._renew()
        except (MeshlinkError, OSError, trio.BrokenResourceError) as exc:
            conn._end(exc)
            return
        finally:
            conn._replacing = False
            conn._new_bus.set()
        logger.warning("%s: the server restarted; new session %s over %s", self.name,
                       conn.session_id[:8], choice.endpoint.url)
        if self.on_new_session is not None:
            try:
                result = self.on_new_session(conn)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("%s: on_new_session raised", self.name)

    async def _run_bus(self, stream: trio.abc.Stream,
                       task_status: trio.TaskStatus[Connection]) -> None:
        async with self.open_bus(stream) as bus:
            task_status.started(bus)
            await bus.wait_closed()

    # --- upgrade ----------------------------------------------------------------------

    async def upgrader(self) -> None:
        """Move a session that is not on vchan onto vchan once the server is co-located."""
        interval = self.config.upgrade_interval
        conn = self.conn
        if interval is None or not self.may_upgrade:
            return
        while not conn.closed:
            await trio.sleep(interval)
            session = conn.session
            if session is None or session.transport is None or session.label == "vchan":
                continue
            try:
                choices = await self.choices()
            except (MeshlinkError, OSError):
                continue
            if not choices or choices[0].endpoint.scheme != "vchan":
                continue
            async with self.lock:
                if session is not conn.session or session.transport is None:
                    continue
                await self.move(session, choices[0])

    async def move(self, session: SessionStream, choice: Choice) -> None:
        ep = choice.endpoint
        try:
            with trio.fail_after(self.attempt_timeout):
                transport = await self.dial_one(ep)
        except ATTEMPT_ERRORS as exc:
            logger.debug("%s: %s is offered but did not open: %r", self.name, ep.url, exc)
            return
        before = session.label
        session.detach()  # from here on, nothing read on the old transport counts
        try:
            with trio.fail_after(self.attempt_timeout):
                reply = await greet(transport, session)
        except ATTEMPT_ERRORS as exc:
            await trio.aclose_forcefully(transport)
            logger.info("%s: moving to %s failed (%r); resuming", self.name, ep.url, exc)
            await self.resume(session)
            return
        if reply.status == NEW:
            await self.renew(transport, reply, choice)
            return
        try:
            await session.attach(transport, reply.received, ep.scheme)
        except MeshlinkError as exc:
            self.give_up(session, f"moving to {ep.url} failed: {exc}", exc)
            return
        self.conn.endpoint, self.conn.choice = ep, choice
        logger.info("%s: session moved from %s to %s (%s)", self.name, before, ep.url,
                    choice.reason)
