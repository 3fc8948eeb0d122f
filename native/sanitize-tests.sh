#!/usr/bin/env bash
# sanitize-tests.sh - run the native-facing tests against an ASan+UBSan build
# of the C core (DESIGN.md sections 2 and 3: every index, order and request a
# peer controls is hostile; this proves the core never misuses memory while
# the real tests drive it).
#
# How: copy the working tree to a throwaway directory, build the extension
# there with MESHLINK_SANITIZE=1 through the same setuptools/cffi hook that
# `pip install -e .` uses (build_ext --inplace), and run pytest from the copy
# with PYTHONPATH pointing at it.  The shared checkout's normal build is never
# touched, so nothing needs restoring and engineers working concurrently in
# the same checkout keep their normal extension.
#
# A sanitizer report anywhere fails the run, including in peer processes the
# tests spawn: every report aborts its process (halt_on_error/abort_on_error)
# *and* is written to a log file under $WORK/san (log_path), which we scan
# after pytest whether or not a test noticed the child's death.
#
# Usage: native/sanitize-tests.sh [extra pytest args]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshlink-sanitize.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

echo "== sanitize-tests: copying tree to $WORK"
tar -C "$ROOT" \
    --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
    --exclude=./native/fuzz/out --exclude='__pycache__' --exclude=.pytest_cache \
    --exclude=.hypothesis --exclude=meshlink/_native.c \
    -cf - . | tar -C "$WORK" -xf -

echo "== sanitize-tests: building meshlink._native with MESHLINK_SANITIZE=1"
(cd "$WORK" && MESHLINK_SANITIZE=1 "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1) || {
    cat "$WORK/build.log" >&2
    echo "sanitize-tests: FAILED to build the sanitizer variant" >&2
    exit 1
}
SO=$(ls "$WORK"/meshlink/_native*.so)
# The build must really be instrumented, or this whole run proves nothing.
# (nm's output is captured first: `nm | grep -q` under pipefail fails at
# random when grep exits early and nm dies of SIGPIPE.)
syms=$(nm -D "$SO")
if ! grep -q '__asan_report' <<<"$syms"; then
    echo "sanitize-tests: $SO is not ASan-instrumented" >&2
    exit 1
fi
if ! grep -q '__ubsan_handle' <<<"$syms"; then
    echo "sanitize-tests: $SO is not UBSan-instrumented" >&2
    exit 1
fi
echo "   built $(basename "$SO") (ASan + UBSan, -fno-sanitize-recover=all)"

# The runtime the extension was linked against must come first in the
# process (CPython itself is not instrumented).
CC_NAME=$("$PY" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "gcc").split()[0])')
ASAN_RT=$("$CC_NAME" -print-file-name=libasan.so)
UBSAN_RT=$("$CC_NAME" -print-file-name=libubsan.so)
if [ ! -e "$ASAN_RT" ]; then
    echo "sanitize-tests: no ASan runtime for $CC_NAME ($ASAN_RT)" >&2
    exit 1
fi

mkdir -p "$WORK/san"
# detect_leaks=0: CPython leaks by design at exit.  The ring code has no
# allocation paths worth leak-checking that the fuzzers do not cover.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$WORK/san/asan:print_summary=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$WORK/san/ubsan"
export LD_PRELOAD="$ASAN_RT${UBSAN_RT:+:$UBSAN_RT}"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"

TESTS=(tests/native)
for f in "$WORK"/tests/test_vchan*.py "$WORK"/tests/test_blk*.py; do
    [ -e "$f" ] && TESTS+=("tests/${f##*/}")
done

echo "== sanitize-tests: pytest ${TESTS[*]}"
set +e
# The sanity check below proves the instrumented module is the one imported.
(cd "$WORK" && "$PY" -c 'import meshlink._native as m, sys; sys.exit(0 if m.__file__.startswith(sys.argv[1]) else 1)' "$WORK") 
imp=$?
(cd "$WORK" && "$PY" -m pytest -p no:cacheprovider -q -ra "${TESTS[@]}" "$@")
rc=$?
set -e
unset LD_PRELOAD

if [ "$imp" -ne 0 ]; then
    echo "sanitize-tests: tests imported meshlink._native from outside $WORK" >&2
    rc=1
fi
reports=$(ls "$WORK"/san 2>/dev/null || true)
if [ -n "$reports" ]; then
    echo "== sanitize-tests: SANITIZER REPORTS" >&2
    for f in "$WORK"/san/*; do
        echo "--- $f" >&2
        cat "$f" >&2
    done
    rc=1
fi
if [ "$rc" -ne 0 ]; then
    echo "== sanitize-tests: FAILED (pytest/sanitizer exit $rc)"
    exit 1
fi
echo "== sanitize-tests: PASSED (no sanitizer reports in any process)"
