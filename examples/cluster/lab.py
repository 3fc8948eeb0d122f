"""The "VMs" of the cluster example: network namespaces on a bridge, and node processes.

:class:`Lab` (root only) makes three network namespaces for one run: a
``lan`` namespace holding a bridge, and two hosts, ``host-a`` and
``host-b``, each with an ``eth0`` (a veth whose other end is on the bridge)
addressed in ``SUBNET``.  Nothing is added to the namespace ``run.py`` runs
in, so the example's traffic can only reach what it created; :meth:`Lab.down`
deletes the namespaces, and the veths and the bridge with them.  Names carry
the run's pid, so two runs never collide.

:class:`Node` is one node process (``ip netns exec HOST python3 ...`` under a
lab, a plain process otherwise): a thread copies its output to ours, prefixed
with the node's name, and hands its ``RESULT`` lines (JSON) to
:meth:`Node.result`; :meth:`Node.stop` ends it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: The hosts' addresses live only on the lab's bridge.
SUBNET = "10.77.0"
HOSTS = ("host-a", "host-b")
#: Bound on each ``ip`` command and on a node's exit after SIGTERM.
STEP_TIMEOUT = 10.0
_print_lock = threading.Lock()


class Failure(Exception):
    """The run cannot go on; the message says why."""


def say(line: str) -> None:
    """Print one line (several threads print)."""
    with _print_lock:
        print(line, flush=True)


class Lab:
    """Network namespaces joined by a bridge, one per simulated host."""

    def __init__(self, tag: str) -> None:
        self.lan = f"{tag}-lan"
        self.netns = {host: f"{tag}-{host}" for host in HOSTS}
        self._made: list[str] = []

    def address(self, host: str) -> str:
        """The host's address on the bridge."""
        return f"{SUBNET}.{HOSTS.index(host) + 1}"

    def _ip(self, *args: str) -> None:
        out = subprocess.run(["ip", *args], capture_output=True, text=True,
                             timeout=STEP_TIMEOUT)
        if out.returncode != 0:
            raise Failure(f"ip {' '.join(args)}: {out.stderr.strip()}")

    def up(self) -> None:
        """Create the namespaces, the bridge and the links (undone by :meth:`down`)."""
        for ns in (self.lan, *self.netns.values()):
            self._ip("netns", "add", ns)
            self._made.append(ns)
        self._ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.lan, "link", "set", "br0", "up")
        for host, ns in self.netns.items():
            port = f"v-{host}"
            self._ip("-n", self.lan, "link", "add", port, "type", "veth",
                     "peer", "name", "eth0", "netns", ns)
            self._ip("-n", self.lan, "link", "set", port, "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        """Delete every namespace made (their veths and the bridge go with them)."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                           timeout=STEP_TIMEOUT)
        self._made.clear()

    def wrap(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.netns[host], *argv]


class Node:
    """One node process; its ``RESULT`` lines are queued for :meth:`result`."""

    def __init__(self, name: str, host: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.host = host
        self._results: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                try:
                    self._results.put(json.loads(line[7:]))
                except ValueError:
                    say(f"  [{self.name}] unreadable result line: {line.rstrip()}")
            else:
                say(f"  [{self.name}] {line.rstrip()}")
        self._results.put(None)  # end of output: the process is ending

    def result(self, key: str, deadline: float) -> dict[str, Any]:
        """The next result line holding ``key``, waiting until ``deadline`` (monotonic).

        Raises:
            Failure: the process ended first, or the deadline passed.
        """
        while True:
            remaining = deadline - time.monotonic()
            try:
                got = self._results.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise Failure(f"{self.name}: no {key!r} before the deadline") from None
            if got is None:
                self._results.put(None)  # keep the end marker for later callers
                rc = self.proc.wait(timeout=STEP_TIMEOUT)
                raise Failure(f"{self.name} exited (status {rc}) without reporting {key!r}")
            if key in got:
                return got

    def stop(self) -> None:
        """End the process: SIGTERM, then SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(timeout=STEP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def python(script: Path, *args: str) -> list[str]:
    """The command line running ``script`` with this interpreter."""
    return [sys.executable, str(script), *args]
