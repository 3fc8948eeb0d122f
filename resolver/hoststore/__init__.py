"""The host store: one directory per host where co-located services publish themselves.

``store`` owns the directory: a server's claim on a name (a ``flock``-held
lock file and its rendezvous socket), liveness, and the name of every file in
it.  ``records`` owns what a live server writes beside its claim (host id,
transports, TCP/TLS endpoints, TLS fingerprint) and the resolver source that
reads them back.  This package is the one owner of those files: transports
and disk servers ask it for paths instead of building them.  ``records`` is
imported on first use (PEP 562): a disk server only claims a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names
from .store import (
    ENV_VAR,
    GROUP_ENV_VAR,
    HostStore,
    Publication,
    blk_entry_name,
    default_store_path,
)

if TYPE_CHECKING:
    from .records import (
        HOST_ID_ENV,
        HostStoreSource,
        ServiceRecord,
        default_host_id,
        remove_record,
        write_record,
    )

__all__ = [
    "ENV_VAR",
    "GROUP_ENV_VAR",
    "HOST_ID_ENV",
    "HostStore",
    "HostStoreSource",
    "Publication",
    "ServiceRecord",
    "blk_entry_name",
    "default_host_id",
    "default_store_path",
    "remove_record",
    "write_record",
]

#: Names imported on first access (PEP 562), and the module each comes from.
_LAZY: dict[str, str] = {name: ".records" for name in (
    "HOST_ID_ENV", "HostStoreSource", "ServiceRecord", "default_host_id", "remove_record",
    "write_record")}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals(), __all__)
