"""pytest fixtures for the Xen provider tests (import them into a test module).

``xenemu`` builds the emulated Xen userspace once per session; ``xen_host``
makes the test process emulated domain 1 (``MESHLINK_XEN_LIBDIR`` points the
native provider at the emulation, since ``LD_LIBRARY_PATH`` cannot change
inside a running process) and starts libxenvchan peers as domain 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .build import XenEmu, build, missing_prerequisites

PY_DOMID = 1
PEER_DOMID = 2


@pytest.fixture(scope="session")
def xenemu(tmp_path_factory: pytest.TempPathFactory) -> XenEmu:
    why = missing_prerequisites()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"Xen emulation prerequisites missing in CI: {why}")
        pytest.skip(why)
    return build(tmp_path_factory.mktemp("xenemu-build"))


class CPeer:
    """A libxenvchan peer process (tests/xenemu/vchan_peer.c)."""

    def __init__(self, emu: XenEmu, root: Path, domid: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(emu.peer), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **emu.env(root, domid)},
        )

    def expect_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"libxenvchan peer printed {line!r}; stderr:\n{err}")

    def readline_json(self) -> dict[str, int]:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def result(self, timeout: float = 200) -> dict[str, int]:
        out, err = self.proc.communicate(timeout=timeout)
        rc = self.proc.returncode
        assert rc == 0, f"libxenvchan peer failed ({rc}):\n{err}"
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@dataclass
class XenHost:
    """One emulated Xen host: this process is domain 1."""

    emu: XenEmu
    root: Path
    peers: list[CPeer] = field(default_factory=list)
    _n: int = 0

    def path(self, server: int, client: int) -> str:
        self._n += 1
        return f"/local/domain/{server}/data/vchan/{client}/t{self._n}"

    def peer(self, *args: str, domid: int = PEER_DOMID) -> CPeer:
        p = CPeer(self.emu, self.root, domid, *args)
        self.peers.append(p)
        return p

    def env(self, domid: int) -> dict[str, str]:
        return {**self.emu.env(self.root, domid), "MESHLINK_XEN_LIBDIR": str(self.emu.libdir)}


@pytest.fixture
def xen_host(xenemu: XenEmu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[XenHost]:
    root = tmp_path / "xenhost"
    root.mkdir()
    monkeypatch.setenv("MESHLINK_XEN_LIBDIR", str(xenemu.libdir))
    monkeypatch.setenv("XENEMU_DIR", str(root))
    monkeypatch.setenv("XENEMU_DOMID", str(PY_DOMID))
    host = XenHost(xenemu, root)
    yield host
    for p in host.peers:
        p.kill()


def crc(data: bytes, prev: int = 0) -> int:
    return zlib.crc32(data, prev)
