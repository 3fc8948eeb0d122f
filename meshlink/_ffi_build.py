"""cffi build script for meshlink's native core (API / out-of-line mode).

Run by setuptools at install time (see setup.py).  Compiles every C file in
``native/`` with strict warnings into the extension ``meshlink._native``.
Set ``MESHLINK_SANITIZE=1`` to build with AddressSanitizer and
UndefinedBehaviorSanitizer (tests must then run with the ASan runtime
preloaded; see ``.ci/run``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"

# A public header marks the part cffi should read between "cffi:begin" and
# "cffi:end" comments (declarations, integer #defines and enums only), so the
# header is the single source of the Python-facing API.
_BEGIN = re.compile(r"/\* cffi:begin.*?\*/", re.S)
_END = "/* cffi:end */"


def _cdef_of(header: Path) -> str | None:
    text = header.read_text()
    m = _BEGIN.search(text)
    if not m:
        return None
    return text[m.end() : text.index(_END, m.end())]


# The status codes every C function returns come first, from their one
# header (native/ml_errors.h): the Python side reads them as lib.ML_* and
# never spells the numbers itself.
_ERRORS = NATIVE / "ml_errors.h"

_HEADERS: list[Path] = []
_PARTS: list[str] = []
for _h in sorted(NATIVE.glob("*.h"), key=lambda h: (h != _ERRORS, h.name)):
    _part = _cdef_of(_h)
    if _part is not None:
        _HEADERS.append(_h)
        _PARTS.append(_part)
CDEF = "\n".join(_PARTS)


def _sources() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in NATIVE.glob("*.c"))


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2"]
    ldflags: list[str] = []
    if os.environ.get("MESHLINK_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
               "-fno-omit-frame-pointer", "-g"]
        cflags += san
        ldflags += san
    return cflags, ldflags


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_cflags, _ldflags = _flags()
ffibuilder.set_source(
    "meshlink._native",
    "".join(f'#include "{p.name}"\n' for p in _HEADERS),
    sources=_sources(),
    include_dirs=[str(NATIVE)],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
