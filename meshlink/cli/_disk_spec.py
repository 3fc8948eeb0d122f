"""``meshlink disk serve --disk NAME:BACKEND[:OPTIONS]``: one export per ``--disk``.

One process can serve several disks (each over the blk ring as
``SERVICE/NAME`` and/or over NBD as export ``NAME``); each ``--disk`` says
one disk in one argument, with the options the single-disk form spells as
flags::

    --disk boot:cow:path=golden.img,overlay=boot.ov
    --disk data:file:path=data.img,size=1G
    --disk scratch:memory:size=64M,read-only,description=temporary space

``OPTIONS`` are comma-separated ``key=value`` pairs (``path``, ``size``,
``overlay``, ``description``) and bare flags (``read-only``, ``shrink``,
``overlay-reset``), with the meanings of the flags ``--path``, ``--size``,
... of the single-disk form.  A path holding a comma cannot be written here
(use the single-disk form, or a symlink).  Parsing is all this module does;
what the options mean for a backend is checked by
:func:`meshlink.disk.backends.check_options`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..disk.backends import BACKEND_KINDS

__all__ = ["DiskSpec", "check_unique", "parse_disk_spec"]


class DiskSpec(NamedTuple):
    """One disk to serve: its name, backend kind and that backend's options."""

    name: str
    backend: str
    path: str | None = None
    size: int | None = None
    shrink: bool = False
    overlay: str | None = None
    overlay_reset: bool = False
    read_only: bool = False
    description: str = ""


_FLAGS = {"read-only": "read_only", "shrink": "shrink", "overlay-reset": "overlay_reset"}
_VALUES = ("path", "size", "overlay", "description")


def parse_disk_spec(text: str, parse_size: Callable[[str], int]) -> DiskSpec:
    """Parse one ``--disk`` argument.

    Args:
        text: ``NAME:BACKEND[:OPTIONS]``.
        parse_size: how ``size=`` is read (the command's ``--size`` parser).

    Raises:
        argparse.ArgumentTypeError: malformed, an unknown backend or key, a key
            given twice, or a bad size.
    """
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(
            f"--disk {text!r}: expected NAME:BACKEND[:OPTIONS], e.g. data:memory:size=1G")
    name, backend = parts[0], parts[1]
    if "/" in name:
        raise argparse.ArgumentTypeError(f"--disk {text!r}: a disk name has no '/'")
    if backend not in BACKEND_KINDS:
        raise argparse.ArgumentTypeError(
            f"--disk {text!r}: unknown backend {backend!r} (one of {', '.join(BACKEND_KINDS)})")
    fields: dict[str, Any] = {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, eq, value = item.partition("=")
        key = key.strip()
        parsed: bool | int | str
        if not eq and key in _FLAGS:
            field, parsed = _FLAGS[key], True
        elif eq and key in _VALUES:
            field = key
            parsed = parse_size(value) if key == "size" else value
            if key != "description" and not value:
                raise argparse.ArgumentTypeError(f"--disk {text!r}: {key}= needs a value")
        else:
            raise argparse.ArgumentTypeError(
                f"--disk {text!r}: unknown option {item!r} (keys: {', '.join(_VALUES)}=...; "
                f"flags: {', '.join(_FLAGS)})")
        if field in fields:
            raise argparse.ArgumentTypeError(f"--disk {text!r}: {key} given twice")
        fields[field] = parsed
    return DiskSpec(name, backend, **fields)


def check_unique(specs: Sequence[DiskSpec]) -> str | None:
    """Why these disks cannot be served together (a name used twice), or None."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            return f"disk name {spec.name!r} is given twice: each --disk needs its own name"
        seen.add(spec.name)
    return None
