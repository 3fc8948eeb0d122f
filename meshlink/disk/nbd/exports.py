"""NBD exports: a name bound to a backend, and the lookup the option phase uses.

Owned here, apart from the trio server (:mod:`.server`), so that both NBD
drivers use one definition: the trio :class:`~.server.NBDServer` and the
trio-free :mod:`meshlink.disk.syncserve`.  No trio, socket or clock imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ..backends._base import Backend
from . import wire as c
from .server_handshake import ExportInfo
from .wire import transmission_flags

__all__ = ["Export", "ExportTable"]


class Export(NamedTuple):
    """One export: a name bound to a backend.

    Attributes:
        name: the name clients ask for.
        backend: the disk (shared by every connection to this export).
        description: shown by ``nbdinfo``.
        read_only: force read-only even if the backend is writable.
    """

    name: str
    backend: Backend
    description: str = ""
    read_only: bool = False

    def info(self) -> ExportInfo:
        """The handshake's view of this export (flags from declared capabilities)."""
        caps = self.backend.capabilities
        read_only = self.read_only or self.backend.read_only
        flags = transmission_flags(
            read_only=read_only, can_flush=caps.can_flush, can_fua=caps.can_fua,
            can_trim=caps.can_trim, can_zero=caps.can_zero, can_fast_zero=caps.can_fast_zero,
            can_multi_conn=caps.can_multi_conn, can_cache=caps.can_cache)
        return ExportInfo(self.name, self.backend.size, flags, self.description,
                          min_block=1, preferred_block=max(4096, self.backend.sector_size),
                          max_block=c.MAX_REQUEST)


class ExportTable(NamedTuple):
    """What the option phase may ask about the exports: find one, list them.

    Attributes:
        exports: the exports by name.
        default: the export the empty name means (``None``: the first one).
    """

    exports: Mapping[str, Export]
    default: str | None = None

    def find(self, name: str) -> Export | None:
        """The export ``name`` selects (the empty name: the default), or None."""
        export = self.exports.get(name)
        if export is None and name == "":
            key = self.default if self.default is not None else next(iter(self.exports), None)
            export = self.exports.get(key) if key is not None else None
        return export

    def lookup(self, name: str) -> ExportInfo | None:
        """The handshake's view of the export ``name`` selects, or None."""
        export = self.find(name)
        return export.info() if export is not None else None

    def names(self) -> list[tuple[str, str]]:
        """Every export's name and description (for NBD_OPT_LIST)."""
        return [(e.name, e.description) for e in self.exports.values()]
