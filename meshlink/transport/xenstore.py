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
from ..errors import ProviderUnavailable, resolver_errors

__all__ = ["NativeXenStore", "XenService", "lookup", "prepare_index", "publish", "withdraw"]

_READ_MAX = 256


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
        lib.ml_xs_close(self._h)

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


def prepare_index(readers_may_list: bool = False) -> None:
    """Create the host-wide index (run once, in dom0); see :func:`resolver.xenstore.prepare_index`.

    Raises:
        ServiceNotFound: we are not allowed to (not dom0).
        ProviderUnavailable: no XenStore here.
    """
    with resolver_errors(), NativeXenStore() as xs:
        registry.prepare_index(xs, readers_may_list)


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
