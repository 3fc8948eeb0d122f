"""A worker: claims jobs from the storage node, writes and re-reads blocks, reports checksums.

The same program runs on every "VM"; only its environment differs.  It finds
the storage node *by name*: ``meshlink.connect("storage-node")`` for the bus
(vchan when the host store proves co-location, else TLS at the endpoints of
the rules file) and ``meshlink.disk.open("storage-node/disk0")`` for the disk
(the blk ring when ``storage-node.blk`` is live in our host store, else NBD
over TLS at the endpoints of ``storage-node.nbd``).

For each job: write the job's deterministic content, flush, read it back,
compare, and report the SHA-256 of what was read; the storage node checks it
against its own copy of the disk.  After each job a progress message is
published on ``progress/WORKER`` (the storage node relays it to telemetry).
The last line is ``RESULT {json}``: the transports used, bytes moved, time,
and the bus calls made and disk bytes written and read (``run.py`` checks
them against the storage node's own counters).

    MESHLINK_HOST_STORE=DIR [MESHLINK_RULES=FILE] MESHLINK_TLS_CERT=... MESHLINK_TLS_KEY=... \\
        MESHLINK_TLS_CA=... python3 worker.py NAME [--no-vchan] [--fault]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import trio
from shared import NAME, PROGRESS, checksum, emit, job_bytes

import meshlink
import meshlink.disk
from meshlink.disk import BlkDisk

#: Upper bound on jobs whatever the storage node says (every loop is bounded).
MAX_JOBS = 10_000


async def main(args: argparse.Namespace) -> int:
    topic = PROGRESS + args.name
    with trio.fail_after(args.deadline):
        # require_tls: never plain TCP (vchan stays allowed: it never leaves the host).
        async with meshlink.connect(NAME, require_tls=True, forbid_vchan=args.no_vchan,
                                    client_name=args.name) as conn:
            plan: dict[str, Any] = await conn.call("join", args.name)
            calls = 1  # bus calls made, for the check against the storage node's stats
            async with meshlink.disk.open(f"{NAME}/{plan['disk']}") as disk:
                # disk.open(require_tls=True), its default, uses NBD only over TLS.
                kind = "blk" if isinstance(disk, BlkDisk) else "nbd/tls"
                done = reread_ok = verified = moved = last_offset = written = read = 0
                seconds = 0.0  # time in disk I/O only (the rate of the table)
                for _ in range(MAX_JOBS):
                    job = await conn.call("claim", args.name)
                    calls += 1
                    if job is None:
                        break
                    data = job_bytes(job["job"], job["length"])
                    last_offset = job["offset"]
                    start = time.perf_counter()
                    await disk.write(job["offset"], data)
                    await disk.flush()
                    back = bytes(await disk.read(job["offset"], job["length"]))
                    seconds += time.perf_counter() - start
                    moved += len(data) + len(back)
                    written += len(data)
                    read += len(back)
                    reread_ok += back == data
                    ok: bool = await conn.call("report", args.name, job["job"], checksum(back))
                    calls += 1
                    verified += ok
                    done += 1
                    await conn.publish(topic, {"worker": args.name, "job": job["job"],
                                               "done": done, "of": plan["jobs"],
                                               "bytes": moved, "verified": ok})
                if args.fault and done:
                    # For the test of the checker: a stray write after the last report.
                    await disk.write(last_offset, b"\xff" * 512)
                    await disk.flush()
                    written += 512
            await conn.publish(topic, {"worker": args.name, "finished": True, "done": done})
            await conn.call("finish", args.name)  # after our publishes: they have arrived
            calls += 1
            bus = conn.transport
    emit(worker=args.name, bus=bus, disk=kind, jobs=done, bytes=moved, seconds=seconds,
         reread_ok=reread_ok, verified=verified, calls=calls, written=written, read=read)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="worker of the cluster example")
    p.add_argument("name")
    p.add_argument("--no-vchan", action="store_true", help="never shared memory for the bus")
    p.add_argument("--deadline", type=float, default=45, help="give up after this many seconds")
    p.add_argument("--fault", action="store_true",
                   help="corrupt one sector after reporting (shows that the checks can fail)")
    try:
        sys.exit(trio.run(main, p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
