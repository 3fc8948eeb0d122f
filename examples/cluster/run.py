"""A cluster across "VMs": one storage node, workers on two hosts, a telemetry subscriber.

    python3 examples/cluster/run.py [--workers 4] [--jobs 8] [--job-size 1M] [--one-host]

What runs (each node is its own process; the programs are in ``nodes/``):

* **storage node** (host-a): one RAM disk served over the blk ring *and* NBD
  (TLS required) at once with ``meshlink.disk.serve``, and the bus service
  ``storage-node`` (vchan + mutual TLS) that hands out jobs (``claim``),
  checks them (``report``: it re-reads the region from its own disk) and
  relays the workers' progress to the telemetry subscriber;
* **workers**: half on host-a, co-located with the storage node (the bus over
  vchan, the disk over the blk ring), half on host-b (the bus over TLS, the
  disk over NBD with TLS, found through a rules file).  Each job writes
  deterministic blocks, flushes, reads them back, compares, and reports the
  SHA-256; progress is published on pub/sub;
* **telemetry** (host-a): subscribes to the progress and prints it.

As root, host-a and host-b are network namespaces on a bridge (made here,
deleted at the end, also on Ctrl-C or failure); otherwise every node is a
process on this host, and the host-b workers are forced through TLS (their own
host store, vchan forbidden).  Either way each host has its own private host
store, and certificates are made at start for this run only.

It ends with a table (each worker, the transport of its bus and its disk,
bytes moved, rate, the checks) and exits 0 only if every checksum was
verified: by the worker's re-read, by the storage node when reported, by the
storage node's scrub at the end, and every worker's progress reached the
telemetry subscriber.  Before that, while the cluster still runs, it asks
the storage node for its counters (``meshlink stats storage-node --json``)
and prints them: they must account for the workers' bus calls and disk
bytes (see ``observe.py``), or the run fails too.  It stops by itself within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from lab import HOSTS, Failure, Lab, Node, python, say
from observe import query, report
from pki import Identity, make_pki

HERE = Path(__file__).resolve().parent
NODES = HERE / "nodes"
NAME = "storage-node"  # as in nodes/shared.py
#: Fixed ports inside the lab's namespaces (nothing else listens there).
LAB_TLS_PORT, LAB_NBD_PORT = 7001, 10809
MAX_LINGER = 600.0


def parse_size(text: str) -> int:
    """``1M``, ``512k``, ``4096`` -> bytes (a whole number of 512-byte sectors)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    if n <= 0 or n % 512 or n > 64 << 20:
        raise argparse.ArgumentTypeError(f"{text!r}: a multiple of 512 bytes, at most 64M")
    return n


