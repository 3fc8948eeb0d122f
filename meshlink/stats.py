"""What a service is doing: counters per connection and per service, and their snapshot.

Theory of operation
-------------------
The hot path only increments plain integers that already live on the
objects it touches (the writer counts frames out and bytes sent, the
protocol core frames in, the connection bytes read, the request runner the
requests it answered): no lock, no allocation, no call per message.  This
module reads them only when someone asks -- the built-in bus method
:data:`STATS_METHOD`, ``meshlink stats``/``top``, or a Prometheus scrape
(:mod:`meshlink.metrics`) -- and adds them up per service.

:class:`ServiceStats` keeps the connections a server has open (with the
transport each came in on) and folds the counters of each one that ends
into the service's totals, so totals never go backwards.

``resumes`` and ``transport_moves`` are the service's: sessions resumed on
a new transport, and those resumed on another kind of transport (vchan to
TLS and back), from its :class:`~meshlink.session.SessionTable`.
"""

from __future__ import annotations

import time
from typing import Any, Final, Protocol

import trio

from .bus import Connection

__all__ = ["COUNTERS", "STATS_METHOD", "TRANSPORTS", "DiskStatsSource", "ServiceStats",
           "connection_counters"]

#: The bus method every :func:`meshlink.serve` server answers with its snapshot.
#: Reserved: a service may not register a method of that name.
STATS_METHOD: Final = "meshlink.stats"
TRANSPORTS: Final = ("vchan", "tls", "tcp")
#: The counters of one connection, summed per service (all only ever grow).
COUNTERS: Final = ("messages_in", "messages_out", "bytes_in", "bytes_out", "calls_done",
                   "errors", "resumes", "transport_moves")


class SessionCounts(Protocol):
    """What counts a service's session resumes (:class:`meshlink.session.SessionTable`)."""

    resumed: int
    moved: int


class DiskStatsSource(Protocol):
    """What reports disk counters (:class:`meshlink.disk.DiskStats`)."""

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Counters per disk and path."""
        ...


def connection_counters(conn: Connection) -> dict[str, int]:
    """The counters of one bus connection (messages are frames of any kind).

    ``calls_done`` and ``errors`` count the peer's requests this end answered
    and how many of those failed (handler raised, unknown method, cancelled);
    ``calls_in_flight`` counts requests running here plus our own calls
    waiting for a reply.
    """
    writer = conn._writer
    rpc = conn._rpc
    return {
        "messages_in": conn._proto.frames_in,
        "messages_out": writer.frames,
        "bytes_in": conn.bytes_in,
        "bytes_out": writer.bytes_out,
        "calls_done": rpc.served,
        "errors": rpc.served_errors,
        "resumes": 0,
        "transport_moves": 0,
        "calls_in_flight": conn._proto.requests_in_flight + len(rpc._calls),
    }


def _ring_fill(stream: trio.abc.Stream) -> dict[str, int] | None:
    """Bytes readable and free in a vchan ring, or None (other transports, closed)."""
    from .session import SessionStream
    from .transport.vchan import VchanStream

    if isinstance(stream, SessionStream):  # the transport carrying the session now
        if stream.transport is None:
            return None
        stream = stream.transport
    if not isinstance(stream, VchanStream) or stream._closed:
        return None
    ring = stream._ring
    if ring._v is None:  # freed: the C object is gone, do not touch it
        return None
    try:
        return {"readable": ring.data_ready(), "free": ring.buffer_space()}
    except OSError:
        return None


class ServiceStats:
    """The counters of one service: its open connections and the totals of closed ones.

    Args:
        name: the service name.
        disks: the counters of disks this process serves, reported under
            ``disks`` (see :mod:`meshlink.disk.counters`), or None.

    Attributes:
        opened: connections accepted so far, per transport.
        refused: connections refused at authentication, per transport.
        failed: connections that ended with an error (protocol, lost peer).
    """

    def __init__(self, name: str, disks: DiskStatsSource | None = None) -> None:
        self.name = name
        self.disks = disks
        self.started = time.time()
        self._t0 = time.monotonic()
        self.opened = dict.fromkeys(TRANSPORTS, 0)
        self.refused = dict.fromkeys(TRANSPORTS, 0)
        self.failed = 0
        self._closed = dict.fromkeys(COUNTERS, 0)
        self._live: dict[Connection, tuple[str, float]] = {}
        #: Where resumes and moves are counted (a SessionTable), if anywhere.
        self.sessions: SessionCounts | None = None

    def add(self, conn: Connection, transport: str) -> None:
        """Count ``conn`` (accepted over ``transport``) as open."""
        self._live[conn] = (transport, time.monotonic())

    def remove(self, conn: Connection) -> None:
        """``conn`` ended: fold its counters into the totals."""
        if self._live.pop(conn, None) is None:
            return
        counts = connection_counters(conn)
        for key in COUNTERS:
            self._closed[key] += counts[key]

    def totals(self) -> dict[str, int]:
        """The service's counters: closed connections plus open ones, now."""
        out = dict(self._closed)
        in_flight = 0
        for conn in list(self._live):
            counts = connection_counters(conn)
            for key in COUNTERS:
                out[key] += counts[key]
            in_flight += counts["calls_in_flight"]
        out["calls_in_flight"] = in_flight
        if self.sessions is not None:
            out["resumes"] = self.sessions.resumed
            out["transport_moves"] = self.sessions.moved
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything, as a msgpack- and JSON-able dict (what :data:`STATS_METHOD` returns).

        Keys: ``service``, ``started`` (Unix time), ``uptime`` (s),
        ``totals`` (:data:`COUNTERS` and ``calls_in_flight``), ``transports``
        (per transport: ``open``, ``total``, ``refused``),
        ``connection_errors``, and ``connections``: one dict per open
        connection with ``peer``, ``transport`` (for a session, the one
        carrying it now), ``age`` (s), the counters
        and, on vchan, ``ring`` (``readable``/``free`` bytes of our rings).
        With a disk counter source, also ``disks``: per disk, per path
        (``blk``, ``nbd``, ``total``) the request, byte, error and latency
        counters (:meth:`meshlink.disk.DiskStats.snapshot`).
        """
        now = time.monotonic()
        open_per = dict.fromkeys(TRANSPORTS, 0)
        conns: list[dict[str, Any]] = []
        from .session import SessionStream

        for conn, (transport, since) in list(self._live.items()):
            stream = conn._stream
            if isinstance(stream, SessionStream) and stream.label:
                transport = stream.label  # where the session is now (it may have moved)
            open_per[transport] = open_per.get(transport, 0) + 1
            try:
                peer = conn.peer_name
            except AssertionError:  # still in its handshake
                peer = ""
            row: dict[str, Any] = {"peer": peer, "transport": transport,
                                   "age": round(now - since, 3)}
            row.update(connection_counters(conn))
            ring = _ring_fill(conn._stream)
            if ring is not None:
                row["ring"] = ring
            conns.append(row)
        out: dict[str, Any] = {
            "service": self.name,
            "started": self.started,
            "uptime": round(now - self._t0, 3),
            "totals": self.totals(),
            "transports": {t: {"open": open_per.get(t, 0), "total": self.opened.get(t, 0),
                               "refused": self.refused.get(t, 0)}
                           for t in TRANSPORTS},
            "connection_errors": self.failed,
            "connections": conns,
        }
        if self.disks is not None:
            out["disks"] = self.disks.snapshot()
        return out
