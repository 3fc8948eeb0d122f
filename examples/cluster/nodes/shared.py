"""What every node of the cluster example agrees on: names, job content, result lines.

Each node is its own process (in its own network namespace when the example
runs as root), so the only things they share are these few definitions and
the storage node's bus service.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

#: The storage node's service name (bus) and, with ``.blk`` / ``.nbd``, its disks.
NAME = "storage-node"
#: The one disk the storage node exports.
DISK = "disk0"
#: Topic prefix of the workers' progress messages.
PROGRESS = "progress/"
#: Lines a node prints for ``run.py`` to read start with this word; the rest is JSON.
RESULT = "RESULT"


def job_bytes(job: int, length: int) -> bytes:
    """The content job ``job`` writes: pseudo-random, but the same in every process.

    A string seed is hashed (SHA-512) by :class:`random.Random`, so the storage
    node can regenerate exactly what a worker was meant to write.
    """
    return random.Random(f"meshlink-cluster/job/{job}").randbytes(length)


def checksum(data: bytes) -> str:
    """SHA-256 of ``data``, hex: what workers report and the storage node recomputes."""
    return hashlib.sha256(data).hexdigest()


def emit(**fields: Any) -> None:
    """Print one machine-readable line for ``run.py`` (``RESULT {json}``)."""
    print(RESULT, json.dumps(fields, sort_keys=True), flush=True)
