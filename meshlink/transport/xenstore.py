"""XenStore over the native Xen provider, and the service registry bound to it.

:mod:`resolver.xenstore` holds the registry's logic (which nodes, which
permissions, what counts as "not found") over any
:class:`~resolver.xenstore.XenStoreClient`; :class:`NativeXenStore` is that
client over ``native/xen_store.c`` (real Xen, or the tests' emulation).
The functions here open one connection per call, as XenStore's per-connection
domain identity requires, and raise meshlink's errors.

All calls block on XenStore round trips: from trio, use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence

from resolver import xenstore as registry
from resolver.xenstore import XenService

from .._native import ffi, lib
from ..errors import LocalProtocolError, ProviderUnavailable, resolver_errors
from .provider import select_provider

__all__ = [
    "DomainWatch",
    "NativeXenStore",
    "XenService",
    "lookup",
    "prepare_index",
    "publish",
    "open_if_xen",
    "withdraw",
    "xen_host_id",
]

_READ_MAX = 256
_EVENT_MAX = 512
#: XenStore's special path: fires whenever any domain has died.
RELEASE_DOMAIN = "@releaseDomain"


def _why() -> str:
    return str(ffi.string(lib.ml_xen_error()).decode(errors="replace"))


class NativeXenStore:
    """One XenStore connection through the native provider (a context manager).

    Implements :class:`resolver.xenstore.XenStoreClient`: failures raise
    :class:`OSError` with XenStore's errno.

    Raises:
        ProviderUnavailable: XenStore cannot be opened here.
    """

    def __init__(self) -> None:
        self._h = lib.ml_xs_open()
        if self._h == ffi.NULL:
            raise ProviderUnavailable(f"XenStore unavailable: {_why()}")

    def __enter__(self) -> NativeXenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _fail(what: str) -> OSError:
        return OSError(ffi.errno, f"{what}: {_why()}")

    def read(self, t: int, path: str) -> str:
        buf = ffi.new(f"char[{_READ_MAX}]")
        n = lib.ml_xs_read(self._h, t, path.encode(), buf, _READ_MAX)
        if n < 0:
            raise self._fail("XenStore read")
        return str(ffi.unpack(buf, min(n, _READ_MAX)).decode(errors="replace"))

    def write(self, t: int, path: str, value: str) -> None:
        data = value.encode()
        if lib.ml_xs_write(self._h, t, path.encode(), data, len(data)) < 0:
            raise self._fail("XenStore write")

    def rm(self, t: int, path: str) -> bool:
        return bool(lib.ml_xs_rm(self._h, t, path.encode()) == 0)

    def set_permissions(self, t: int, path: str, perms: Sequence[tuple[int, int]]) -> None:
        ids = ffi.new("uint32_t[]", [p[0] for p in perms])
        bits = ffi.new("uint32_t[]", [p[1] for p in perms])
        if lib.ml_xs_set_permissions(self._h, t, path.encode(), ids, bits, len(perms)) < 0:
            raise self._fail("XenStore set permissions")

    def directory(self, t: int, path: str) -> list[str]:
        """The names of ``path``'s children (OSError with XenStore's errno)."""
        cap = 1 << 16
        buf = ffi.new(f"char[{cap}]")
        n = lib.ml_xs_directory(self._h, t, path.encode(), buf, cap)
        if n < 0:
            raise self._fail("XenStore directory")
        raw = ffi.unpack(buf, min(n, cap))
        return [x.decode(errors="replace") for x in raw.split(b"\0") if x]

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` (and its subtree, or a special ``@`` path) under ``token``."""
        if lib.ml_xs_watch(self._h, path.encode(), token.encode()) < 0:
            raise self._fail("XenStore watch")

    def unwatch(self, path: str, token: str) -> None:
        """Remove a watch; a missing one is fine."""
        lib.ml_xs_unwatch(self._h, path.encode(), token.encode())

    def fileno(self) -> int:
        """An fd readable while watch events are queued."""
        fd = int(lib.ml_xs_fileno(self._h))
        if fd < 0:
            raise self._fail("XenStore watch fd")
        return fd

    def check_watch(self) -> tuple[str, str] | None:
        """One queued watch event ``(path, token)``, or None; never waits."""
        path = ffi.new(f"char[{_EVENT_MAX}]")
        token = ffi.new(f"char[{_EVENT_MAX}]")
        rc = lib.ml_xs_check_watch(self._h, path, _EVENT_MAX, token, _EVENT_MAX)
        if rc < 0:
            raise self._fail("XenStore watch event")
        if rc == 0:
            return None
        return (ffi.string(path).decode(errors="replace"),
                ffi.string(token).decode(errors="replace"))

    def close(self) -> None:
        """Close the connection (its watches go with it).  Idempotent."""
        if self._h != ffi.NULL:
            lib.ml_xs_close(self._h)
            self._h = ffi.NULL

    def transaction_start(self) -> int:
        t = int(lib.ml_xs_transaction_start(self._h))
        if not t:
            raise self._fail("XenStore transaction")
        return t

    def transaction_end(self, t: int, abort: bool) -> bool:
        if lib.ml_xs_transaction_end(self._h, t, 1 if abort else 0) == 0:
            return True
        if ffi.errno == errno.EAGAIN and not abort:
            return False
        raise self._fail("XenStore transaction")


