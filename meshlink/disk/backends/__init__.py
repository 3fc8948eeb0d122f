"""Disk backends: one small file each, all implementing :class:`Backend`.

``null``, ``memory``, ``file``, ``mmap`` store data; ``cow`` is a filter that
stacks copy-on-write over any of them.  :func:`open_backend` builds one from
the command line's vocabulary.
"""

from __future__ import annotations

import os

from ._base import (
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    Buffer,
    Capabilities,
    DirectMemory,
    Extent,
)
from .cow import CowBackend
from .file import FileBackend
from .memory import MemoryBackend
from .mmap import MmapBackend
from .null import NullBackend

#: Names accepted by :func:`open_backend` (and ``--backend`` on the CLI).
BACKEND_KINDS = ("null", "memory", "file", "mmap", "cow")


def open_backend(kind: str, *, path: str | os.PathLike[str] | None = None,
                 size: int | None = None, read_only: bool = False,
                 overlay_path: str | os.PathLike[str] | None = None) -> Backend:
    """Build a backend by name.

    Args:
        kind: one of :data:`BACKEND_KINDS`.
        path: the file for ``file``/``mmap``, the gold image for ``cow``.
        size: required for ``null``/``memory``; for ``file``/``mmap`` it
            creates or resizes the file.
        read_only: refuse writes.
        overlay_path: ``cow`` only: keep written blocks in this file, not RAM.

    Returns:
        The backend (the caller owns it and must ``close`` it).

    Raises:
        ValueError: unknown kind or missing argument.
        DiskError: the file could not be opened.
    """
    if kind in ("null", "memory"):
        if size is None:
            raise ValueError(f"backend {kind!r} needs a size")
        cls = NullBackend if kind == "null" else MemoryBackend
        return cls(size, read_only=read_only)
    if path is None:
        raise ValueError(f"backend {kind!r} needs a path")
    if kind == "file":
        return FileBackend(path, read_only=read_only, size=size)
    if kind == "mmap":
        return MmapBackend(path, read_only=read_only, size=size)
    if kind == "cow":
        return CowBackend(FileBackend(path, read_only=True), overlay_path=overlay_path,
                          read_only=read_only)
    raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(BACKEND_KINDS)}")


__all__ = [
    "BACKEND_KINDS",
    "STATE_HOLE",
    "STATE_ZERO",
    "Backend",
    "Buffer",
    "Capabilities",
    "CowBackend",
    "DirectMemory",
    "Extent",
    "FileBackend",
    "MemoryBackend",
    "MmapBackend",
    "NullBackend",
    "open_backend",
]
