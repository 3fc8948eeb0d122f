"""Serving a bus: the entry points a server uses, and what its handlers can ask.

:func:`serve_bus` runs one connection over an accepted stream until it ends;
:func:`serve_bus_listeners` accepts forever and serves each connection,
logging (not raising) the failure of one, within the limits a server shares
between its connections (:mod:`.limits`).  A handler finds the connection it
serves with :func:`current_connection`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..errors import MeshlinkError
from .config import BusConfig
from .connection import CURRENT, Connection
from .handlers import Handlers
from .limits import ServerLimits

__all__ = ["current_connection", "serve_bus", "serve_bus_listeners"]

logger = logging.getLogger("meshlink.bus")


def current_connection() -> Connection:
    """Return the connection whose handler is running in the current task.

    Raises:
        LookupError: not called from inside a bus handler.
    """
    return CURRENT.get()


async def serve_bus(
    stream: trio.abc.Stream,
    handlers: Handlers,
    *,
    name: str = "",
    config: BusConfig | None = None,
    server_limits: ServerLimits | None = None,
) -> None:
    """Serve ``handlers`` to the peer at the other end of ``stream`` until it leaves.

    Suitable as the handler of :func:`trio.serve_listeners` when you want errors
    to propagate; :func:`serve_bus_listeners` logs them instead.

    Args:
        stream: the accepted transport stream (owned and closed by this call).
        handlers: the methods and stream handlers to serve.
        name: our service name, sent in the handshake.
        config: limits and timers.
        server_limits: the budget shared with the server's other connections
            (incomplete frames); none by default.

    Raises:
        RemoteProtocolError: the peer sent malformed input (the connection was
            closed with a close frame naming the error).
        ConnectionLost: the peer vanished without closing (crash, heartbeat).
        HandshakeError: the handshake failed (``VersionMismatch`` included).

    Cancellation:
        Closes the connection; running handlers are cancelled.

    Backpressure:
        Per connection, as configured in ``config``.
    """
    async with Connection.open(
        stream, handlers, name=name, config=config, server_limits=server_limits
    ) as conn:
        await conn.wait_closed()
    err = conn.error
    if err is not None:
        raise err


async def serve_bus_listeners(
    handlers: Handlers,
    listeners: list[trio.abc.Listener[Any]],
    *,
    name: str = "",
    config: BusConfig | None = None,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever and serve ``handlers`` on each.

    A connection that fails (malformed input, dead peer, bad handshake) is
    logged on the ``meshlink.bus`` logger and closed; the others go on.
    Every connection shares the server's budget of ``config.max_partial_bytes``
    for incomplete frames; one that would exceed it is closed.

    Args:
        handlers: what every connection serves.
        listeners: trio listeners (TCP, Unix, vchan...).
        name: our service name.
        config: limits and timers of each connection, and the server's
            ``max_connections`` and ``max_partial_bytes``.
        max_connections: connections open at once (default
            ``config.max_connections``, 256); one more is closed as soon as it
            is accepted, with a warning at most every 10 s.
        task_status: receives ``listeners`` once accepting (``nursery.start``).

    Cancellation:
        Stops accepting and closes every connection.
    """
    cfg = config or BusConfig()
    limits = ServerLimits(
        cfg.max_connections if max_connections is None else max_connections,
        cfg.max_partial_bytes,
    )

    async def one(stream: trio.abc.Stream) -> None:
        if not limits.admit():
            await trio.aclose_forcefully(stream)
            return
        try:
            await serve_bus(stream, handlers, name=name, config=cfg, server_limits=limits)
        except (MeshlinkError, trio.BrokenResourceError, OSError) as exc:
            logger.info("bus connection ended with an error: %r", exc)
        finally:
            limits.release()

    await trio.serve_listeners(one, listeners, task_status=task_status)
