"""Prometheus text exposition of a service's counters, on an address the user chose.

``serve(..., metrics="HOST:PORT")`` (``meshlink serve-echo --metrics``)
listens there and answers ``GET /metrics`` (and ``/``) with the counters of
:class:`meshlink.stats.ServiceStats`, rendered by ``prometheus_client`` (the
optional extra ``meshlink[metrics]``) from a collector that reads them at
scrape time: scraping costs the bus nothing between scrapes.

The HTTP side is a few lines of trio in the service's own nursery rather
than ``prometheus_client.start_http_server``: no thread reading counters
while the bus changes them, and the listener goes away with the service.
Nothing listens unless asked; a bare port binds loopback only.  Each scrape
is bounded: 8 KiB of request head, 5 s, 16 at once (more are closed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import trio

from .errors import LocalProtocolError
from .stats import TRANSPORTS, ServiceStats

__all__ = ["metrics_address", "open_metrics_listeners", "require_prometheus", "serve_metrics"]

DEFAULT_HOST: Final = "127.0.0.1"
_MAX_HEAD: Final = 8192
_TIMEOUT: Final = 5.0
_MAX_SCRAPES: Final = 16
_HELP: Final = {
    "messages_in": "Bus frames received",
    "messages_out": "Bus frames sent",
    "bytes_in": "Bytes received from transports",
    "bytes_out": "Bytes sent to transports",
    "calls_done": "Requests of peers answered",
    "errors": "Requests of peers answered with an error",
    "resumes": "Sessions resumed on a new transport",
    "transport_moves": "Sessions resumed on another kind of transport",
}


def metrics_address(value: str | int | tuple[str, int]) -> tuple[str, int]:
    """``(host, port)`` from ``"HOST:PORT"``, ``"[V6]:PORT"``, ``"PORT"``, a port or a pair.

    Raises:
        LocalProtocolError: not an address with a port in 0..65535.
    """
    if isinstance(value, tuple):
        host, port = value
    elif isinstance(value, int) and not isinstance(value, bool):
        host, port = DEFAULT_HOST, value
    elif isinstance(value, str):
        text = value.strip()
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host = ""
        host = host.strip("[]") or DEFAULT_HOST
        try:
            port = int(port_text)
        except ValueError:
            raise LocalProtocolError(f"metrics address must be HOST:PORT or PORT, "
                                     f"not {value!r}") from None
    else:
        raise LocalProtocolError(f"metrics address must be HOST:PORT or PORT, not {value!r}")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise LocalProtocolError(f"metrics port must be in 0..65535, not {port!r}")
    return str(host), port


def require_prometheus() -> None:
    """Raise unless ``prometheus_client`` can be imported.

    Raises:
        LocalProtocolError: it is missing (says how to install it).
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise LocalProtocolError(
            "metrics need prometheus_client: pip install 'meshlink[metrics]' "
            "(or prometheus_client>=0.17)") from None


class _Collector:
    """Reads a :class:`ServiceStats` at each scrape (prometheus_client's collector protocol)."""

    def __init__(self, stats: ServiceStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._stats.snapshot()
        svc = snap["service"]
        totals = snap["totals"]
        for key, text in _HELP.items():
            fam = CounterMetricFamily(f"meshlink_{key}", text, labels=["service"])
            fam.add_metric([svc], totals[key])
            yield fam
        gauge = GaugeMetricFamily("meshlink_calls_in_flight",
                                  "Requests running here plus our calls awaiting a reply",
                                  labels=["service"])
        gauge.add_metric([svc], totals["calls_in_flight"])
        yield gauge
        opened = GaugeMetricFamily("meshlink_connections_open", "Connections open",
                                   labels=["service", "transport"])
        total = CounterMetricFamily("meshlink_connections", "Connections accepted",
                                    labels=["service", "transport"])
        refused = CounterMetricFamily("meshlink_connections_refused",
                                      "Connections refused at authentication",
                                      labels=["service", "transport"])
        for t in TRANSPORTS:
            per = snap["transports"][t]
            opened.add_metric([svc, t], per["open"])
            total.add_metric([svc, t], per["total"])
            refused.add_metric([svc, t], per["refused"])
        yield from (opened, total, refused)
        fam = CounterMetricFamily("meshlink_connection_errors",
                                  "Connections that ended with an error", labels=["service"])
        fam.add_metric([svc], snap["connection_errors"])
        yield fam
        gauge = GaugeMetricFamily("meshlink_uptime_seconds",
                                  "Seconds since the service started", labels=["service"])
        gauge.add_metric([svc], snap["uptime"])
        yield gauge


def render(stats: ServiceStats) -> tuple[bytes, str]:
    """The exposition text of ``stats`` and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))
    return generate_latest(registry), CONTENT_TYPE_LATEST


async def open_metrics_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the metrics endpoint (before the service advertises itself)."""
    return await trio.open_tcp_listeners(port, host=host)


async def serve_metrics(listeners: list[trio.SocketListener], stats: ServiceStats) -> None:
    """Answer scrapes on ``listeners`` until cancelled."""
    busy = 0

    async def one(stream: trio.SocketStream) -> None:
        nonlocal busy
        if busy >= _MAX_SCRAPES:
            await trio.aclose_forcefully(stream)
            return
        busy += 1
        try:
            with trio.move_on_after(_TIMEOUT):
                await _answer(stream, stats)
        except (trio.BrokenResourceError, OSError):
            pass  # deliberate: the scraper went away; nothing to tell it
        finally:
            busy -= 1
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(one, listeners)


async def _answer(stream: trio.SocketStream, stats: ServiceStats) -> None:
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) > _MAX_HEAD:
            await _reply(stream, 431, b"request head too large\n", "text/plain")
            return
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        head += chunk
    parts = bytes(head).split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
        await _reply(stream, 405, b"only GET\n", "text/plain")
        return
    if parts[1].split(b"?", 1)[0] not in (b"/", b"/metrics"):
        await _reply(stream, 404, b"try /metrics\n", "text/plain")
        return
    body, ctype = render(stats)
    await _reply(stream, 200, b"" if parts[0] == b"HEAD" else body, ctype, len(body))


async def _reply(stream: trio.SocketStream, status: int, body: bytes, ctype: str,
                 length: int | None = None) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
              431: "Request Header Fields Too Large"}[status]
    head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n")
    await stream.send_all(head.encode() + body)
