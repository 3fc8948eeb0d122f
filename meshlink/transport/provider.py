"""Which vchan provider runs here: the local one (memfd, eventfd) or Xen's.

Owned here, below both :mod:`meshlink.transport.vchan.xen` and
:mod:`meshlink.transport.xenstore`, which both need to know.
"""

from __future__ import annotations

import os

from .._native import ffi, lib
from ..errors import LocalProtocolError, ProviderUnavailable

__all__ = ["PROVIDER_ENV", "require_xen", "select_provider", "xen_error"]

#: ``xen``, ``local`` or ``auto`` (the default: Xen when ``/dev/xen`` exists).
PROVIDER_ENV = "MESHLINK_PROVIDER"


def xen_error() -> str:
    """The Xen libraries' last error message (as the native core recorded it)."""
    return str(ffi.string(lib.ml_xen_error()).decode(errors="replace"))


def require_xen() -> None:
    """Check that the Xen provider can run here.

    Raises:
        ProviderUnavailable: a Xen library is missing, or there is no Xen
            (no ``/dev/xen``); the message says which.
    """
    if lib.ml_xen_probe() < 0:
        raise ProviderUnavailable(f"Xen provider unavailable: {xen_error()}")


def select_provider(requested: str | None = None) -> str:
    """Which provider to use: ``"xen"`` or ``"local"``.

    Args:
        requested: ``"xen"``, ``"local"`` or ``"auto"``; default: the
            ``MESHLINK_PROVIDER`` environment variable, else ``"auto"``
            (Xen when ``/dev/xen`` exists).

    Raises:
        ProviderUnavailable: ``"xen"`` was forced but cannot run here.
        LocalProtocolError: an unknown provider name.
    """
    choice = (requested or os.environ.get(PROVIDER_ENV) or "auto").strip().lower()
    if choice == "local":
        return "local"
    if choice == "xen":
        require_xen()
        return "xen"
    if choice == "auto":
        return "xen" if os.path.exists("/dev/xen") else "local"
    raise LocalProtocolError(f"unknown vchan provider {choice!r} (use xen, local or auto)")
