#!/usr/bin/env bash
# Fuzzing fleet's parsers (docs/reliability.md, "Fuzzing"). The targets are in fuzz/.
#
#   tests/fuzz.sh SECONDS [TARGET...]          coverage-guided: libFuzzer through cargo-fuzz,
#                                              SECONDS per target (all targets by default)
#   tests/fuzz.sh --quick SECONDS [TARGET...]  plain stable: fuzz-quick, seeds and regressions
#                                              plus random mutations, SECONDS per target
#
# The coverage-guided run needs cargo-fuzz (installed from crates.io when missing) and runs on
# the stable toolchain with RUSTC_BOOTSTRAP=1 for libFuzzer's instrumentation flags. It grows
# fuzz/corpus/TARGET (not checked in) from fuzz/seeds/TARGET and fuzz/regressions/TARGET, and
# leaves a crashing input in fuzz/artifacts/TARGET/. FUZZ_SANITIZER (default none) picks
# cargo-fuzz's sanitizer: fleet forbids unsafe code, so address sanitizing mostly costs speed.
# A summary line per target gives executions, executions per second, coverage and findings.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TARGETS=(bundle manifest agent_config fleet_toml heartbeat)

usage() {
    sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

quick=0
if [ "${1:-}" = "--quick" ]; then
    quick=1
    shift
fi
[ $# -ge 1 ] || usage
SECONDS_EACH=$1
shift
case $SECONDS_EACH in '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, not '$SECONDS_EACH'" >&2; exit 2 ;; esac
[ $# -gt 0 ] && TARGETS=("$@")

# Targets that write files (bundle unpacking, fleet directories) do so under TMPDIR: in memory
# when /dev/shm is there (unpacking on a disk-backed /tmp runs about five times slower).
base=${TMPDIR:-/tmp}
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
scratch=$(mktemp -d "$base/fleet-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

if [ $quick -eq 1 ]; then
    exec cargo run --quiet --locked -p fleet-fuzz --bin fuzz-quick -- --seconds "$SECONDS_EACH" "${TARGETS[@]}"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz from crates.io"
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
# The release profile is tuned for small shipped binaries (fat LTO, one codegen unit, stripped):
# for the instrumented build, which links the AWS SDK through the controller, that costs most
# of an hour and the backtraces. cargo-fuzz adds debug assertions and overflow checks.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_OPT_LEVEL=3
FLAGS=(--features libfuzzer --sanitizer "${FUZZ_SANITIZER:-none}" --codegen-units 16)
mkdir -p fuzz/artifacts/logs
echo "== build (release, instrumented; the first build takes a while)"
for t in "${TARGETS[@]}"; do
    # One by one: without a name cargo-fuzz would also build fuzz-quick, which has no libFuzzer.
    cargo fuzz build "${FLAGS[@]}" "$t"
done
failed=0
for t in "${TARGETS[@]}"; do
    dirs=("fuzz/corpus/$t")
    mkdir -p "fuzz/corpus/$t"
    for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do
        [ -d "$d" ] && dirs+=("$d")
    done
    log=fuzz/artifacts/logs/$t.log
    echo "== fuzz $t for ${SECONDS_EACH}s (log: $log)"
    status=0
    cargo fuzz run "${FLAGS[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corpus=$(sed -n 's/.* corp: \([0-9]*\/[0-9A-Za-z]*\).*/\1/p' <<<"$last")
    if [ $status -eq 0 ]; then
        finding="no findings"
    else
        failed=$((failed + 1))
        finding="FINDING: $(grep -m1 -E "panicked at|ERROR: libFuzzer" "$log" || echo "exit $status"); input: $(grep -o 'fuzz/artifacts/[^ ]*' "$log" | tail -1)"
    fi
    echo "fuzz $t: ${execs:-?} executions, ${rate:-?}/s, cov ${cov:-?}, features ${ft:-?}, corpus ${corpus:-?}; $finding"
done
echo "fuzz: $(( ${#TARGETS[@]} - failed )) passed, $failed failed"
[ $failed -eq 0 ]
