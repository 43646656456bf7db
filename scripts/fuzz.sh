#!/usr/bin/env bash
# Runs every cargo fuzz target (fuzz/) for a bounded time and fails on any crash, leak or
# hang (timeout), printing the executions per target.
#
#   bash scripts/fuzz.sh [seconds per target, default 60] [target...]
#
# Each target starts from its committed corpus (fuzz/corpus/<target>, minimised with
# `cargo fuzz cmin`); what a run discovers goes to a scratch copy, so the work tree stays
# clean (copy new inputs back and re-minimise to grow the committed corpus). A crash is
# saved under fuzz/artifacts/<target>/ and the script exits 1: turn the input into a
# regression test in the broker's unit tests (see broker/src/fuzzing.rs).
#
# Needs cargo-fuzz (installed here when missing: `cargo install cargo-fuzz --locked`,
# about a minute on 2 cores) and builds with AddressSanitizer on the stable toolchain
# through RUSTC_BOOTSTRAP=1 (the first build of the targets takes ~2.5 min on 2 cores).
# FUZZ_SANITIZER=none skips ASan (faster build and runs, no C-side memory checks).
set -euo pipefail

seconds="${1:-60}"
shift || true
targets=("$@")
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
# The fuzz crate has its own target directory; a CARGO_TARGET_DIR meant for the workspace
# would mix sanitizer builds into it.
unset CARGO_TARGET_DIR

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    start=$(date +%s)
    cargo install cargo-fuzz --locked
    echo "fuzz.sh: cargo-fuzz installed in $(( $(date +%s) - start )) s"
fi

if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1
start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "fuzz.sh: targets built in $(( $(date +%s) - start )) s (sanitizer: $sanitizer)"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
summary=()
failed=0
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target" "corpus/$target"
    log="$scratch/$target.log"
    status=0
    extra=()
    # Config files past 2 KiB only grow the corpus with more of the same TOML.
    [ "$target" = config ] && extra=(-max_len=2048)
    cargo fuzz run --sanitizer "$sanitizer" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1 || status=$?
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1 || true)
    time=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | grep -Eo 'in [0-9]+' | grep -Eo '[0-9]+' | tail -1 || true)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+' || true)
    line="$target: ${runs:-?} executions in ${time:-$seconds} s, coverage ${cov:-?}, corpus $(ls "corpus/$target" | wc -l) + $(ls "$scratch/$target" | wc -l) new"
    if [ "$status" -ne 0 ]; then
        failed=1
        line="$line: FAILED (exit $status)"
        echo "---- $target ----"
        grep -E -A40 'ERROR: libFuzzer|panicked at|SUMMARY|Test unit written|==[0-9]+==ERROR' "$log" | head -80 || tail -40 "$log"
    fi
    summary+=("$line")
done

echo "fuzz.sh: ${seconds} s per target"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzz.sh: a target failed; the input is under fuzz/artifacts/<target>/"
    exit 1
fi
