#!/usr/bin/env bash
# sanitize-tests.sh - run the native-facing tests against an ASan+UBSan build
# of the C core (docs/vchan.md section 7 and docs/blkif.md section 6: every index, order and request a
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
# *and* is written to a log file under $WORK/san-CC (log_path), which we scan
# after pytest whether or not a test noticed the child's death; pytest's own
# output is scanned for reports too.  Two passes, gcc then clang (see below);
# SANITIZE_COMPILERS="gcc" picks one.
#
# Usage: native/sanitize-tests.sh [extra pytest args]
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The real interpreter, not a pyenv shim: LD_PRELOAD should only meet Python.
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshlink-sanitize.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

echo "== sanitize-tests: copying tree to $WORK"
tar -C "$ROOT" \
    --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
    --exclude=./native/fuzz/out --exclude='__pycache__' --exclude=.pytest_cache \
    --exclude=.hypothesis --exclude=meshlink/_native.c \
    -cf - . | tar -C "$WORK" -xf -

TESTS=(tests/native)
# test_blocking.py: the blocking client waits in C (native/vchan_wait.c).
for f in "$WORK"/tests/test_vchan*.py "$WORK"/tests/test_blk*.py "$WORK"/tests/test_ivshmem.py \
         "$WORK"/tests/test_blocking.py; do
    [ -e "$f" ] && TESTS+=("tests/${f##*/}")
done
# The trio-free server's blk tests drive the C ring loop in a thread of the
# test process (its stop and liveness checks); the file's NBD tests run
# qemu-io, whose coroutines hang under the preloaded ASan, so only these.
for t in test_fast_path_blk_stop_does_not_wait_for_the_ring_to_idle \
         test_fast_path_blk_drops_a_silent_client_and_serves_others_meanwhile; do
    grep -q "def $t(" "$WORK/tests/test_disk_syncserve.py" 2>/dev/null \
        && TESTS+=("tests/test_disk_syncserve.py::$t")
done
PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH

# One pass per compiler.  gcc is what `MESHLINK_SANITIZE=1 pip install -e .`
# uses here; its separate libubsan ignores log_path, so a UBSan report in a
# child only shows as that child aborting (and in pytest's output, which we
# scan).  clang's single runtime writes every ASan and UBSan report, from
# every process, to log_path: that pass is the one whose scan cannot miss.
failed=0
for cc in ${SANITIZE_COMPILERS:-gcc clang}; do
    if ! command -v "$cc" >/dev/null; then
        echo "== sanitize-tests[$cc]: compiler not found: FAIL"
        failed=1; continue
    fi
    echo "== sanitize-tests[$cc]: building meshlink._native with MESHLINK_SANITIZE=1"
    rm -rf "$WORK/build" "$WORK"/meshlink/_native*.so "$WORK/meshlink/_native.c"
    if [ "$cc" = clang ]; then
        rt=$(clang -print-file-name=libclang_rt.asan-x86_64.so)
        env_cc=(CC=clang "LDSHARED=clang -shared")
    else
        rt="$("$cc" -print-file-name=libasan.so):$("$cc" -print-file-name=libubsan.so)"
        env_cc=(CC="$cc" "LDSHARED=$cc -shared")
    fi
    if ! (cd "$WORK" && env "${env_cc[@]}" MESHLINK_SANITIZE=1 "$PY" setup.py -q build_ext --inplace \
            >"$WORK/build-$cc.log" 2>&1); then
        cat "$WORK/build-$cc.log" >&2
        echo "== sanitize-tests[$cc]: FAILED to build the sanitizer variant"
        failed=1; continue
    fi
    SO=$(ls "$WORK"/meshlink/_native*.so)
    # The build must really be instrumented, or this whole run proves nothing.
    # (nm's output is captured first: `nm | grep -q` under pipefail fails at
    # random when grep exits early and nm dies of SIGPIPE.)
    syms=$(nm -D "$SO")
    if ! grep -q '__asan_report' <<<"$syms" || ! grep -q '__ubsan_handle' <<<"$syms"; then
        echo "== sanitize-tests[$cc]: $SO is not ASan+UBSan-instrumented: FAIL"
        failed=1; continue
    fi
    for lib in ${rt//:/ }; do
        if [ ! -e "$lib" ]; then
            echo "== sanitize-tests[$cc]: sanitizer runtime missing ($lib): FAIL"
            failed=1; continue 2
        fi
    done
    echo "   built $(basename "$SO") with $cc (ASan + UBSan, -fno-sanitize-recover=all)"

    san="$WORK/san-$cc"
    mkdir -p "$san"
    # detect_leaks=0: CPython leaks by design at exit (the fuzzers run with
    # leak detection on).  Every report aborts its process and is logged.
    asan="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$san/asan"
    ubsan="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$san/ubsan"

    echo "== sanitize-tests[$cc]: pytest ${TESTS[*]}"
    # Prove the instrumented module is the one the tests import.
    (cd "$WORK" && LD_PRELOAD="$rt" ASAN_OPTIONS="$asan" UBSAN_OPTIONS="$ubsan" "$PY" -c \
        'import meshlink._native as m, sys; sys.exit(0 if m.__file__.startswith(sys.argv[1]) else 1)' \
        "$WORK") || { echo "== sanitize-tests[$cc]: meshlink._native imported from outside $WORK: FAIL"; failed=1; continue; }
    (cd "$WORK" && LD_PRELOAD="$rt" ASAN_OPTIONS="$asan" UBSAN_OPTIONS="$ubsan" \
        "$PY" -m pytest -p no:cacheprovider -q -ra "${TESTS[@]}" "$@") 2>&1 | tee "$WORK/pytest-$cc.log"
    rc=${PIPESTATUS[0]}
    if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$WORK/pytest-$cc.log"; then
        echo "== sanitize-tests[$cc]: sanitizer report in the test output"
        rc=1
    fi
    if [ -n "$(ls "$san")" ]; then
        echo "== sanitize-tests[$cc]: SANITIZER REPORTS"
        for f in "$san"/*; do
            echo "--- $f"
            cat "$f"
        done
        rc=1
    fi
    if [ "$rc" -ne 0 ]; then
        echo "== sanitize-tests[$cc]: FAILED (exit $rc)"
        failed=1
    else
        echo "== sanitize-tests[$cc]: passed, no sanitizer reports in any process"
    fi
done
if [ "$failed" -ne 0 ]; then
    echo "== sanitize-tests: FAILED"
    exit 1
fi
echo "== sanitize-tests: PASSED (${SANITIZE_COMPILERS:-gcc clang})"
