"""The README's first command keeps working (the cluster example exits 0), and so do the guides.

The cluster example (examples/cluster/run.py) runs a storage node, four
workers and a telemetry subscriber: in network namespaces on a bridge as root
(as CI runs), as processes on this host otherwise.  Its table must show
workers on vchan + blk ring and on TLS + NBD, every checksum verified; a
sector corrupted behind the storage node's back must make it fail.  The echo
demo runs one co-located client (which must get vchan) and one client forced
through TLS.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "examples/cluster/run.py"
NAMESPACES = os.geteuid() == 0 and shutil.which("ip") is not None


def _run_cluster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True,
                          text=True, timeout=120)


def _table(stdout: str) -> list[dict[str, str]]:
    """The rows of the table the example ends with, by column name."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"worker\s+host\s+bus\s", line))
    header = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _stats_section(stdout: str) -> dict[str, tuple[int, ...]]:
    """The numbers of the "storage-node stats" section, by line ("bus", "blk", "nbd")."""
    assert "\nstorage-node stats (meshlink stats storage-node --json" in stdout, stdout
    m = re.search(r"^  bus   calls done (\d+) \(workers made (\d+)\)", stdout, re.M)
    assert m, stdout
    out: dict[str, tuple[int, ...]] = {"bus": (int(m[1]), int(m[2]))}
    for m in re.finditer(r"^  disk0 (blk|nbd) (\d+) writes ([\d.]+) MiB, (\d+) reads "
                         r"([\d.]+) MiB, (\d+) flushes, errors (\d+), mean \d+ us/request "
                         r"\(its workers wrote ([\d.]+) MiB, read ([\d.]+) MiB\)$",
                         stdout, re.M):
        out[m[1]] = tuple(round(float(x) * 10) for x in m.groups()[1:])  # MiB in tenths
    return out


@pytest.mark.timeout(150)
def test_cluster_example_runs_and_verifies_every_checksum() -> None:
    out = _run_cluster()
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _table(out.stdout)
    assert [r["worker"] for r in rows] == ["w1", "w2", "w3", "w4"]
    assert [(r["host"], r["bus"], r["disk"]) for r in rows] == [
        ("host-a", "vchan", "blk"), ("host-a", "vchan", "blk"),
        ("host-b", "tls", "nbd/tls"), ("host-b", "tls", "nbd/tls")]
    for r in rows:  # 8 jobs of 1 MiB, written and read back; 8 progress messages + "finished"
        assert (r["jobs"], r["bytes"], r["events"], r["checked"]) == (
            "8", "16.0 MiB", "9", "verified 8/8"), r
        assert float(r["rate"].split()[0]) > 0
    assert "cluster: OK, every checksum verified" in out.stdout
    # The storage node's own counters, asked while it ran, account for the workers:
    # 4 workers x (join + 9 claims + 8 reports + finish) bus calls (telemetry's on top),
    # and per disk path 2 workers x 8 jobs of one 1 MiB write, flush and read.
    stats = _stats_section(out.stdout)
    done, made = stats["bus"]
    assert made == 4 * 19 and done >= made, stats
    for path in ("blk", "nbd"):
        writes, mib_w, reads, mib_r, flushes, errors, want_w, want_r = stats[path]
        assert writes >= 16 and reads >= 16 and flushes >= 16 and errors == 0, stats
        assert mib_w >= want_w == 160 and mib_r >= want_r == 160, stats
    assert "  stats: match what the workers did" in out.stdout
    if NAMESPACES:
        m = re.search(r"^root: network namespaces (mlc\d+)-host-a and \1-host-b on a bridge",
                      out.stdout, re.M)
        assert m, out.stdout
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              timeout=30).stdout
        assert m.group(1) + "-" not in left  # torn down: namespaces, veths, bridge
    else:
        assert ("not root: running every node as a process on this host; "
                "all pairs are co-located") in out.stdout


@pytest.mark.timeout(150)
def test_cluster_example_fails_when_a_region_is_corrupted() -> None:
    """The last worker overwrites a sector after its report: the scrub must catch it."""
    out = _run_cluster("--one-host", "--jobs", "2", "--fault")
    assert out.returncode == 1, out.stdout + out.stderr
    rows = _table(out.stdout)
    assert [r["checked"] for r in rows] == ["verified 2/2"] * 3 + ["FAILED: scrub found 1 bad"]
    assert "cluster: FAILED" in out.stdout
    # The stray write is real I/O: the counters still account for everything.
    assert "  stats: match what the workers did" in out.stdout


def test_cluster_demo_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples/cluster/demo.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[vchan] 'hello from dom0' -> 'HELLO FROM DOM0'" in out.stdout
    assert "[tls] 'hello from dom0' -> 'HELLO FROM DOM0'" in out.stdout
    blocking = out.stdout.split("co-located client without trio (--blocking):\n", 1)
    assert len(blocking) == 2, out.stdout
    assert blocking[1].startswith("[vchan] 'hello from dom0' -> 'HELLO FROM DOM0'")
    assert "demo: OK" in out.stdout


def test_sessions_example_moves_and_resumes() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples/cluster/sessions.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "connected over vchan" in out.stdout
    assert "the session runs over tcp (resumes 1, moves 1)" in out.stdout
    assert "the session runs over vchan (resumes 2, moves 2)" in out.stdout
    assert "the session runs over vchan (resumes 3, moves 2)" in out.stdout
    assert "server counted resumes 3, moves 2" in out.stdout
    assert "sessions: OK" in out.stdout


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
