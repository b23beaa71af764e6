#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds every fuzz target and runs each one, one after the other, for
# SECONDS_PER_TARGET seconds (default 20) on a scratch copy of its seed
# corpus (the checked-in corpus/ is never grown).
#
#   fuzz/run.sh [SECONDS_PER_TARGET]
#
# Prints one summary line per target (executions, exec/s from libFuzzer's
# final stats) and exits non-zero if any target crashed, naming the crash
# artifact. A libFuzzer dictionary in dict/<target>.dict is used when present.
# Set FUZZ_TARGETS="bus uart" to run a subset and FUZZ_JOBS to
# change the build parallelism (default 1: other builds share the machine).

set -euo pipefail

SECONDS_PER_TARGET="${1:-20}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_TARGET" -eq 0 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]  (a positive integer, default 20)" >&2
    exit 2
fi

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$FUZZ_DIR"
# The fuzz workspace keeps its build in fuzz/target; a CARGO_TARGET_DIR from
# the environment would move it and break the binary paths below.
unset CARGO_TARGET_DIR
TRIPLE="$(rustc +nightly -vV | sed -n 's/^host: //p')"
export CARGO_BUILD_JOBS="${FUZZ_JOBS:-1}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it"
    cargo install cargo-fuzz --locked
fi

# AddressSanitizer needs no rust-src (only -Zbuild-std would); if the
# sanitizer build fails anyway, fall back to coverage-only instrumentation.
SANITIZER=address
if ! cargo +nightly fuzz build; then
    echo "WARNING: the AddressSanitizer build failed; building with --sanitizer none" >&2
    SANITIZER=none
    cargo +nightly fuzz build --sanitizer none
fi
BIN_DIR="$FUZZ_DIR/target/$TRIPLE/release"

read -r -a TARGETS <<<"${FUZZ_TARGETS:-$(cargo +nightly fuzz list | tr '\n' ' ')}"

RUN_DIR="$FUZZ_DIR/corpus-run"
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"

summary=()
failed=0
for target in "${TARGETS[@]}"; do
    corpus="$RUN_DIR/$target"
    artifacts="$FUZZ_DIR/artifacts/$target"
    log="$LOG_DIR/$target.log"
    rm -rf "$corpus"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "corpus/$target" ]; then
        cp -r "corpus/$target/." "$corpus/"
    fi

    extra=()
    if [ -f "dict/$target.dict" ]; then
        extra+=(-dict="dict/$target.dict")
    fi

    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s (sanitizer: $SANITIZER, log: $log)"
    status=0
    "$BIN_DIR/$target" \
        -max_total_time="$SECONDS_PER_TARGET" \
        -rss_limit_mb=2048 \
        -timeout=10 \
        -print_final_stats=1 \
        -artifact_prefix="$artifacts/" \
        "${extra[@]}" \
        "$corpus" >"$log" 2>&1 || status=$?

    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
    speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)"
    cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | cut -d' ' -f2)"
    line="$(printf '%-14s executions=%-10s exec/s=%-8s cov=%-6s corpus=%s' \
        "$target" "${runs:-?}" "${speed:-?}" "${cov:-?}" "$(find "$corpus" -type f | wc -l)")"
    if [ "$status" -ne 0 ]; then
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)"
        line="$line CRASHED (exit $status): ${artifact:-see $log}"
        failed=1
        echo "---- $target: last lines of $log"
        tail -n 40 "$log"
    fi
    summary+=("$line")
done

echo
echo "== summary (${SECONDS_PER_TARGET}s per target, sanitizer: $SANITIZER)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "at least one target crashed; reproduce with:" \
        "cargo +nightly fuzz run <target> <artifact>" >&2
    exit 1
fi
