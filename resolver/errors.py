"""The exceptions of the naming layer, rooted at :class:`ResolverError`.

The resolver knows nothing of transports, so its errors say only what went
wrong with a *name*: it is malformed, taken, not published, unresolvable, or
the store that keeps names cannot be used.  meshlink's user-facing classes
(``meshlink.ResolveError``, ``meshlink.AddressInUse``...) subclass these, so
``except resolver.ResolveError`` also catches what ``meshlink.connect`` raises.
"""

from __future__ import annotations

__all__ = [
    "DnsConfigError",
    "InvalidName",
    "NameInUse",
    "ResolveError",
    "ResolverError",
    "RulesError",
    "ServiceNotFound",
    "StoreError",
]


class ResolverError(Exception):
    """Base class of every error the resolver raises on purpose."""


class ResolveError(ResolverError):
    """A name could not be resolved to any usable endpoint."""


class RulesError(ResolveError):
    """A static rules file is malformed; the message names the file and line.

    Attributes:
        path: the rules file.
        line: the 1-based line of the error (0 when unknown).
        reason: the message without the ``path:line:`` prefix.
    """

    def __init__(self, path: str, line: int, reason: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason

    def __reduce__(self) -> tuple[type[RulesError], tuple[str, int, str]]:
        # Exceptions pickle as ``cls(*args)``; args holds the joined message.
        return type(self), (self.path, self.line, self.reason)


class DnsConfigError(ResolveError):
    """The DNS source is configured with something unusable (``dns=``,
    ``--dns``, ``$MESHLINK_DNS``): not an IP address, a bad port or domain."""


class InvalidName(ResolverError, ValueError):
    """A service name (or a XenStore port name) is not acceptable."""


class NameInUse(ResolverError, OSError):
    """A live server already holds this service name (``errno`` is EADDRINUSE)."""


class ServiceNotFound(ResolverError, OSError):
    """No service of that name is published where we looked (or we may not see it)."""


class StoreError(ResolverError):
    """A name store (the host store directory, XenStore) cannot be used."""
