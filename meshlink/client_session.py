"""Keeping a client's session alive: resume, upgrade and renew (see ``docs/sessions.md``).

:class:`SessionDriver` runs beside every :class:`~meshlink.client.MeshConnection`
made with sessions:

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
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import trio

from resolver import Choice, Endpoint, Policy, Resolver

from .bus import Connection
from .errors import AuthError, MeshlinkError, SessionLost, resolver_errors
from .session import NEW, RESUMED, Greeting, SessionConfig, SessionStream, greet
from .transport.dial import ATTEMPT_ERRORS

if TYPE_CHECKING:
    from .client import MeshConnection

__all__ = ["OnNewSession", "SessionDriver"]

logger = logging.getLogger("meshlink.connect")

OnNewSession = Callable[["MeshConnection"], Awaitable[None] | None]


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
