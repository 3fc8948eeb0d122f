"""The exception hierarchy of meshlink, rooted at :class:`MeshlinkError`.

Errors are split by blame and by layer.  Where trio already names the meaning
(a peer that vanished is a :class:`trio.BrokenResourceError`), our class inherits
both, so ``except trio.BrokenResourceError`` keeps working for generic stream
code and ``except meshlink.MeshlinkError`` catches everything of ours.

The naming layer (:mod:`resolver`) has its own errors; where a class here
means the same, it also subclasses the resolver's (``ResolveError``,
``RulesError``, ``AddressInUse`` for ``NameInUse``, ``ServiceNotFound``,
``InvalidName``, ``StoreError``), and :func:`resolver_errors` turns what the
resolver raises into these at every place meshlink calls it.  So both
``except meshlink.ResolveError`` and ``except resolver.ResolveError`` catch
what meshlink raises.

The classes are defined in two modules below this one, and named here: those
without trio in ``meshlink/_error_classes.py``; the three that inherit a trio
class (:class:`ConnectionLost`, :class:`SessionLost`,
:class:`RingCorruptError`) in ``meshlink/_trio_errors.py``, loaded from here
on first use (PEP 562), so
that importing this module does not import trio: ``meshlink disk serve``'s
trio-free path (``meshlink/disk/syncserve.py``) starts about 70 ms sooner.
``meshlink.errors.ConnectionLost`` names the same class either way.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from resolver import errors as naming

from ._error_classes import AddressInUse as AddressInUse
from ._error_classes import AuthError as AuthError
from ._error_classes import DiskError as DiskError
from ._error_classes import HandshakeError as HandshakeError
from ._error_classes import InvalidName as InvalidName
from ._error_classes import LocalProtocolError as LocalProtocolError
from ._error_classes import MeshlinkError as MeshlinkError
from ._error_classes import ProtocolError as ProtocolError
from ._error_classes import ProviderUnavailable as ProviderUnavailable
from ._error_classes import RemoteProtocolError as RemoteProtocolError
from ._error_classes import ResolveError as ResolveError
from ._error_classes import RulesError as RulesError
from ._error_classes import ServiceNotFound as ServiceNotFound
from ._error_classes import StoreError as StoreError
from ._error_classes import TransportError as TransportError

if TYPE_CHECKING:
    # Explicit re-exports, for type checkers (at run time: __getattr__ below).
    from ._trio_errors import ConnectionLost as ConnectionLost
    from ._trio_errors import RingCorruptError as RingCorruptError
    from ._trio_errors import SessionLost as SessionLost


def _ours(exc: naming.ResolverError) -> MeshlinkError:
    """The meshlink error meaning what the resolver's ``exc`` means."""
    if isinstance(exc, naming.RulesError):
        return RulesError(exc.path, exc.line, exc.reason)
    if isinstance(exc, naming.ResolveError):
        return ResolveError(*exc.args)
    if isinstance(exc, naming.NameInUse):
        return AddressInUse(exc.errno or _errno.EADDRINUSE, exc.strerror or str(exc))
    if isinstance(exc, naming.ServiceNotFound):
        return ServiceNotFound(exc.errno or _errno.ENOENT, exc.strerror or str(exc))
    if isinstance(exc, naming.InvalidName):
        return InvalidName(*exc.args)
    if isinstance(exc, naming.StoreError):
        return StoreError(*exc.args)
    return MeshlinkError(*exc.args)


@contextmanager
def resolver_errors() -> Iterator[None]:
    """Raise meshlink's error for any resolver error inside the block.

    The one place resolver errors become meshlink errors: every call meshlink
    makes into :mod:`resolver` (host store, resolution, XenStore registry)
    runs inside it, so meshlink users see only :class:`MeshlinkError` classes.
    The resolver's error is chained as the cause.
    """
    try:
        yield
    except naming.ResolverError as exc:
        if isinstance(exc, MeshlinkError):
            raise
        raise _ours(exc) from exc


#: The classes that subclass trio's, and so live in ``_trio_errors`` (see above).
_TRIO_BASED = frozenset({"ConnectionLost", "SessionLost", "RingCorruptError"})


def __getattr__(name: str) -> Any:
    """Load the trio-based classes on first use (see the module docstring)."""
    if name in _TRIO_BASED:
        from . import _trio_errors

        value = getattr(_trio_errors, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
