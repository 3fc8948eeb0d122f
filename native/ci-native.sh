#!/usr/bin/env bash
# ci-native.sh - the native core's memory-safety gate, called from .ci/run
# after the main test command:
#   1. native/sanitize-tests.sh: the native-facing tests (tests/native,
#      tests/test_vchan*.py, tests/test_blk*.py, tests/test_ivshmem.py) against an ASan+UBSan build;
#   2. native/fuzz/run.sh SECONDS: every libFuzzer target, regressions first,
#      then SECONDS of fuzzing each (default 60), executions printed.
# Both always run; the exit status is non-zero if either failed.
# Usage: native/ci-native.sh [FUZZ_SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}

banner() { printf '\n######## %s ########\n' "$*"; }

banner "native CI 1/2: sanitizer build (ASan+UBSan) + native-facing tests"
start=$(date +%s)
native/sanitize-tests.sh
san=$?
banner "native CI 1/2: sanitizer tests: $([ $san -eq 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - start ))s"

banner "native CI 2/2: libFuzzer targets, ${secs}s each"
start=$(date +%s)
native/fuzz/run.sh "$secs"
fuzz=$?
banner "native CI 2/2: fuzzing: $([ $fuzz -eq 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - start ))s"

if [ $san -ne 0 ] || [ $fuzz -ne 0 ]; then
    echo "native CI: FAILED (sanitizer tests exit $san, fuzzing exit $fuzz)"
    exit 1
fi
echo "native CI: PASSED"
