"""Co-located services published in XenStore, so that VMs on one host find
each other by name (the Xen counterpart of :mod:`resolver.hoststore`).

Theory of operation
-------------------
A service ``NAME`` served by domain ``D`` over vchan port ``PORT`` is two
sets of XenStore nodes, written in one transaction:

* ``/local/domain/D/data/meshlink/services/NODE/{domid,port}`` -- the
  record.  Only ``D`` (and dom0) can write under ``/local/domain/D``, so a
  record found there really comes from ``D``.
* ``/meshlink/services/NODE`` = ``D`` -- the host-wide index that lets a
  client find ``D`` from the name alone.

Every node gets the permissions ``[D: none by default, each reader: read]``:
XenStore itself hides the service from every other domain (they get
"not found", exactly as for a name nobody published).  ``NODE`` is the
service name with ``.`` written as ``@`` (XenStore node names allow neither
``.`` nor, in meshlink service names, ``@``).

The index directory belongs to dom0, which must create it once with
:func:`prepare_index` so that guests may add entries (default permission
write, not read, so guests cannot list each other's services).  A guest can
therefore squat a name in the index, but not impersonate: :func:`lookup`
trusts only a record under the claimed domain's own subtree whose owner is
that domain, and reports anything else as not found.

The index directory also carries the **Xen host id**,
``/meshlink/host-id``, written by dom0 with the index and readable by every
domain: a digest of dom0's boot id, so it comes from the host and every guest
of the host reads the same value (a guest's own boot id says nothing about
the host).  A service found through the index is on this host by
construction (XenStore is per host); the endpoint carries that id, and the
ranking keeps a Xen vchan endpoint when it equals the id we read
(:class:`~resolver.LocalFacts.xen_host_id`).

The registry logic here talks to XenStore only through a
:class:`XenStoreClient` the caller passes in (meshlink provides one over its
native Xen provider, ``meshlink.transport.xenstore``), so the naming layer
needs no native code and can be tested against any store.  All calls block
on XenStore round trips: from trio, use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ._types import Endpoint
from .errors import InvalidName, ServiceNotFound, StoreError
from .names import validate_service_name

__all__ = [
    "HOST_ID_NODE",
    "INDEX",
    "XenStoreOpener",
    "XenStoreSource",
    "default_opener",
    "host_id",
    "set_default_opener",
    "PERM_NONE",
    "PERM_READ",
    "PERM_WRITE",
    "XenService",
    "XenStoreClient",
    "lookup",
    "prepare_index",
    "publish",
    "withdraw",
]

INDEX = "/meshlink/services"
HOST_ID_NODE = "/meshlink/host-id"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
PERM_NONE, PERM_READ, PERM_WRITE = 0, 1, 2
#: Errors XenStore gives for a node we may not see: reported as "not found".
_HIDDEN = (errno.ENOENT, errno.EACCES, errno.EPERM)
T = TypeVar("T")


class XenStoreClient(Protocol):
    """One open XenStore connection, as the registry needs it.

    ``t`` is a transaction id from :meth:`transaction_start`, or 0 for none.
    Failures raise :class:`OSError` carrying the errno XenStore reported and a
    message that says what failed (``"XenStore read: ..."``).
    """

    def read(self, t: int, path: str) -> str:
        """The value of node ``path``."""
        ...

    def write(self, t: int, path: str, value: str) -> None:
        """Set node ``path`` to ``value``, creating it (and its parents)."""
        ...

    def rm(self, t: int, path: str) -> bool:
        """Remove node ``path`` and its children; whether it succeeded (never raises)."""
        ...

    def set_permissions(self, t: int, path: str, perms: Sequence[tuple[int, int]]) -> None:
        """Set the permissions of ``path``: ``(domid, PERM_*)``, the first is the owner."""
        ...

    def transaction_start(self) -> int:
        """Start a transaction and return its id."""
        ...

    def transaction_end(self, t: int, abort: bool) -> bool:
        """End transaction ``t``: ``False`` if it conflicted (EAGAIN) and must be retried."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


