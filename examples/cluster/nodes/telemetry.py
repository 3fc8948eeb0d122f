"""The telemetry subscriber: prints every worker's progress as the storage node relays it.

Connects to ``storage-node`` by name, subscribes to ``progress/`` (policy
``drop_oldest``: a slow terminal never slows the cluster; ``dropped`` counts
what it lost), then calls ``watch()`` so the storage node relays to it.  It
prints ``RESULT {"subscribed": ...}`` once it listens (``run.py`` starts the
workers only then), one line per progress message, and stops when every
worker in ``--workers`` has said it finished, or after ``--deadline``
seconds.  The last line counts the messages seen per worker.

    MESHLINK_HOST_STORE=DIR MESHLINK_TLS_*=... python3 telemetry.py --workers w1,w2
"""

from __future__ import annotations

import argparse
import sys

import trio
from shared import NAME, PROGRESS, emit

import meshlink

#: Messages kept while nobody reads (``drop_oldest``): far more than a run publishes.
QUEUE = 4096


async def main(args: argparse.Namespace) -> int:
    workers = [w for w in args.workers.split(",") if w]
    events = dict.fromkeys(workers, 0)
    finished: set[str] = set()
    dropped = 0
    with trio.move_on_after(args.deadline):
        async with meshlink.connect(NAME, require_tls=True, client_name="telemetry") as conn:
            async with conn.subscribe(PROGRESS, policy="drop_oldest", queue_size=QUEUE) as sub:
                await conn.call("watch")
                emit(subscribed=True, bus=conn.transport)
                async for topic, msg in sub:
                    worker = topic.removeprefix(PROGRESS)
                    if worker not in events:
                        continue  # not one of ours: ignore rather than trust it
                    events[worker] += 1
                    if msg.get("finished"):
                        finished.add(worker)
                        print(f"{worker}: finished, {msg.get('done')} jobs", flush=True)
                        if finished >= set(workers):
                            break
                    else:
                        state = "verified" if msg.get("verified") else "CHECKSUM MISMATCH"
                        print(f"{worker}: job {msg.get('job'):>3}  {msg.get('done')}/"
                              f"{msg.get('of')}  {msg.get('bytes', 0) / 2**20:6.1f} MiB  "
                              f"{state}", flush=True)
                dropped = sub.dropped
    emit(events=events, finished=sorted(finished), dropped=dropped)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="telemetry subscriber of the cluster example")
    p.add_argument("--workers", required=True, help="comma-separated worker names")
    p.add_argument("--deadline", type=float, default=50, help="stop after this many seconds")
    try:
        sys.exit(trio.run(main, p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
