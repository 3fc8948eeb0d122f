"""meshlink.disk: block storage backends and the NBD front end."""

from __future__ import annotations

from .backends import (
    BACKEND_KINDS,
    Backend,
    Capabilities,
    CowBackend,
    FileBackend,
    MemoryBackend,
    MmapBackend,
    NullBackend,
    open_backend,
)

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "Capabilities",
    "CowBackend",
    "FileBackend",
    "MemoryBackend",
    "MmapBackend",
    "NullBackend",
    "open_backend",
]
