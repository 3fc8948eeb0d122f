"""The storage node: one disk over the blk ring and NBD at once, and a bus service for metadata.

* The disk (``storage-node/disk0``, a RAM disk) is served by
  ``meshlink.disk.serve`` on the blk ring (co-located workers find
  ``storage-node.blk`` in their host store) and on NBD with TLS required
  (remote workers; their client certificates must be signed by the run's CA).
* The bus service ``storage-node`` (vchan through the host store, mutual TLS
  on ``--bind``; never plain TCP) hands out jobs and checks them:

  ``join(worker)``
      registers a worker and subscribes to its ``progress/`` topic, so what
      it publishes is relayed to every telemetry watcher;
  ``claim(worker)``
      the worker's next job ``{job, offset, length}``, or ``None`` when its
      share is done (each worker gets ``--jobs`` jobs, on disjoint regions);
  ``report(worker, job, checksum)``
      re-reads the region from the disk's backend and checks both the
      worker's checksum and the content against what the job had to write;
  ``finish(worker)``
      the worker is done (its earlier publishes have been read by then:
      frames on one connection arrive in order);
  ``watch()``
      the calling connection receives every worker's progress (telemetry);
  ``summary()``
      the ledger.

  Like every ``meshlink.serve`` server it also answers ``meshlink.stats``;
  given the disk's :class:`~meshlink.disk.DiskStats`, that reports the
  disk's requests, bytes and latency per path (blk, NBD) too.

On SIGTERM (or after ``--deadline`` seconds) it stops, re-reads every job's
region once more (a scrub: a later stray write is caught too) and prints the
ledger as its last line.

    MESHLINK_HOST_STORE=DIR MESHLINK_TLS_CERT=... MESHLINK_TLS_KEY=... MESHLINK_TLS_CA=... \\
        python3 storage.py --workers w1,w2 --jobs 8 --job-size 1048576 [--bind ADDR]
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from shared import DISK, NAME, PROGRESS, checksum, emit, job_bytes

import meshlink
import meshlink.disk
from meshlink.bus import Connection, Handlers, current_connection
from meshlink.disk import DiskStats, MemoryBackend
from meshlink.transport.tls import TLSConfig

#: Tries at binding a free NBD port (``--nbd-port 0``): another process may take it first.
PORT_TRIES = 5


@dataclass
class Tally:
    """What one worker did, as the storage node saw it."""

    joined: bool = False
    finished: bool = False
    claimed: int = 0
    verified: int = 0
    failed: int = 0
    bytes: int = 0
    progress: int = 0  # progress messages relayed
    scrub_ok: int = 0
    scrub_bad: int = 0


@dataclass
class Ledger:
    """Jobs handed out and checked; the connections that watch progress."""

    backend: MemoryBackend
    jobs: int
    job_size: int
    workers: dict[str, Tally]
    nursery: trio.Nursery
    next_job: int = 0
    owner: dict[int, str] = field(default_factory=dict)  # job -> worker
    watchers: set[Connection] = field(default_factory=set)

    def tally(self, worker: str) -> Tally:
        """The worker's tally; a name outside the roster is refused (``ValueError``)."""
        try:
            return self.workers[worker]
        except KeyError:
            raise ValueError(f"{worker!r} is not a worker of this cluster") from None

    def region_ok(self, job: int) -> bool:
        """Whether the disk holds exactly what job ``job`` had to write."""
        held = bytes(self.backend.read(job * self.job_size, self.job_size))
        return held == job_bytes(job, self.job_size)

    async def relay(self, conn: Connection, worker: str,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe to ``worker``'s progress and pass each message on to the watchers."""
        try:
            async with conn.subscribe(PROGRESS + worker) as sub:
                task_status.started()
                async for topic, message in sub:
                    self.workers[worker].progress += 1
                    for watcher in list(self.watchers):
                        try:
                            await watcher.publish(topic, message)
                        except (meshlink.MeshlinkError, trio.ClosedResourceError):
                            self.watchers.discard(watcher)  # it left; the others go on
        except (meshlink.MeshlinkError, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # deliberate: the worker's connection ended; nothing is left to relay

    def summary(self) -> dict[str, Any]:
        """The ledger as plain data (msgpack and JSON friendly)."""
        return {w: vars(t).copy() for w, t in self.workers.items()}


def make_handlers(ledger: Ledger) -> Handlers:
    """The storage node's bus methods (see the module docstring)."""
    h = Handlers()

    @h.method
    async def join(worker: str) -> dict[str, Any]:
        tally = ledger.tally(worker)
        if tally.joined:  # one relay per worker: a second join would count twice
            raise ValueError(f"{worker!r} has already joined")
        # Subscribed before join returns: the worker's first publish is not missed.
        await ledger.nursery.start(ledger.relay, current_connection(), worker)
        tally.joined = True
        return {"disk": DISK, "jobs": ledger.jobs, "job_size": ledger.job_size}

    @h.method
    async def claim(worker: str) -> dict[str, int] | None:
        tally = ledger.tally(worker)
        if tally.claimed >= ledger.jobs:
            return None
        job = ledger.next_job
        ledger.next_job += 1
        ledger.owner[job] = worker
        tally.claimed += 1
        return {"job": job, "offset": job * ledger.job_size, "length": ledger.job_size}

    @h.method
    async def report(worker: str, job: int, digest: str) -> bool:
        tally = ledger.tally(worker)
        if ledger.owner.get(job) != worker:
            raise ValueError(f"job {job} was not claimed by {worker!r}")
        expected = checksum(job_bytes(job, ledger.job_size))
        ok = digest == expected and ledger.region_ok(job)
        if ok:
            tally.verified += 1
            tally.bytes += 2 * ledger.job_size  # written, then read back
        else:
            tally.failed += 1
        return ok

    @h.method
    async def finish(worker: str) -> None:
        ledger.tally(worker).finished = True

    @h.method
    async def watch() -> list[str]:
        ledger.watchers.add(current_connection())
        return list(ledger.workers)

    @h.method
    async def summary() -> dict[str, Any]:
        return ledger.summary()

    return h


def free_port(host: str) -> int:
    """A port free on ``host`` right now (the NBD listener binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def start_disk(nursery: trio.Nursery, backend: MemoryBackend, bind: str, port: int,
                     tls: TLSConfig, stats: DiskStats) -> int:
    """Serve the disk on the blk ring and on NBD (TLS required); return the NBD port."""
    for attempt in range(PORT_TRIES):
        nbd_port = port or free_port(bind)
        try:
            await nursery.start(partial(
                meshlink.disk.serve, {DISK: backend}, f"{bind}:{nbd_port}", service=NAME,
                tls="required", ssl_context=tls.server_context(), stats=stats))
            return nbd_port
        except meshlink.AddressInUse:
            if port or attempt == PORT_TRIES - 1:
                raise
    raise AssertionError("unreachable")


async def main(args: argparse.Namespace) -> int:
    tls = TLSConfig.from_env()
    if tls is None or not tls.can_serve or not tls.can_connect:
        sys.exit("storage node: set MESHLINK_TLS_CERT, MESHLINK_TLS_KEY and MESHLINK_TLS_CA")
    workers = [w for w in args.workers.split(",") if w]
    backend = MemoryBackend(max(1, len(workers) * args.jobs) * args.job_size)
    with trio.move_on_after(args.deadline):
        async with trio.open_nursery() as nursery:
            ledger = Ledger(backend, args.jobs, args.job_size,
                            {w: Tally() for w in workers}, nursery)
            # The disk's counters, reported by the bus service's built-in
            # meshlink.stats method next to the bus counters.
            disk_stats = DiskStats()
            nbd_port = await start_disk(nursery, backend, args.bind, args.nbd_port, tls,
                                        disk_stats)

            async def bus(task_status: trio.TaskStatus[meshlink.Server]) -> None:
                await meshlink.serve(NAME, make_handlers(ledger), bind=args.bind, tls=tls,
                                     tls_port=args.tls_port, require_tls=True,
                                     disk_stats=disk_stats, task_status=task_status)
                nursery.cancel_scope.cancel()  # SIGTERM: the bus withdrew; stop the disk too

            server = await nursery.start(bus)
            emit(ready=True, bus=[ep.url for ep in server.endpoints],
                 tls=f"{args.bind}:{server.tls_port}", nbd=f"{args.bind}:{nbd_port}",
                 disk_bytes=backend.size)
    # Scrub: every job's region once more, after everyone stopped writing.
    for job, worker in sorted(ledger.owner.items()):
        tally = ledger.workers[worker]
        if ledger.region_ok(job):
            tally.scrub_ok += 1
        else:
            tally.scrub_bad += 1
    emit(summary=ledger.summary())
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="storage node of the cluster example")
    p.add_argument("--workers", required=True, help="comma-separated worker names")
    p.add_argument("--jobs", type=int, default=8, help="jobs per worker")
    p.add_argument("--job-size", type=int, default=1 << 20, help="bytes per job")
    p.add_argument("--bind", default="127.0.0.1", help="address of the TLS and NBD listeners")
    p.add_argument("--tls-port", type=int, default=0, help="bus TLS port (0: any free)")
    p.add_argument("--nbd-port", type=int, default=0, help="NBD port (0: any free)")
    p.add_argument("--deadline", type=float, default=120, help="stop after this many seconds")
    try:
        sys.exit(trio.run(main, p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
