"""``meshlink disk serve`` time to ready, against ``nbdkit memory``, in the same run.

Readiness is the pidfile appearing (``--pidfile`` / nbdkit's ``-P``), as a
harness waits for either; both get ``--exit-with-parent`` (so nothing
outlives the benchmark) and otherwise their default options: ours serves
the blk ring by default, so it is measured that way and over NBD on a Unix
socket; nbdkit serves NBD on a Unix socket.  Both of ours are also timed
on the trio path (``MESHLINK_DISK_SERVE_TRIO=1``, what every invocation
took before the trio-free driver, ``meshlink/disk/syncserve.py``).  Each round runs every case once,
in turn (ours, nbdkit, ours over NBD, ...), so a drift in the machine's speed
touches all of them; the medians of the rounds and their ratios are printed.

For orientation it also times two floors, start to exit: ``python3 -c pass``
(the interpreter with this machine's site packages) and ``python3 -c "import
trio"`` (plus the event loop every meshlink server runs on): no Python
server can be ready sooner than the second.

Bytecode: a package installed by pip has its ``.pyc`` files compiled; a
source checkout run with ``PYTHONDONTWRITEBYTECODE=1`` compiles every module
at every start (about 45 modules for ``disk serve``, tens of milliseconds).
By default the Python processes here get a private bytecode cache
(``PYTHONPYCACHEPREFIX`` in a temporary directory, filled by the warm-up
run), as an installed package has; ``--no-bytecode-cache`` runs them with
the environment as it is.

Usage: python3 -m bench.bench_startup [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ._figures import print_load_average
from ._peers import stop

#: Poll interval while waiting for a pidfile: small next to the figures.
POLL = 0.0005


def ready_seconds(argv: list[str], pidfile: Path, sock: Path | None = None,
                  env: dict[str, str] | None = None) -> float:
    """Seconds from starting ``argv`` to ``pidfile`` appearing; then stop the server.

    ``sock``, the server's Unix socket, is removed first (ours leaves it behind).
    """
    pidfile.unlink(missing_ok=True)
    if sock is not None:
        sock.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = start + 60
        while not pidfile.exists():
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise SystemExit(f"{argv[0]} exited early: {proc.stderr.read().decode()}")
            if time.perf_counter() > deadline:
                raise SystemExit(f"{argv!r}: no pidfile after 60 s")
            time.sleep(POLL)
        return time.perf_counter() - start
    finally:
        stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def run_seconds(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds ``argv`` takes from start to exit."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="runs of each case (median)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="do not give the Python processes a bytecode cache")
    opts = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        d = Path(tmp)
        pid, store, sock = d / "serve.pid", d / "store", d / "nbd.sock"
        store.mkdir(mode=0o700)
        env = dict(os.environ)
        if not opts.no_bytecode_cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(d / "pycache")
        env.pop("MESHLINK_DISK_SERVE_TRIO", None)
        trio_env = {**env, "MESHLINK_DISK_SERVE_TRIO": "1"}
        common = ["--backend", "memory", "--size", "64M", "--pidfile", str(pid),
                  "--exit-with-parent"]
        ours = [py, "-m", "meshlink.cli", "disk", "serve"]
        cases: dict[str, Callable[[], float]] = {
            "ours, blk ring (default)": lambda: ready_seconds(
                [*ours, "bench/disk0", *common, "--host-store", str(store)], pid, env=env),
            "ours, NBD on a Unix socket": lambda: ready_seconds(
                [*ours, "bench", *common, "--nbd", "--listen", f"unix:{sock}"], pid, sock, env),
            "ours, blk ring, trio path": lambda: ready_seconds(
                [*ours, "bench/disk0", *common, "--host-store", str(store)], pid, env=trio_env),
            "ours, NBD Unix, trio path": lambda: ready_seconds(
                [*ours, "bench", *common, "--nbd", "--listen", f"unix:{sock}"], pid, sock,
                trio_env),
            "floor: python3 -c pass": lambda: run_seconds([py, "-c", "pass"], env),
            "floor: python3 -c 'import trio'": lambda: run_seconds([py, "-c", "import trio"],
                                                                    env),
        }
        if shutil.which("nbdkit"):
            cases["nbdkit memory 64M, Unix socket"] = lambda: ready_seconds(
                ["nbdkit", "--foreground", "--exit-with-parent", "-P", str(pid), "-U", str(sock),
                 "memory", "64M"], pid, sock)
        else:
            print("nbdkit not installed: no peer figure")
        print_load_average("start")
        for case in cases.values():  # warm-up: page cache, .pyc files
            case()
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(opts.rounds):
            for name, case in cases.items():
                samples[name].append(case())
        print_load_average("end")
    cache = "none (environment as given)" if opts.no_bytecode_cache else "private, warmed"
    print(f"time to ready (pidfile written), median of {opts.rounds} rounds, ms; "
          f"bytecode cache: {cache}:")
    medians = {name: statistics.median(s) * 1000 for name, s in samples.items()}
    for name, ms in medians.items():
        lo, hi = min(samples[name]) * 1000, max(samples[name]) * 1000
        print(f"  {name:34s} {ms:8.1f}   (min {lo:.1f}, max {hi:.1f})")
    peer = medians.get("nbdkit memory 64M, Unix socket")
    if peer:
        for name in ("ours, blk ring (default)", "ours, NBD on a Unix socket",
                     "ours, blk ring, trio path", "ours, NBD Unix, trio path"):
            print(f"  ratio {name} / nbdkit: {medians[name] / peer:.1f}x")


if __name__ == "__main__":
    main()
