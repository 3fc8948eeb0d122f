"""Host store records: what a live server says about itself, and the host id.

Theory of operation
-------------------
A server that offers vchan claims its name in the host store
(:mod:`resolver.hoststore.store`: a ``flock``-held lock file and a Unix socket) and,
beside them, writes ``NAME.meshlink.json`` with what a client needs to choose:
its host id, the transports it offers and their TCP/TLS addresses, and its TLS
certificate fingerprint.  The record is trusted only while the lock is held:
a crashed server's leftovers (lock free) are stale and ignored, and the next
server with the name overwrites them.

*Host id.*  Two ends are co-located when they share the kernel (shared memory
and eventfds work) and the host store directory (they can rendezvous).  The
default host id is therefore a digest of the kernel boot id
(``/proc/sys/kernel/random/boot_id``) and the resolved host store path;
``MESHLINK_HOST_ID`` or a ``host_id=`` argument overrides it.  Equal ids are a
claim; the vchan handshake is the proof (see :mod:`resolver._rank`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .._types import Endpoint
from ..names import validate_service_name
from .store import HostStore

__all__ = [
    "HOST_ID_ENV",
    "HostStoreSource",
    "ServiceRecord",
    "default_host_id",
    "remove_record",
    "write_record",
]

HOST_ID_ENV = "MESHLINK_HOST_ID"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
RECORD_VERSION = 1
#: Records are a few hundred bytes; a longer file is not one of ours.
MAX_RECORD = 1 << 16


def default_host_id(store: HostStore, boot_id_path: str = BOOT_ID_PATH) -> str:
    """Our host id for ``store``: ``$MESHLINK_HOST_ID``, else digest(boot id, store path)."""
    env = os.environ.get(HOST_ID_ENV)
    if env:
        return env
    try:
        boot = Path(boot_id_path).read_text().strip()
    except OSError:
        boot = "no-boot-id"
    digest = hashlib.sha256(f"{boot}\0{store.path.resolve()}".encode()).hexdigest()
    return digest[:24]


@dataclass(frozen=True)
class ServiceRecord:
    """What a live server published about itself.

    Attributes:
        name: the service name.
        host_id: the server's host id.
        transports: transports offered, e.g. ``("vchan", "tls", "tcp")``.
        endpoints: TCP/TLS endpoint URLs (vchan is implied by the host store).
        fingerprint: SHA-256 (hex) of the server's TLS certificate, or ``None``.
        pid: the server's process id (informative).
    """

    name: str
    host_id: str
    transports: tuple[str, ...]
    endpoints: tuple[str, ...] = ()
    fingerprint: str | None = None
    pid: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "version": RECORD_VERSION, "name": self.name, "host_id": self.host_id,
            "transports": list(self.transports), "endpoints": list(self.endpoints),
            "fingerprint": self.fingerprint, "pid": self.pid,
        })

    @classmethod
    def from_json(cls, text: str) -> ServiceRecord | None:
        """Parse a record; ``None`` if it is malformed or of another version."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("version") != RECORD_VERSION:
                return None
            fp = d.get("fingerprint")
            return cls(
                name=str(d["name"]), host_id=str(d["host_id"]),
                transports=tuple(str(t) for t in d["transports"]),
                endpoints=tuple(str(e) for e in d["endpoints"]),
                fingerprint=str(fp) if fp else None, pid=int(d.get("pid", 0)),
            )
        except (ValueError, KeyError, TypeError):
            return None


def write_record(store: HostStore, record: ServiceRecord) -> None:
    """Publish ``record`` atomically (call while holding the name's claim)."""
    store.write_entry(store.record_path(record.name).name, record.to_json().encode())


def remove_record(store: HostStore, name: str) -> None:
    """Withdraw the record of ``name`` if ``store`` wrote it and it is still there.

    Idempotent; a record another server has written since is left alone.
    """
    store.remove_entry(store.record_path(name).name)


class HostStoreSource:
    """Looks names up in one host store.

    Args:
        store: the host store (our own, normally).
    """

    def __init__(self, store: HostStore) -> None:
        self.store = store

    def record(self, name: str) -> ServiceRecord | None:
        """The record of a *live* service, or ``None`` (absent, stale or malformed)."""
        if not self.store.is_live(name):
            return None
        raw = self.store.read_entry(self.store.record_path(name).name, MAX_RECORD)
        try:
            text = raw.decode() if raw is not None else ""
        except UnicodeDecodeError:
            return None
        rec = ServiceRecord.from_json(text)
        return rec if rec is not None and rec.name == name else None

    def lookup(self, name: str) -> list[Endpoint]:
        """Endpoints of ``name`` if a live server publishes it here.

        A live entry without a record (a bare ``open_vchan_listener``, or a
        server between binding and writing its record) yields a vchan endpoint
        with no host id, which only the vchan handshake can prove.  Stale
        entries (crashed servers) yield nothing.
        """
        validate_service_name(name)
        if not self.store.is_live(name):
            return []
        rec = self.record(name)
        store = str(self.store.path)
        if rec is None:
            return [Endpoint("vchan", name, store=store, source="hoststore")]
        out: list[Endpoint] = []
        if "vchan" in rec.transports:
            out.append(Endpoint("vchan", name, store=store, host_id=rec.host_id,
                                source="hoststore"))
        for url in rec.endpoints:
            try:
                ep = Endpoint.parse(url, source="hoststore")
            except ValueError:
                continue  # deliberate: a bad entry in a record is skipped, not fatal
            fp = rec.fingerprint if ep.scheme == "tls" else None
            out.append(Endpoint(ep.scheme, ep.host, ep.port, host_id=rec.host_id,
                                fingerprint=fp, source="hoststore"))
        return out

    def services(self) -> list[tuple[str, bool, ServiceRecord | None]]:
        """Every entry: ``(name, live, record or None)``, sorted by name."""
        return [(name, live, self.record(name) if live else None)
                for name, live in self.store.services()]
