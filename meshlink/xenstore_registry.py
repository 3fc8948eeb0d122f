"""Co-located services published in XenStore, so that VMs on one host find
each other by name (the Xen counterpart of :mod:`meshlink.hoststore`).

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

All calls block on XenStore round trips: from trio, use
``trio.to_thread.run_sync``.  They go through the native provider's XenStore
client (``native/xen_provider.c``), so they need the Xen provider (or the
tests' emulation).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._errors import LocalProtocolError, ProviderUnavailable, ServiceNotFound, TransportError
from ._native import ffi, lib
from .hoststore import validate_service_name

__all__ = [
    "INDEX",
    "XenService",
    "lookup",
    "prepare_index",
    "publish",
    "withdraw",
]

INDEX = "/meshlink/services"
PERM_NONE, PERM_READ, PERM_WRITE = 0, 1, 2


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


def _why() -> str:
    return str(ffi.string(lib.ml_xen_error()).decode(errors="replace"))


class _Store:
    """One XenStore connection (context manager)."""

    def __init__(self) -> None:
        self._h = lib.ml_xs_open()
        if self._h == ffi.NULL:
            raise ProviderUnavailable(f"XenStore unavailable: {_why()}")

    def __enter__(self) -> _Store:
        return self

    def __exit__(self, *exc: object) -> None:
        lib.ml_xs_close(self._h)

    def _fail(self, what: str) -> None:
        err = ffi.errno
        if err in (errno.ENOENT, errno.EACCES, errno.EPERM):
            raise ServiceNotFound(err, f"{what}: {_why()}")
        raise TransportError(f"{what}: {_why()}")

    def read(self, t: int, path: str) -> str:
        buf = ffi.new("char[256]")
        n = lib.ml_xs_read(self._h, t, path.encode(), buf, 256)
        if n < 0:
            self._fail("XenStore read")
        return str(ffi.unpack(buf, min(n, 256)).decode(errors="replace"))

    def write(self, t: int, path: str, value: str) -> None:
        data = value.encode()
        if lib.ml_xs_write(self._h, t, path.encode(), data, len(data)) < 0:
            self._fail("XenStore write")

    def rm(self, t: int, path: str) -> bool:
        return bool(lib.ml_xs_rm(self._h, t, path.encode()) == 0)

    def chmod(self, t: int, path: str, perms: list[tuple[int, int]]) -> None:
        ids = ffi.new("uint32_t[]", [p[0] for p in perms])
        bits = ffi.new("uint32_t[]", [p[1] for p in perms])
        if lib.ml_xs_set_permissions(self._h, t, path.encode(), ids, bits, len(perms)) < 0:
            self._fail("XenStore set permissions")

    def transaction(self, body: Any) -> Any:
        """Run ``body(t)`` in a transaction, retrying on EAGAIN."""
        while True:
            t = lib.ml_xs_transaction_start(self._h)
            if not t:
                raise TransportError(f"XenStore transaction: {_why()}")
            try:
                result = body(t)
            except BaseException:
                lib.ml_xs_transaction_end(self._h, t, 1)
                raise
            if lib.ml_xs_transaction_end(self._h, t, 0) == 0:
                return result
            if ffi.errno != errno.EAGAIN:
                raise TransportError(f"XenStore transaction: {_why()}")


def prepare_index(readers_may_list: bool = False) -> None:
    """Create the host-wide index (run once, in dom0).

    Args:
        readers_may_list: also let every domain list the index (reveals
            which names exist, not who may read them).

    Raises:
        ServiceNotFound: we are not allowed to (not dom0).
    """
    default = PERM_WRITE | (PERM_READ if readers_may_list else 0)
    with _Store() as xs:

        def body(t: int) -> None:
            xs.write(t, INDEX, "")
            xs.chmod(t, INDEX, [(0, default)])

        xs.transaction(body)


def publish(name: str, domid: int, port: str, readers: Iterable[int]) -> XenService:
    """Publish service ``name`` of domain ``domid`` (normally our own).

    Args:
        name: the service name (see :func:`~meshlink.hoststore.validate_service_name`).
        domid: the serving domain.
        port: its vchan port name.
        readers: the domains allowed to find it; nobody else can read it.

    Raises:
        LocalProtocolError: a bad name or port.
        ServiceNotFound: XenStore refused (no index, or not our subtree).
    """
    if not port or "/" in port or len(port) > 64:
        raise LocalProtocolError(f"invalid vchan port name {port!r}")
    perms = [(domid, PERM_NONE)] + [(r, PERM_READ) for r in sorted(set(readers)) if r != domid]
    record = _record(domid, name)
    with _Store() as xs:

        def body(t: int) -> None:
            for key, value in (("domid", str(domid)), ("port", port)):
                xs.write(t, f"{record}/{key}", value)
                xs.chmod(t, f"{record}/{key}", perms)
            xs.chmod(t, record, perms)
            xs.write(t, f"{INDEX}/{_node(name)}", str(domid))
            xs.chmod(t, f"{INDEX}/{_node(name)}", perms)

        xs.transaction(body)
    return XenService(name, domid, port)


def lookup(name: str) -> XenService:
    """Find service ``name``.

    Raises:
        ServiceNotFound: nobody published it, or we are not among its
            readers, or the index entry is not backed by the claimed
            domain's own record.
    """
    with _Store() as xs:
        raw = xs.read(0, f"{INDEX}/{_node(name)}")
        try:
            domid = int(raw)
        except ValueError:
            raise ServiceNotFound(errno.ENOENT, f"bad index entry for {name!r}") from None
        record = _record(domid, name)
        if xs.read(0, f"{record}/domid") != str(domid):
            raise ServiceNotFound(errno.ENOENT, f"index entry for {name!r} is not backed by "
                                  f"domain {domid}'s record")
        port = xs.read(0, f"{record}/port")
    return XenService(name, domid, port)


def withdraw(name: str, domid: int) -> None:
    """Remove service ``name`` of domain ``domid``.  Missing entries are fine."""
    with _Store() as xs:

        def body(t: int) -> None:
            xs.rm(t, f"{INDEX}/{_node(name)}")
            xs.rm(t, _record(domid, name))

        xs.transaction(body)