#: Opens a XenStore connection, or returns None where there is no Xen.
XenStoreOpener = Callable[[], "XenStoreClient | None"]
_default_opener: list[XenStoreOpener] = []


def set_default_opener(opener: XenStoreOpener | None) -> None:
    """Register how :class:`~resolver.Resolver` opens XenStore by default.

    The naming layer imports nothing of meshlink, so meshlink's transport
    registers its native client here when it is imported (and a test or an
    embedder may register another).  ``None`` unregisters.
    """
    _default_opener.clear()
    if opener is not None:
        _default_opener.append(opener)


def default_opener() -> XenStoreOpener | None:
    """The opener registered with :func:`set_default_opener`, if any."""
    return _default_opener[0] if _default_opener else None


@dataclass(frozen=True)
class XenService:
    """A service found in XenStore.

    Attributes:
        name: the service name.
        domid: the domain serving it.
        port: its vchan port name (path ``/local/domain/<domid>/data/vchan/<client>/<port>``).
    """

    name: str
    domid: int
    port: str


def _node(name: str) -> str:
    return validate_service_name(name).replace(".", "@")


def _record(domid: int, name: str) -> str:
    return f"/local/domain/{domid}/data/meshlink/services/{_node(name)}"


def _refused(exc: OSError) -> Exception:
    """What a failed node access means to the registry."""
    if exc.errno in _HIDDEN:
        return ServiceNotFound(exc.errno, exc.strerror)
    return StoreError(exc.strerror)


def _read(xs: XenStoreClient, path: str) -> str:
    try:
        return xs.read(0, path)
    except OSError as exc:
        raise _refused(exc) from exc


def _transaction(xs: XenStoreClient, body: Callable[[int], T]) -> T:
    """Run ``body(t)`` in a transaction, retrying while it conflicts."""
    while True:
        try:
            t = xs.transaction_start()
        except OSError as exc:
            raise StoreError(exc.strerror) from exc
        try:
            result = body(t)
        except OSError as exc:
            _abort(xs, t)
            raise _refused(exc) from exc
        except BaseException:
            _abort(xs, t)
            raise
        try:
            if xs.transaction_end(t, False):
                return result
        except OSError as exc:
            raise StoreError(exc.strerror) from exc


def _abort(xs: XenStoreClient, t: int) -> None:
    try:
        xs.transaction_end(t, True)
    except OSError:
        pass  # deliberate: the error that made us abort is the one to report


def _boot_host_id(boot_id_path: str = BOOT_ID_PATH) -> str:
    try:
        boot = open(boot_id_path).read().strip()
    except OSError:
        boot = "no-boot-id"
    return "xen-" + hashlib.sha256(f"xen-host\0{boot}".encode()).hexdigest()[:24]


def prepare_index(xs: XenStoreClient, readers_may_list: bool = False,
                  xen_host_id: str | None = None) -> None:
    """Create the host-wide index and the Xen host id (run once, in dom0).

    Args:
        xs: an open XenStore connection.
        readers_may_list: also let every domain list the index (reveals
            which names exist, not who may read them).
        xen_host_id: the host id to publish (default: a digest of dom0's
            boot id, that is of the host's).

    Raises:
        ServiceNotFound: we are not allowed to (not dom0).
        StoreError: XenStore failed otherwise.
    """
    default = PERM_WRITE | (PERM_READ if readers_may_list else 0)
    hid = xen_host_id or _boot_host_id()

    def body(t: int) -> None:
        xs.write(t, INDEX, "")
        xs.set_permissions(t, INDEX, [(0, default)])
        xs.write(t, HOST_ID_NODE, hid)
        xs.set_permissions(t, HOST_ID_NODE, [(0, PERM_READ)])

    _transaction(xs, body)


