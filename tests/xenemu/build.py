"""Build the emulated Xen userspace and the libxenvchan peer for the tests.

``build(out)`` compiles, with gcc, three shared libraries standing in for
``libxenevtchn.so.1`` (VERS_1.0), ``libxengnttab.so.1`` (VERS_1.0) and
``libxenstore.so.4`` (VERS_4.0) from ``tests/xenemu/*.c`` and their version
scripts, and ``vchan_peer`` linked against Debian's real
``libxenvchan.so.4.17``.  Processes find the emulation through
``LD_LIBRARY_PATH``; ``XenEmu.env(domid)`` gives the environment of one
emulated domain.

Run as a program (``python3 tests/xenemu/build.py OUT``) it builds into OUT and
prints the paths as JSON: bench/bench_xen.py uses the emulation that way, so
the benchmarks need no import from the tests package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBS = {
    "libxenevtchn.so.1": ("evtchn.c", "evtchn.map"),
    "libxengnttab.so.1": ("gnttab.c", "gnttab.map"),
    "libxenstore.so.4": ("xenstore.c", "xenstore.map"),
}
VCHAN_SO = Path("/usr/lib/x86_64-linux-gnu/libxenvchan.so.4.17")
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC"]


def missing_prerequisites() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if shutil.which("gcc") is None:
        return "gcc not installed"
    for header in ("xenevtchn.h", "xengnttab.h", "xenstore.h", "libxenvchan.h"):
        if not Path("/usr/include", header).exists():
            return f"/usr/include/{header} missing (install libxen-dev)"
    if not VCHAN_SO.exists():
        return f"{VCHAN_SO} missing (install libxenmisc4.17)"
    return None


@dataclass(frozen=True)
class XenEmu:
    """A built emulation: where its libraries and the peer program are."""

    libdir: Path
    peer: Path

    def env(self, root: Path, domid: int) -> dict[str, str]:
        """Environment variables making a process emulated domain ``domid``."""
        old = os.environ.get("LD_LIBRARY_PATH")
        path = str(self.libdir) + (":" + old if old else "")
        return {"LD_LIBRARY_PATH": path, "XENEMU_DIR": str(root), "XENEMU_DOMID": str(domid)}


def build(out: Path) -> XenEmu:
    """Compile everything into ``out`` and return the result."""
    libdir = out / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    for soname, (src, vmap) in LIBS.items():
        subprocess.run(
            ["gcc", *CFLAGS, "-shared", f"-Wl,-soname,{soname}",
             f"-Wl,--version-script={HERE / vmap}", "-o", str(libdir / soname), str(HERE / src)],
            check=True, capture_output=True, text=True,
        )
    peer = out / "vchan_peer"
    subprocess.run(
        ["gcc", *CFLAGS, "-o", str(peer), str(HERE / "vchan_peer.c"), str(VCHAN_SO),
         f"-Wl,-rpath-link,{libdir}"],
        check=True, capture_output=True, text=True,
    )
    return XenEmu(libdir, peer)


def main(argv: list[str]) -> int:
    """Build into ``argv[0]``; print ``{"libdir": ..., "peer": ...}``.

    Exit status 2 with the reason on stderr when the emulation cannot be built
    here (missing prerequisites or a compiler error).
    """
    if len(argv) != 1:
        print("usage: build.py OUT", file=sys.stderr)
        return 2
    why = missing_prerequisites()
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    try:
        emu = build(Path(argv[0]))
    except subprocess.CalledProcessError as e:
        print(f"{' '.join(e.cmd)} failed:\n{e.stderr}", file=sys.stderr)
        return 2
    print(json.dumps({"libdir": str(emu.libdir), "peer": str(emu.peer)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
