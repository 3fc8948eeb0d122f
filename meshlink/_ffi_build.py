"""cffi build script for meshlink's native core (API / out-of-line mode).

Run by setuptools at install time (see setup.py).  Compiles every C file in
``native/`` with strict warnings into the extension ``meshlink._native``.
Set ``MESHLINK_SANITIZE=1`` to build with AddressSanitizer and
UndefinedBehaviorSanitizer (tests must then run with the ASan runtime
preloaded; see ``.ci/run``).
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"

# Each native/cdef/NAME.h lists, in the restricted syntax cffi parses, the C
# API that native/NAME.h exports to Python; the real headers stay plain C.
_CDEFS = sorted((NATIVE / "cdef").glob("*.h"))
CDEF = "\n".join(p.read_text() for p in _CDEFS)


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
    "".join(f'#include "{p.name}"\n' for p in _CDEFS),
    sources=_sources(),
    include_dirs=[str(NATIVE)],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
