"""The README's first command keeps working: the cluster demo exits 0.

The demo runs the echo server with meshlink.serve, one co-located client
(which must get vchan) and one client forced through TLS.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_demo_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples/cluster/demo.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[vchan] 'hello from dom0' -> 'HELLO FROM DOM0'" in out.stdout
    assert "[tls] 'hello from dom0' -> 'HELLO FROM DOM0'" in out.stdout
    assert "demo: OK" in out.stdout
