"""The README's first command keeps working (the cluster demo exits 0), and so do the guides.

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


def _runnable_doc_examples() -> list[str]:
    import re

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    text = "\n".join(d.read_text() for d in docs)
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "trio.run(main)" in b]


def test_doc_examples_run() -> None:
    """Every complete example in the README and docs/ (those ending in trio.run) runs as written."""
    examples = _runnable_doc_examples()
    assert len(examples) >= 2
    for code in examples:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, cwd="/tmp")
        assert out.returncode == 0, code + out.stderr
