#!/usr/bin/env bash
# Fuzzing with libFuzzer on the stable toolchain (see fuzz/STATUS.md for why this engine).
#   ./scripts/fuzz.sh TARGET SECONDS   run one target for SECONDS on its seed corpus
#   ./scripts/fuzz.sh smoke [SECONDS]  every target a few seconds (default 5)
#   ./scripts/fuzz.sh build            only build every target
#   ./scripts/fuzz.sh list             the targets
# Prints the executions and crashes of each run; exits non-zero when a target crashed (the
# input is kept in fuzz/artifacts/TARGET/). New coverage-increasing inputs accumulate in
# fuzz/work/TARGET/ (not in the repository); the seeds in fuzz/corpus/TARGET/ are only read.
#
# FUZZ_SANITIZER=none builds without AddressSanitizer (faster, finds only panics, aborts and
# bounded-allocation breaches); the default is address.
#
# The fuzz crate lives outside the workspace (own Cargo.lock, own target directory), so none
# of this touches the main build. Needs a C++ compiler (libfuzzer-sys builds libFuzzer from
# source): installed from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(mqtt_codec device_inputs gateway_api merkle_proof acl_match)

usage() {
    sed -n '2,7p' "$0" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in
    list) printf '%s\n' "${targets[@]}"; exit 0 ;;
    smoke) run=("${targets[@]}"); seconds="${2:-5}" ;;
    build) run=("${targets[@]}"); seconds=1; build_only=1 ;;
    *)
        [ $# -eq 2 ] || usage
        printf '%s\n' "${targets[@]}" | grep -qx -- "$1" || { echo "unknown target: $1" >&2; usage; }
        run=("$1"); seconds="$2" ;;
esac
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || { echo "SECONDS must be a positive integer" >&2; exit 2; }

if ! command -v c++ >/dev/null 2>&1; then
    echo "Installing a C++ compiler (libFuzzer is built from source)" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
# The instrumentation cargo-fuzz passes, with stable rustc: SanitizerCoverage's inline 8-bit
# counters, PC table and comparison tracing are plain -C flags; only -Zsanitizer needs
# RUSTC_BOOTSTRAP. --cfg fuzzing as cargo-fuzz sets it. Debug assertions and overflow checks
# on, so that an arithmetic overflow is a crash, not a wrap.
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares"
flags+=" --cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers=yes"
case "${FUZZ_SANITIZER:-address}" in
    address) flags+=" -Zsanitizer=address"; export RUSTC_BOOTSTRAP=1 ;;
    none) ;;
    *) echo "FUZZ_SANITIZER is address or none" >&2; exit 2 ;;
esac

# --target keeps these flags off build scripts and proc macros (the host build).
(cd fuzz && RUSTFLAGS="$flags" cargo build --locked --release --target "$host" \
    $(printf -- '--bin %s ' "${run[@]}"))

[ -z "${build_only:-}" ] || exit 0

failed=()
for t in "${run[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    before=$(find "fuzz/artifacts/$t" -type f ! -name '*.log' | wc -l)
    set +e
    # Bounded allocation: one malloc over 256 MiB, or 2 GiB resident, is a crash.
    "fuzz/target/$host/release/$t" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "fuzz/work/$t" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "fuzz/artifacts/$t" -type f ! -name '*.log' | wc -l)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    crashes=$((after - before))
    echo "$t: ${execs:-?} executions in ${seconds} s (${rate:-?}/s), ${crashes} crash(es), exit ${rc}"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed+=("$t")
        echo "--- $t: end of $log" >&2
        tail -40 "$log" >&2
    fi
done

if ((${#failed[@]})); then
    echo "CRASHED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