def host_id(xs: XenStoreClient) -> str | None:
    """The Xen host id dom0 published, or None (no index, or not on Xen)."""
    try:
        value = xs.read(0, HOST_ID_NODE).strip()
    except OSError:
        return None
    return value if value and len(value) <= 128 and value.isprintable() else None


def publish(xs: XenStoreClient, name: str, domid: int, port: str,
            readers: Iterable[int]) -> XenService:
    """Publish service ``name`` of domain ``domid`` (normally our own).

    Args:
        xs: an open XenStore connection.
        name: the service name (see :func:`~resolver.names.validate_service_name`).
        domid: the serving domain.
        port: its vchan port name.
        readers: the domains allowed to find it; nobody else can read it.

    Raises:
        InvalidName: a bad name or port.
        ServiceNotFound: XenStore refused (no index, or not our subtree).
        StoreError: XenStore failed otherwise.
    """
    if not port or "/" in port or len(port) > 64:
        raise InvalidName(f"invalid vchan port name {port!r}")
    perms = [(domid, PERM_NONE)] + [(r, PERM_READ) for r in sorted(set(readers)) if r != domid]
    record = _record(domid, name)

    def body(t: int) -> None:
        for key, value in (("domid", str(domid)), ("port", port)):
            xs.write(t, f"{record}/{key}", value)
            xs.set_permissions(t, f"{record}/{key}", perms)
        xs.set_permissions(t, record, perms)
        xs.write(t, f"{INDEX}/{_node(name)}", str(domid))
        xs.set_permissions(t, f"{INDEX}/{_node(name)}", perms)

    _transaction(xs, body)
    return XenService(name, domid, port)


def lookup(xs: XenStoreClient, name: str) -> XenService:
    """Find service ``name``.

    Raises:
        ServiceNotFound: nobody published it, or we are not among its
            readers, or the index entry is not backed by the claimed
            domain's own record.
        StoreError: XenStore failed otherwise.
    """
    raw = _read(xs, f"{INDEX}/{_node(name)}")
    try:
        domid = int(raw)
    except ValueError:
        raise ServiceNotFound(errno.ENOENT, f"bad index entry for {name!r}") from None
    record = _record(domid, name)
    if _read(xs, f"{record}/domid") != str(domid):
        raise ServiceNotFound(errno.ENOENT, f"index entry for {name!r} is not backed by "
                              f"domain {domid}'s record")
    port = _read(xs, f"{record}/port")
    return XenService(name, domid, port)


def withdraw(xs: XenStoreClient, name: str, domid: int) -> None:
    """Remove service ``name`` of domain ``domid``.  Missing entries are fine."""

    def body(t: int) -> None:
        xs.rm(t, f"{INDEX}/{_node(name)}")
        xs.rm(t, _record(domid, name))

    _transaction(xs, body)


class XenStoreSource:
    """The XenStore registry as a resolver source (blocking: call from a thread).

    Args:
        opener: opens a connection, or returns None where there is no Xen.
    """

    def __init__(self, opener: XenStoreOpener) -> None:
        self._opener = opener

    def host_id(self) -> str | None:
        """The Xen host id, or None off Xen (or without an index)."""
        xs = self._open()
        if xs is None:
            return None
        try:
            return host_id(xs)
        finally:
            xs.close()

    def lookup(self, name: str) -> tuple[list[Endpoint], list[str]]:
        """Endpoints for ``name`` (a Xen vchan, or nothing) and notes.

        Raises:
            InvalidName: a bad name.
        """
        validate_service_name(name)
        xs = self._open()
        if xs is None:
            return [], []
        try:
            try:
                svc = lookup(xs, name)
            except ServiceNotFound:
                return [], []
            except StoreError as exc:
                return [], [f"xenstore: lookup failed: {exc}"]
            hid = host_id(xs)
        finally:
            xs.close()
        return [Endpoint("vchan", svc.port, host_id=hid, source="xenstore",
                         domid=svc.domid)], []

    def _open(self) -> XenStoreClient | None:
        try:
            return self._opener()
        except (OSError, StoreError):
            return None
