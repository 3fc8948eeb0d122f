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

The three classes that inherit a trio class (:class:`ConnectionLost`,
:class:`SessionLost`, :class:`RingCorruptError`) are defined in
``meshlink/_trio_errors.py`` and loaded from here on first use (PEP 562), so
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

if TYPE_CHECKING:
    # Explicit re-exports, for type checkers (at run time: __getattr__ below).
    from ._trio_errors import ConnectionLost as ConnectionLost
    from ._trio_errors import RingCorruptError as RingCorruptError
    from ._trio_errors import SessionLost as SessionLost


class MeshlinkError(Exception):
    """Base class of every error meshlink raises on purpose."""


# --- protocol errors, split by blame (as h11 does) -------------------------


class ProtocolError(MeshlinkError):
    """A protocol was violated.  Not raised directly: see the two subclasses."""


class LocalProtocolError(ProtocolError):
    """Our caller misused an API or asked for something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (malformed, oversized...)."""


# --- transport errors ------------------------------------------------------


class TransportError(MeshlinkError):
    """Setting up or using a transport failed."""


class HandshakeError(TransportError):
    """The rendezvous or connection handshake failed."""


class AuthError(HandshakeError):
    """The peer is not allowed to connect (credentials, certificates)."""


class ServiceNotFound(TransportError, naming.ServiceNotFound):
    """No live service of that name is published where we looked (an OSError)."""


class AddressInUse(TransportError, naming.NameInUse):
    """A live server already publishes this service name (an OSError, EADDRINUSE)."""


class InvalidName(LocalProtocolError, naming.InvalidName):
    """A service name (or a vchan port name) is not acceptable (also a ValueError)."""


class StoreError(TransportError, naming.StoreError):
    """The host store directory or XenStore cannot be used."""


class ProviderUnavailable(TransportError):
    """A grant/event provider was requested but cannot run on this machine."""


# --- resolver and disk errors -----------------------------------------------


class ResolveError(MeshlinkError, naming.ResolveError):
    """A name could not be resolved to any usable endpoint."""


class DiskError(MeshlinkError):
    """A disk request failed.

    Attributes:
        errno: the NBD/POSIX errno carried on the wire (for example 5, EIO).
    """

    def __init__(self, message: str, errno: int = 5) -> None:
        super().__init__(message)
        self.errno = errno


class RulesError(ResolveError, naming.RulesError):
    """A static rules file is malformed; the message names the file and line.

    Made as ``RulesError(path, line, reason)`` (see :class:`resolver.RulesError`).

    Attributes:
        path: the rules file.
        line: the 1-based line of the error (0 when unknown).
        reason: the message without the ``path:line:`` prefix.
    """


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
