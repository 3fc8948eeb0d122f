"""The storage node's own counters, asked while the cluster runs and checked against the workers.

``run.py`` runs ``meshlink stats storage-node --json`` inside host-a (the
storage node's namespace, with its host store: the CLI reaches the service
over vchan, as any co-located client would) once the workers are done and
before anything stops.  The service answers its built-in ``meshlink.stats``
method: bus counters, and the disk's counters per path (the storage node
hands its ``DiskStats`` to ``meshlink.serve``).

The counters must account for at least what the workers say they did: bus
calls answered >= the workers' calls (join, claims, reports, finish; the
telemetry subscriber's calls come on top), and per disk path the write and
read requests and bytes >= what the workers on that path wrote and read.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from lab import Failure

NAME = "storage-node"
DISK = "disk0"
#: The table's disk column -> the path the storage node counts it under.
PATH_OF = {"blk": "blk", "nbd/tls": "nbd"}


def query(argv_prefix: list[str], python: str, store: Path, env: dict[str, str],
          timeout: float) -> dict[str, Any]:
    """``meshlink stats storage-node --json`` (in host-a when ``argv_prefix`` says so)."""
    argv = [*argv_prefix, python, "-m", "meshlink.cli", "stats", NAME, "--json",
            "--host-store", str(store)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env,
                             timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        raise Failure("meshlink stats: no answer in time") from None
    if out.returncode != 0:
        raise Failure(f"meshlink stats failed: {out.stderr.strip()[-300:]}")
    snap: dict[str, Any] = json.loads(out.stdout)
    return snap


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def report(snap: dict[str, Any], results: dict[str, dict[str, Any]]) -> bool:
    """Print the "storage-node stats" section; True if the counters cover the workers."""
    problems: list[str] = []
    t = snap["totals"]
    calls = sum(r["calls"] for r in results.values())
    print(f"\nstorage-node stats (meshlink stats {NAME} --json, while the cluster runs):")
    print(f"  bus   calls done {t['calls_done']} (workers made {calls}), "
          f"messages in {t['messages_in']} / out {t['messages_out']}, "
          f"bytes in {_mib(t['bytes_in'])} / out {_mib(t['bytes_out'])}, "
          f"errors {t['errors']}")
    if t["calls_done"] < calls:
        problems.append(f"bus calls done {t['calls_done']} < {calls} made by the workers")
    disk = snap.get("disks", {}).get(DISK, {})
    for path in ("blk", "nbd"):
        mine = [r for r in results.values() if PATH_OF.get(r["disk"]) == path]
        if not mine:
            continue
        want_w, want_r = sum(r["written"] for r in mine), sum(r["read"] for r in mine)
        jobs = sum(r["jobs"] for r in mine)
        row = disk.get(path)
        if row is None:
            problems.append(f"no {DISK} {path} counters")
            continue
        mean = row["latency_ns_sum"] / row["latency_count"] / 1e3 if row["latency_count"] else 0
        print(f"  {DISK} {path:<3} {row['writes']} writes {_mib(row['bytes_written'])}, "
              f"{row['reads']} reads {_mib(row['bytes_read'])}, {row['flushes']} flushes, "
              f"errors {row['errors']}, mean {mean:.0f} us/request "
              f"(its workers wrote {_mib(want_w)}, read {_mib(want_r)})")
        if row["bytes_written"] < want_w or row["bytes_read"] < want_r:
            problems.append(f"{path}: disk counted {row['bytes_written']} B written / "
                            f"{row['bytes_read']} B read < {want_w} / {want_r}")
        if row["writes"] < jobs or row["reads"] < jobs or row["flushes"] < jobs:
            problems.append(f"{path}: fewer requests counted than the workers' {jobs} jobs")
    print("  stats:", "match what the workers did" if not problems
          else "MISMATCH: " + "; ".join(problems))
    return not problems
