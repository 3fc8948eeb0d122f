"""Disk backends: one small file each, all implementing :class:`Backend`.

``null``, ``memory``, ``file``, ``mmap`` store data; ``cow`` is a filter that
stacks copy-on-write over any of them.  :func:`open_backend` builds one from
the command line's vocabulary.  Each kind's module is imported when that
kind is first opened or named (PEP 562): ``disk serve`` of a memory disk
loads neither the file helpers (and their ``ctypes``) nor ``cow``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from resolver.lazy import lazy_names

from ...errors import LocalProtocolError
from ._base import (
    MAX_SIZE,
    SECTOR,
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    Buffer,
    Capabilities,
    DirectMemory,
    Extent,
    check_size,
)

if TYPE_CHECKING:
    from .cow import CowBackend
    from .file import FileBackend
    from .memory import MemoryBackend
    from .mmap import MmapBackend
    from .null import NullBackend

#: Names accepted by :func:`open_backend` (and ``--backend`` on the CLI).
BACKEND_KINDS = ("null", "memory", "file", "mmap", "cow")

#: Per kind: the ``open_backend`` options it uses.  Anything else given for
#: that kind is refused, never silently ignored.
_USES: dict[str, tuple[str, ...]] = {
    "null": ("size",),
    "memory": ("size",),
    "file": ("path", "size", "shrink"),
    "mmap": ("path", "size", "shrink"),
    "cow": ("path", "overlay_path", "reset"),
}
#: ``open_backend`` keyword -> CLI flag, for the messages.
_FLAGS = {"path": "--path", "size": "--size", "shrink": "--shrink",
          "overlay_path": "--overlay", "reset": "--overlay-reset", "read_only": "--read-only"}


def check_options(kind: str, *, path: object = None, size: int | None = None,
                  read_only: bool = False, overlay_path: object = None,
                  shrink: bool = False, reset: bool = False) -> None:
    """Refuse a backend kind or option combination before anything is opened.

    The rules (also the guide's backends table): ``null``/``memory`` take only
    a ``size`` (required); ``file``/``mmap`` take a ``path`` (required) and
    optionally a ``size`` to create or grow the file (``shrink`` to make it
    smaller; neither with ``read_only``); ``cow`` takes the gold image's
    ``path`` (required; the size is the image's) and optionally an
    ``overlay_path`` (``reset`` to discard an existing one; not with ``read_only``).
    Messages name the CLI flags, since the CLI calls this too.

    Raises:
        LocalProtocolError: unknown kind, a missing or invalid option, or one
            the kind would ignore.
    """
    if kind not in _USES:
        raise LocalProtocolError(
            f"unknown backend {kind!r}; choose from {', '.join(BACKEND_KINDS)}")
    given = {"path": path is not None, "size": size is not None, "shrink": shrink,
             "overlay_path": overlay_path is not None, "reset": reset}
    for option, present in given.items():
        if present and option not in _USES[kind]:
            hint = " (its size is the gold image's)" if option == "size" else ""
            raise LocalProtocolError(
                f"{_FLAGS[option]} does not apply to the {kind} backend{hint}")
    if kind in ("null", "memory") and size is None:
        raise LocalProtocolError(f"the {kind} backend needs a size (--size)")
    if kind not in ("null", "memory") and path is None:
        raise LocalProtocolError(f"the {kind} backend needs a path (--path)")
    if size is not None:
        check_size(size, "--size")
    if shrink and size is None:
        raise LocalProtocolError("--shrink needs --size (the size to shrink the file to)")
    if reset and overlay_path is None:
        raise LocalProtocolError("--overlay-reset needs --overlay")
    if read_only and size is not None and kind in ("file", "mmap"):
        raise LocalProtocolError("--size creates or resizes the file; a --read-only disk "
                                 "never does: give one or the other")
    if read_only and overlay_path is not None:
        raise LocalProtocolError("a --read-only cow disk never writes its --overlay")


def open_backend(kind: str, *, path: str | os.PathLike[str] | None = None,
                 size: int | None = None, read_only: bool = False,
                 overlay_path: str | os.PathLike[str] | None = None,
                 shrink: bool = False, reset: bool = False) -> Backend:
    """Build a backend by name.

    Args:
        kind: one of :data:`BACKEND_KINDS`.
        path: the file for ``file``/``mmap``, the gold image for ``cow``.
        size: required for ``null``/``memory``; for ``file``/``mmap`` it
            creates or grows the file.  Whole 512-byte sectors, at most 2**63-1.
        read_only: refuse writes.
        overlay_path: ``cow`` only: keep written blocks in this file, not RAM.
        shrink: ``file``/``mmap``: allow ``size`` below the file's length.
        reset: ``cow``: allow an existing non-empty overlay to be truncated.

    Returns:
        The backend (the caller owns it and must ``close`` it).

    Raises:
        LocalProtocolError: unknown kind, or options refused by :func:`check_options`
            or by the backend (shrinking without ``shrink``, an overlay that is
            the gold image...).
        DiskError: the file could not be opened, or its size is not whole sectors.
    """
    check_options(kind, path=path, size=size, read_only=read_only,
                  overlay_path=overlay_path, shrink=shrink, reset=reset)
    if kind == "null":
        from .null import NullBackend

        assert size is not None
        return NullBackend(size, read_only=read_only)
    if kind == "memory":
        from .memory import MemoryBackend

        assert size is not None
        return MemoryBackend(size, read_only=read_only)
    assert path is not None
    if kind == "mmap":
        from .mmap import MmapBackend

        return MmapBackend(path, read_only=read_only, size=size, shrink=shrink)
    from .file import FileBackend

    if kind == "file":
        return FileBackend(path, read_only=read_only, size=size, shrink=shrink)
    from .cow import CowBackend

    lower = FileBackend(path, read_only=True)
    try:
        return CowBackend(lower, overlay_path=overlay_path, read_only=read_only, reset=reset)
    except BaseException:
        lower.close()
        raise


__all__ = [
    "BACKEND_KINDS",
    "MAX_SIZE",
    "SECTOR",
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
    "check_options",
    "check_size",
    "open_backend",
]

#: Names imported on first access (PEP 562), and the module each comes from.
_LAZY: dict[str, str] = {"CowBackend": ".cow", "FileBackend": ".file",
                         "MemoryBackend": ".memory", "MmapBackend": ".mmap",
                         "NullBackend": ".null"}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(), __all__)
