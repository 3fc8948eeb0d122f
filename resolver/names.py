"""The rule for service names, shared by every registry (host store, XenStore, zeroconf)."""

from __future__ import annotations

import re

from .errors import InvalidName

__all__ = ["validate_service_name"]

#: Matched against the whole string (``fullmatch``): ``$`` would also accept
#: a trailing newline, which is no file name we want.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_service_name(name: str) -> str:
    """Check that ``name`` can be a service name and return it.

    Service names are 1..128 characters of ``[A-Za-z0-9._-]`` starting with a
    letter or digit, so that they are safe as file names and DNS-SD labels.

    Raises:
        InvalidName: the name is not acceptable.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid service name {name!r}: use 1-128 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name
