"""Names a package loads on first use (PEP 562), so importing it stays cheap.

A package lists ``{name: ".module"}`` and gets the module-level
``__getattr__`` and ``__dir__`` that import ``.module`` when ``name`` is
first asked for, then keep the value in the package's namespace so later
lookups never come back here.  Used by ``resolver`` and by ``meshlink``'s
packages (meshlink builds on resolver; nothing here knows meshlink).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, names: Mapping[str, str], namespace: dict[str, Any],
               exported: Iterable[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for its lazy ``names``.

    Args:
        package: the package's ``__name__`` (relative modules resolve against it).
        names: each lazy name and the module, relative to ``package``, that defines it.
        namespace: the package's ``globals()``, where a loaded name is kept.
        exported: the package's ``__all__``.
    """
    listed = frozenset(exported)

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | listed)

    return __getattr__, __dir__
