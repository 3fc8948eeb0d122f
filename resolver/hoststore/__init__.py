"""The host store: one directory per host where co-located services publish themselves.

``store`` owns the directory: a server's claim on a name (a ``flock``-held
lock file and its rendezvous socket), liveness, and the name of every file in
it.  ``records`` owns what a live server writes beside its claim (host id,
transports, TCP/TLS endpoints, TLS fingerprint) and the resolver source that
reads them back.  This package is the one owner of those files: transports
and disk servers ask it for paths instead of building them.
"""

from __future__ import annotations

from .records import (
    HOST_ID_ENV,
    HostStoreSource,
    ServiceRecord,
    default_host_id,
    remove_record,
    write_record,
)
from .store import (
    ENV_VAR,
    GROUP_ENV_VAR,
    HostStore,
    Publication,
    blk_entry_name,
    default_store_path,
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
