#!/usr/bin/env bash
# run.sh - build every libFuzzer target in native/fuzz/ and run each one.
#
# Usage: native/fuzz/run.sh [SECONDS]     (default 60 per target)
#        native/fuzz/run.sh 3600           (a longer local run)
#
# For each target T (T.c here, linked with the native/*.c it exercises):
#   1. replay every crash input kept in regressions/T/ once (a regression
#      test: libFuzzer runs files given as arguments exactly once);
#   2. fuzz for SECONDS starting from the checked-in seeds (corpus/T/) plus
#      the working corpus of earlier local runs (out/corpus/T/; new inputs go
#      there, never into the checked-in corpus), with T.dict;
#   3. print the number of executions (stat::number_of_executed_units).
# Any crash, sanitizer report, invariant failure, timeout (-timeout, a call
# that loops) or OOM makes the exit status non-zero; the crashing input is
# copied into regressions/T/ so that it can be committed as a regression.
#
# Build outputs live in out/ (ignored by git).  Environment: CC (default
# clang), FUZZ_JOBS unused; FUZZ_TARGETS to choose targets ("vchan_fuzz").
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NATIVE=$(dirname "$HERE")
OUT="$HERE/out"
SECS=${1:-60}
CC=${CC:-clang}
CFLAGS=(-g -O1 -std=c11 -Wall -Wextra -Werror -fno-omit-frame-pointer
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I"$NATIVE")
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

# target -> native sources it links (only files that exist are used).
sources_for() {
    case "$1" in
        vchan_fuzz) echo "vchan_ring.c vchan_setup.c local_grant.c local_event.c" ;;
        blk_fuzz) echo "blkring.c" ;;
        ivshmem_fuzz) echo "ivshmem.c vchan_ring.c vchan_setup.c" ;;
    esac
}

mkdir -p "$OUT"
targets=()
for src in "$HERE"/*_fuzz.c; do
    t=$(basename "$src" .c)
    if [ -n "${FUZZ_TARGETS:-}" ] && [[ " $FUZZ_TARGETS " != *" $t "* ]]; then
        continue
    fi
    targets+=("$t")
done

failed=0
declare -A execs status
for t in "${targets[@]}"; do
    echo "=== fuzz[$t]: build"
    srcs=("$HERE/$t.c")
    missing=0
    for f in $(sources_for "$t"); do
        if [ -e "$NATIVE/$f" ]; then srcs+=("$NATIVE/$f"); else missing=1; fi
    done
    if [ "$missing" -ne 0 ]; then
        echo "fuzz[$t]: native sources missing ($(sources_for "$t")); FAIL"
        status[$t]=missing; failed=1; continue
    fi
    if ! "$CC" "${CFLAGS[@]}" "${srcs[@]}" -o "$OUT/$t" 2>"$OUT/$t.build.log"; then
        cat "$OUT/$t.build.log"
        echo "fuzz[$t]: build FAILED"
        status[$t]=build; failed=1; continue
    fi

    regs=()
    if [ -d "$HERE/regressions/$t" ]; then
        while IFS= read -r -d '' f; do regs+=("$f"); done \
            < <(find "$HERE/regressions/$t" -type f ! -name '.*' ! -name README -print0 | sort -z)
    fi
    if [ "${#regs[@]}" -gt 0 ]; then
        echo "=== fuzz[$t]: replay ${#regs[@]} regression input(s)"
        if ! "$OUT/$t" -timeout=10 "${regs[@]}" >"$OUT/$t.regress.log" 2>&1; then
            tail -40 "$OUT/$t.regress.log"
            echo "fuzz[$t]: REGRESSION input crashes again"
            status[$t]=regression; failed=1; continue
        fi
        echo "fuzz[$t]: all regression inputs pass"
    fi

    echo "=== fuzz[$t]: fuzz for ${SECS}s"
    work="$OUT/corpus/$t"
    mkdir -p "$work" "$OUT/crash"
    rm -f "$OUT/crash/$t-"*
    dict=()
    [ -e "$HERE/$t.dict" ] && dict=(-dict="$HERE/$t.dict")
    start=$(date +%s)
    "$OUT/$t" -max_total_time="$SECS" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        -max_len=4096 "${dict[@]}" -artifact_prefix="$OUT/crash/$t-" \
        "$work" "$HERE/corpus/$t" >"$OUT/$t.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$OUT/$t.log" | tail -1)
    execs[$t]=${n:-?}
    if [ "$rc" -ne 0 ]; then
        grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|RELOAD)' "$OUT/$t.log" | tail -60
        mkdir -p "$HERE/regressions/$t"
        for a in "$OUT/crash/$t-"*; do
            [ -e "$a" ] || continue
            cp "$a" "$HERE/regressions/$t/"
            echo "fuzz[$t]: crash input saved as native/fuzz/regressions/$t/$(basename "$a")"
        done
        echo "fuzz[$t]: FAILED after ${took}s (exit $rc, ${execs[$t]} executions)"
        status[$t]=crash; failed=1; continue
    fi
    status[$t]=ok
    echo "fuzz[$t]: OK, ${execs[$t]} executions in ${took}s"
done

echo "=== fuzz summary (${SECS}s per target)"
for t in "${targets[@]}"; do
    printf '  %-12s %-10s executions: %s\n' "$t" "${status[$t]:-?}" "${execs[$t]:-n/a}"
done
exit "$failed"