def domain_exists(xs: NativeXenStore, domid: int) -> bool:
    """Whether domain ``domid`` exists: its home ``/local/domain/<domid>``
    is there (the toolstack removes it when the domain is destroyed).  A
    guest may not read another domain's home, but XenStore still answers
    "permission denied" rather than "no such node" for one that exists."""
    try:
        xs.read(0, f"/local/domain/{domid}")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
    return True


class DomainWatch:
    """Tells, without waiting, whether domain ``domid`` has died.

    A ``@releaseDomain`` watch on a connection of its own: its fd
    (:attr:`fileno`) becomes readable whenever some domain died (and once
    at the start), then :meth:`poll` checks whether it was ``domid``.  The
    check is one XenStore round trip, made only after such an event, which
    is rare; so it is done inline rather than in a thread.

    Raises (constructor):
        ProviderUnavailable: no XenStore here.
        OSError: the watch could not be set.
    """

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.gone = False
        self._token = f"meshlink-peer-{domid}-{id(self):x}"
        self._xs = NativeXenStore()
        try:
            self._xs.watch(RELEASE_DOMAIN, self._token)
            self.fileno = self._xs.fileno()
        except BaseException:
            self._xs.close()
            raise

    def poll(self) -> bool:
        """Take the queued events; True once the domain is gone (it stays gone)."""
        released = False
        for _ in range(1024):  # bounded: a storm of deaths cannot hold us here
            try:
                ev = self._xs.check_watch()
            except OSError:
                break
            if ev is None:
                break
            released |= ev[1] == self._token
        if released and not self.gone:
            self.gone = not domain_exists(self._xs, self.domid)
        return self.gone

    def close(self) -> None:
        """Drop the watch and the connection.  Idempotent."""
        self._xs.close()


def open_if_xen() -> NativeXenStore | None:
    """A XenStore connection when the vchan provider is Xen, else None.

    The resolver's default XenStore opener (registered on import, see
    :func:`resolver.xenstore.set_default_opener`): off Xen it costs an
    environment lookup and a ``stat`` of ``/dev/xen``, nothing more.
    """
    try:
        if select_provider() != "xen":
            return None
        return NativeXenStore()
    except (ProviderUnavailable, LocalProtocolError):
        return None


registry.set_default_opener(open_if_xen)


def prepare_index(readers_may_list: bool = False, xen_host_id: str | None = None) -> None:
    """Create the host-wide index and publish the Xen host id (run once, in dom0);
    see :func:`resolver.xenstore.prepare_index`.

    Raises:
        ServiceNotFound: we are not allowed to (not dom0).
        ProviderUnavailable: no XenStore here.
    """
    with resolver_errors(), NativeXenStore() as xs:
        registry.prepare_index(xs, readers_may_list, xen_host_id)


def xen_host_id() -> str | None:
    """The Xen host id dom0 published (None without an index).

    Raises:
        ProviderUnavailable: no XenStore here.
    """
    with NativeXenStore() as xs:
        return registry.host_id(xs)


def publish(name: str, domid: int, port: str, readers: Iterable[int]) -> XenService:
    """Publish service ``name`` of domain ``domid``; see :func:`resolver.xenstore.publish`.

    Raises:
        LocalProtocolError: a bad name or port (:class:`~meshlink.InvalidName`).
        ServiceNotFound: XenStore refused (no index, or not our subtree).
        ProviderUnavailable: no XenStore here.
    """
    with resolver_errors(), NativeXenStore() as xs:
        return registry.publish(xs, name, domid, port, readers)


def lookup(name: str) -> XenService:
    """Find service ``name``; see :func:`resolver.xenstore.lookup`.

    Raises:
        ServiceNotFound: nobody we may see published it.
        ProviderUnavailable: no XenStore here.
    """
    with resolver_errors(), NativeXenStore() as xs:
        return registry.lookup(xs, name)


def withdraw(name: str, domid: int) -> None:
    """Remove service ``name`` of domain ``domid``.  Missing entries are fine."""
    with resolver_errors(), NativeXenStore() as xs:
        registry.withdraw(xs, name, domid)
