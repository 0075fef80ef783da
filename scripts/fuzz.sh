#!/usr/bin/env bash
# Fuzzing with libFuzzer on the stable toolchain (see fuzz/STATUS.md for why this engine).
#   ./scripts/fuzz.sh TARGET SECONDS   run one target for SECONDS on its seed corpus
#   ./scripts/fuzz.sh smoke [SECONDS]  the seeds, then every target a few seconds (default 5)
#   ./scripts/fuzz.sh build            only build every target
#   ./scripts/fuzz.sh seeds            rewrite fuzz/corpus/ (src/bin/seeds.rs), checking that
#                                      the seeds pass the checks they are meant to pass
#   ./scripts/fuzz.sh list             the targets
# Prints the executions and crashes of each run; exits non-zero when a target does not build,
# crashes (the input is kept in fuzz/artifacts/TARGET/) or runs no input at all. New
# coverage-increasing inputs accumulate in fuzz/work/TARGET/ (not in the repository); the
# seeds in fuzz/corpus/TARGET/ are only read.
#
# `smoke` builds with the `smoke` profile (fuzz/Cargo.toml: less optimisation, no debug info),
# which builds faster (3.6 min from scratch on the 2-core machine, about 10 with release) and
# runs slower: right for seconds, wrong for minutes.
# FUZZ_PROFILE=release|smoke overrides the choice (the default elsewhere is release).
#
# FUZZ_SANITIZER=none builds without AddressSanitizer (faster, finds only panics, aborts and
# bounded-allocation breaches); the default is address. FUZZ_BUILD=0 runs what was built
# before without building (e.g. build under the shared build lock, run outside it).
#
# The fuzz crate lives outside the workspace (own Cargo.lock, own target directory), so none
# of this touches the main build. Needs a C++ compiler (libfuzzer-sys builds libFuzzer from
# source): installed from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(mqtt_codec device_inputs gateway_api gateway_device_inputs merkle_proof acl_match bridge_mapping)

usage() {
    sed -n '2,9p' "$0" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in
    list) printf '%s\n' "${targets[@]}"; exit 0 ;;
    smoke) run=("${targets[@]}"); seconds="${2:-5}"; seeds=1; profile="${FUZZ_PROFILE:-smoke}" ;;
    build) run=("${targets[@]}"); seconds=1; build_only=1 ;;
    seeds) run=(); seconds=1; seeds=1; build_only=1 ;;
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
    command -v c++ >/dev/null 2>&1 || { echo "no C++ compiler after installing g++" >&2; exit 1; }
fi

# The fuzz crate is outside the workspace, so `cargo fmt --all` does not see it: checked here.
[ "$1" != smoke ] || (cd fuzz && cargo fmt --check)

host="$(rustc -vV | sed -n 's/^host: //p')"
profile="${profile:-${FUZZ_PROFILE:-release}}"
case "$profile" in
    release | smoke) ;;
    *) echo "FUZZ_PROFILE is release or smoke" >&2; exit 2 ;;
esac
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

# The cc crate builds C dependencies (SQLite in fleet-broker) with the sanitizer it finds in
# the Rust flags; SQLite's amalgamation has equally named static tables of the same size,
# which ASan's strictest one-definition check reports at startup. Level 1 still reports
# globals whose sizes differ.
export ASAN_OPTIONS="detect_odr_violation=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

# --target keeps these flags off build scripts and proc macros (the host build).
if ((${#run[@]})) && [ "${FUZZ_BUILD:-1}" != 0 ]; then
    (cd fuzz && RUSTFLAGS="$flags" cargo build --locked --profile "$profile" --target "$host" \
        $(printf -- '--bin %s ' "${run[@]}"))
fi

if [ -n "${seeds:-}" ]; then
    # The same flags, so the dependencies built for the targets are reused. The program
    # panics (and this script fails) when a seed no longer passes its checks.
    (cd fuzz && RUSTFLAGS="$flags" cargo run --locked --profile "$profile" --target "$host" --bin seeds)
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1 &&
        [ -n "$(git status --porcelain -- fuzz/corpus)" ]; then
        echo "fuzz/corpus/ differs from what src/bin/seeds.rs writes:" >&2
        git status --short -- fuzz/corpus >&2
        [ "$1" = seeds ] || exit 1
    fi
fi

[ -z "${build_only:-}" ] || exit 0

failed=()
for t in "${run[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    before=$(find "fuzz/artifacts/$t" -type f ! -name '*.log' | wc -l)
    set +e
    # Bounded allocation: one malloc over 256 MiB, or 2 GiB resident, is a crash.
    "fuzz/target/$host/$profile/$t" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "fuzz/work/$t" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "fuzz/artifacts/$t" -type f ! -name '*.log' | wc -l)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    crashes=$((after - before))
    echo "$t: ${execs:-?} executions in ${seconds} s (${rate:-?}/s), ${crashes} crash(es), exit ${rc}"
    # No executions means the target did not really run: a failure, not a pass.
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ] || [ "${execs:-0}" -eq 0 ]; then
        failed+=("$t")
        echo "--- $t: end of $log" >&2
        tail -40 "$log" >&2
    fi
done

if ((${#failed[@]})); then
    echo "CRASHED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