def base_env() -> dict[str, str]:
    """Our environment minus ``MESHLINK_*`` (each node gets exactly its own settings).

    ``PYTHONPATH`` leads to the meshlink this script found, so every node
    runs the same code, installed or not.
    """
    import meshlink

    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}
    root = str(Path(meshlink.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class Cluster:
    """One run: the hosts, the nodes, and their teardown."""

    def __init__(self, args: argparse.Namespace, tmp: Path, lab: Lab | None) -> None:
        self.args = args
        self.tmp = tmp
        self.lab = lab
        self.deadline: float = time.monotonic() + args.timeout
        self.workers = [f"w{i + 1}" for i in range(args.workers)]
        half = (args.workers + 1) // 2
        self.host_of = {w: HOSTS[0] if i < half else HOSTS[1]
                        for i, w in enumerate(self.workers)}
        self.ids: dict[str, Identity] = make_pki(tmp / "pki", NAME,
                                                 [*self.workers, "telemetry"])
        self.stores: dict[str, Path] = {}
        for host in HOSTS:  # one private host store per host, as on separate machines
            (tmp / host).mkdir(mode=0o700)
            self.stores[host] = tmp / host / "store"
            self.stores[host].mkdir(mode=0o700)
        self.rules = tmp / HOSTS[1] / "rules.toml"
        self.nodes: list[Node] = []
        self.env = base_env()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, host: str, script: str, *args: str) -> Node:
        """Start a node on ``host`` with that host's store, rules and its own certificate."""
        env = {**self.env, **self.ids[NAME if name == "storage" else name].env(),
               "MESHLINK_HOST_STORE": str(self.stores[host])}
        if host == HOSTS[1]:
            env["MESHLINK_RULES"] = str(self.rules)
        argv = python(NODES / script, *args)
        if self.lab is not None:
            argv = self.lab.wrap(host, argv)
        node = Node(name, host, argv, env)
        self.nodes.append(node)
        return node

    def write_rules(self, tls: str, nbd: str) -> None:
        """host-b's rules file: where the storage node's bus and disk are (see services.md)."""
        self.rules.write_text(
            "# written by examples/cluster/run.py for this run\n"
            "[names]\n"
            f'"{NAME}" = ["tls://{tls}"]\n'
            f'"{NAME}.nbd" = ["tls://{nbd}"]\n')

    def run(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any],
                           dict[str, Any]]:
        """Start everything, wait for the workers; return their results, telemetry,
        ledger, and the storage node's stats (asked while it still runs)."""
        a = self.args
        bind = self.lab.address(HOSTS[0]) if self.lab else "127.0.0.1"
        ports = (LAB_TLS_PORT, LAB_NBD_PORT) if self.lab else (0, 0)
        per_node = max(self.remaining() - 10, 5)
        storage = self.start("storage", HOSTS[0], "storage.py", "--workers",
                             ",".join(self.workers), "--jobs", str(a.jobs), "--job-size",
                             str(a.job_size), "--bind", bind, "--tls-port", str(ports[0]),
                             "--nbd-port", str(ports[1]),
                             "--deadline", str(self.remaining() + a.linger + 15))
        ready = storage.result("ready", self.deadline)
        say(f"storage node up on {HOSTS[0]}: bus {' '.join(ready['bus'])}, "
            f"disk blk://{NAME}/disk0 and nbds://{ready['nbd']}/disk0 "
            f"({ready['disk_bytes'] >> 20} MiB)")
        self.write_rules(ready["tls"], ready["nbd"])
        telemetry = self.start("telemetry", HOSTS[0], "telemetry.py", "--workers",
                               ",".join(self.workers), "--deadline", str(per_node))
        telemetry.result("subscribed", self.deadline)
        workers = []
        for w in self.workers:
            flags = ["--deadline", str(per_node)]
            if self.lab is None and self.host_of[w] == HOSTS[1]:
                flags.append("--no-vchan")  # one host: "remote" only by our say-so
            if a.fault and w == self.workers[-1]:
                flags.append("--fault")
            workers.append(self.start(w, self.host_of[w], "worker.py", w, *flags))
        results = {n.name: n.result("worker", self.deadline) for n in workers}
        seen = telemetry.result("events", self.deadline)
        stats = self.stats()
        if a.linger:
            self.linger()
        storage.stop()  # SIGTERM: it withdraws, scrubs the disk and prints its ledger
        ledger = storage.result("summary", time.monotonic() + 30)["summary"]
        return results, seen, ledger, stats

    def stats(self) -> dict[str, Any]:
        """``meshlink stats storage-node --json`` on host-a, with its host store."""
        prefix = self.lab.wrap(HOSTS[0], []) if self.lab else []
        return query(prefix, sys.executable, self.stores[HOSTS[0]], self.env,
                     self.remaining())

    def linger(self) -> None:
        """Keep the storage node up for ``--linger`` seconds, saying how to look at it."""
        store = self.stores[HOSTS[0]]
        where = f"ip netns exec {self.lab.netns[HOSTS[0]]} " if self.lab else ""
        say(f"cluster up for {self.args.linger:g} s more (Ctrl-C ends it); look at it with:")
        say(f"  {where}meshlink ls --host-store {store}")
        time.sleep(self.args.linger)

    def teardown(self) -> None:
        """Stop every node still running, then delete the namespaces."""
        for node in reversed(self.nodes):
            node.stop()
        if self.lab is not None:
            self.lab.down()


