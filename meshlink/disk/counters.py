"""What served disks are doing: request, byte, error and latency counters per disk.

Theory of operation
-------------------
The caller makes one :class:`DiskStats` and hands it to
:func:`meshlink.disk.serve` (``stats=``); nothing is global.  Each served
disk is counted per path (``blk``, ``nbd``).  The serving loops only add
to plain integer attributes of an object they already hold: no lock (one
task or one worker thread writes each), no allocation per request.

Each connection gets its own :class:`DiskCounters` (so the NBD worker
threads of two connections never add to the same integer), kept by the
:class:`DiskStats` while open and folded into its totals when the
connection ends, so totals never go backwards.  The native blk loop counts
kinds, bytes, errors and latency in C, on its ring (``ml_blk_back_counters``,
relaxed atomics: it may run in a thread of its own); its connection's
counters read them through ``native``.  Latency is the time
the disk took (``monotonic_ns``): per request in the Python loops, around
one served batch in the native loop (counted once per request of the
batch), so the sum over the count is the mean service time per request.
It excludes the time on the wire.

:meth:`DiskStats.snapshot` is what ``meshlink.stats`` reports under
``disks`` when the same :class:`DiskStats` is given to :func:`meshlink.serve`
(``disk_stats=``).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

__all__ = ["DISK_COUNTERS", "DiskCounters", "DiskStats"]

#: The counters of one disk on one path (all only ever grow).
DISK_COUNTERS: Final = ("reads", "writes", "flushes", "discards", "other",
                        "bytes_read", "bytes_written", "errors",
                        "latency_ns_sum", "latency_count")
PATHS: Final = ("blk", "nbd")


class _NativeSource(Protocol):
    def native_counters(self) -> list[int]: ...


class DiskCounters:
    """One connection's counters; its serving loop adds to the attributes.

    Attributes:
        native: a blk ring served by the C loop, whose own counters (the
            first eight of :data:`DISK_COUNTERS`) are added in, or None.
    """

    __slots__ = (*DISK_COUNTERS, "native", "key")

    def __init__(self, key: tuple[str, str] = ("", "")) -> None:
        self.reads = self.writes = self.flushes = self.discards = self.other = 0
        self.bytes_read = self.bytes_written = self.errors = 0
        self.latency_ns_sum = self.latency_count = 0
        self.native: _NativeSource | None = None
        self.key = key

    def values(self) -> list[int]:
        """The counters now, in :data:`DISK_COUNTERS` order (the C loop's included)."""
        out = [getattr(self, name) for name in DISK_COUNTERS]
        if self.native is not None:
            for i, value in enumerate(self.native.native_counters()):
                out[i] += value
        return out


class DiskStats:
    """The counters of every disk a :func:`meshlink.disk.serve` call serves.

    Give one to ``meshlink.disk.serve(stats=...)`` (and to
    ``meshlink.serve(disk_stats=...)`` to report it over the bus).  Like
    :class:`meshlink.stats.ServiceStats`, it keeps the connections open now
    and folds each one's counters into the totals when it ends.
    """

    def __init__(self) -> None:
        self._closed: dict[tuple[str, str], list[int]] = {}
        self._live: set[DiskCounters] = set()

    def open(self, disk: str, path: str) -> DiskCounters:
        """Counters for a new connection to ``disk`` over ``path`` (``blk`` or ``nbd``)."""
        counters = DiskCounters((disk, path))
        self._closed.setdefault(counters.key, [0] * len(DISK_COUNTERS))
        self._live.add(counters)
        return counters

    def close(self, counters: DiskCounters) -> None:
        """The connection ended: fold its counters in (a blk ring's before it is freed)."""
        if counters not in self._live:
            return
        self._live.discard(counters)
        total = self._closed[counters.key]
        for i, value in enumerate(counters.values()):
            total[i] += value

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per disk: ``{"blk": {...}, "nbd": {...}, "total": {...}}`` (msgpack- and JSON-able).

        Each holds :data:`DISK_COUNTERS`, ``requests`` (all kinds) and
        ``connections`` (open now); ``total`` adds up the paths.  A path
        appears once a client has connected over it.
        """
        sums = {key: list(values) for key, values in self._closed.items()}
        open_now = dict.fromkeys(sums, 0)
        for counters in list(self._live):
            row = sums[counters.key]
            for i, value in enumerate(counters.values()):
                row[i] += value
            open_now[counters.key] += 1
        out: dict[str, dict[str, Any]] = {}
        for (disk, path), values in sorted(sums.items()):
            snap: dict[str, int] = dict(zip(DISK_COUNTERS, values, strict=True))
            snap["requests"] = sum(values[:5])
            snap["connections"] = open_now[(disk, path)]
            per_disk = out.setdefault(disk, {})
            per_disk[path] = snap
            total = per_disk.setdefault("total", dict.fromkeys(snap, 0))
            for name, value in snap.items():
                total[name] += value
        return out
