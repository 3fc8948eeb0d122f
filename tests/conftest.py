"""Shared fixtures: private host stores and peer processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A private, empty host store directory for one test."""
    d = tmp_path / "store"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes to kill at the end, whatever the test did."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


class Peer:
    """A helper script running as its own process, read line by line."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPERS / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def expect(self, word: str, timeout: float = 30) -> None:
        """Wait for the peer to print ``word`` on a line of its own."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=timeout)
            raise AssertionError(f"peer printed {line!r}, expected {word!r}; stderr:\n{err}")

    def result(self, timeout: float = 300) -> dict[str, object]:
        """Wait for exit and return the JSON the peer printed last."""
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"peer failed ({self.proc.returncode}):\n{err}"
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Spawn peers with ``peers.append(Peer(...))``; all are killed at the end."""
    started: list[Peer] = []
    yield started
    for p in started:
        p.kill()