def verdict(cluster: Cluster, results: dict[str, dict[str, Any]], seen: dict[str, Any],
            ledger: dict[str, Any]) -> bool:
    """Print the table; True if every worker's every checksum was verified."""
    jobs = cluster.args.jobs
    rows = [("worker", "host", "bus", "disk", "jobs", "bytes", "rate", "events", "checked")]
    all_ok = True
    for w in cluster.workers:
        r, t = results[w], ledger.get(w, {})
        events = seen["events"].get(w, 0)
        problems = []
        if r["jobs"] != jobs:
            problems.append(f"{r['jobs']}/{jobs} jobs")
        if r["reread_ok"] != r["jobs"]:
            problems.append(f"re-read differs in {r['jobs'] - r['reread_ok']}")
        if t.get("verified") != jobs or t.get("failed"):
            problems.append(f"storage verified {t.get('verified')}/{jobs}")
        if t.get("scrub_ok") != jobs or t.get("scrub_bad"):
            problems.append(f"scrub found {t.get('scrub_bad')} bad")
        if w not in seen["finished"] or events != r["jobs"] + 1:
            problems.append(f"telemetry saw {events} of {r['jobs'] + 1} messages")
        all_ok = all_ok and not problems
        rate = r["bytes"] / r["seconds"] / 2**20 if r["seconds"] > 0 else 0.0
        rows.append((w, cluster.host_of[w], r["bus"], r["disk"], str(r["jobs"]),
                     f"{r['bytes'] / 2**20:.1f} MiB", f"{rate:.1f} MiB/s", str(events),
                     f"verified {r['verified']}/{jobs}" if not problems
                     else "FAILED: " + "; ".join(problems)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    print()
    print("checked = the worker re-read what it wrote, the storage node verified each "
          "reported SHA-256 against its disk, and its scrub at the end found every region "
          "intact; events = progress messages the telemetry subscriber received.")
    return all_ok


def can_use_namespaces() -> str:
    """Why this run cannot use network namespaces ("" if it can)."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2)"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="workers, half per host (2..16)")
    p.add_argument("--jobs", type=int, default=8, help="jobs per worker (1..64)")
    p.add_argument("--job-size", type=parse_size, default=1 << 20, help="bytes per job (1M)")
    p.add_argument("--timeout", type=float, default=60, help="stop after this many seconds")
    p.add_argument("--one-host", action="store_true",
                   help="processes on this host even as root (no namespaces)")
    p.add_argument("--linger", type=float, default=0,
                   help="keep the storage node up this many seconds after the workers")
    p.add_argument("--fault", action="store_true",
                   help="the last worker corrupts a sector after reporting (the run must fail)")
    args = p.parse_args()
    if not 2 <= args.workers <= 16 or not 1 <= args.jobs <= 64:
        p.error("--workers must be 2..16 and --jobs 1..64")
    if not 0 <= args.linger <= MAX_LINGER or not 5 <= args.timeout <= 600:
        p.error(f"--linger must be 0..{MAX_LINGER:g} and --timeout 5..600")

    # SIGTERM ends the run like Ctrl-C: the finally below tears everything down.
    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    why_not = "forced by --one-host" if args.one_host else can_use_namespaces()
    lab = None if why_not else Lab(f"mlc{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="meshlink-cluster-") as tmp:
        cluster = Cluster(args, Path(tmp), lab)
        try:
            if lab is not None:
                try:
                    lab.up()
                except Failure as exc:
                    lab.down()
                    cluster.lab = lab = None
                    why_not = f"cannot make network namespaces ({exc})"
            if lab is not None:
                a, b = (cluster.workers[i] for i in (0, -1))
                say(f"root: network namespaces {lab.netns[HOSTS[0]]} and "
                    f"{lab.netns[HOSTS[1]]} on a bridge ({lab.address(HOSTS[0])}, "
                    f"{lab.address(HOSTS[1])}); storage node and {a}.. in {HOSTS[0]} "
                    f"(co-located), ..{b} in {HOSTS[1]} (remote)")
            else:
                say(f"{why_not}: running every node as a process on this host; all pairs "
                    f"are co-located (the {HOSTS[1]} workers are forced through TLS: their "
                    "own host store, vchan forbidden)")
            results, seen, ledger, stats = cluster.run()
        except Failure as exc:
            say(f"cluster: FAILED: {exc}")
            return 1
        except KeyboardInterrupt:
            say("cluster: interrupted; tearing down")
            return 130
        finally:
            cluster.teardown()
    ok = verdict(cluster, results, seen, ledger)
    ok = report(stats, results) and ok
    print("cluster:", "OK, every checksum verified" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
