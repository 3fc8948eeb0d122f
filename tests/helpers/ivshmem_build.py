"""Builds the static ivshmem peer (tools/ivshmem_peer.c) for tests and the bench.

The peer is compiled from the same native/ sources as the library's ring, so
a test against it checks the C ring code a guest without Python runs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["tools/ivshmem_peer.c", "native/ivshmem.c", "native/vchan_ring.c",
           "native/vchan_setup.c"]
FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-Inative"]


def build_peer(out: Path, *, static: bool = True) -> Path:
    """Compile the peer to ``out`` (statically by default) and return its path.

    Raises:
        FileNotFoundError: no C compiler.
        subprocess.CalledProcessError: the build failed (output in the error).
    """
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise FileNotFoundError("no C compiler (gcc or cc) on PATH")
    cmd = [cc, *FLAGS, *(["-static"] if static else []), "-o", str(out), *SOURCES]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return out
