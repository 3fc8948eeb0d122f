"""Two "hosts" on one machine: network namespaces joined by a veth pair.

Tests that need root and iproute2 use :func:`veth_pair`; it deletes what it
made on the way out, whatever happened.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Hosts", "ip", "veth_pair"]

_ids = itertools.count()


def ip(*args: str) -> None:
    """Run ``ip ARGS`` (raises on failure)."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Hosts:
    """Namespaces ``a`` and ``b``, their veth ends ``dev_a``/``dev_b`` and addresses."""

    a: str
    b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str

    def cmd(self, ns: str, *args: str) -> list[str]:
        """``args`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *args]


@contextmanager
def veth_pair(addr_a: str, addr_b: str, tag: str = "x") -> Iterator[Hosts]:
    """Make two namespaces joined by a veth (/24 addresses ``addr_a``, ``addr_b``)."""
    n = f"{os.getpid() % 100000}{tag}{next(_ids)}"
    h = Hosts(f"mlA{n}", f"mlB{n}", f"mla{n}"[:15], f"mlb{n}"[:15], addr_a, addr_b)
    try:
        ip("netns", "add", h.a)
        ip("netns", "add", h.b)
        ip("link", "add", h.dev_a, "type", "veth", "peer", "name", h.dev_b)
        ip("link", "set", h.dev_a, "netns", h.a)
        ip("link", "set", h.dev_b, "netns", h.b)
        for ns, dev, addr in ((h.a, h.dev_a, addr_a), (h.b, h.dev_b, addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        for ns in (h.a, h.b):  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", h.dev_a], capture_output=True, timeout=30)
