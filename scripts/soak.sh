#!/usr/bin/env bash
# Soak: the chaos test (tests/tests/chaos.rs) run for hours instead of a minute, with its
# samples written to a CSV file and plotted to an SVG (memory, descriptors, connections and
# queue depths over time). Not part of CI.
#
#   ./scripts/soak.sh [HOURS] [OUT_DIR]      # default 2 hours, soak-out/
#
# FLEET_CHAOS_SEED, FLEET_CHAOS_DEVICES and FLEET_CHAOS_COMMANDS pass through to the test.
# The run fails like the chaos test does (the seed is printed to rerun it); the plot is
# written either way, from whatever was sampled.
set -euo pipefail
cd "$(dirname "$0")/.."

hours="${1:-2}"
out="${2:-soak-out}"
case "$hours" in
    '' | *[!0-9.]*) echo "soak: HOURS must be a number, not '$hours'" >&2; exit 2 ;;
esac
seconds=$(awk -v h="$hours" 'BEGIN { printf "%d", h * 3600 }')
if [ "$seconds" -lt 60 ]; then
    echo "soak: at least a minute (HOURS >= 0.017)" >&2
    exit 2
fi
mkdir -p "$out"
samples="$(cd "$out" && pwd)/samples.csv"
rm -f "$samples"

# As the test suite builds them: the gateway and test-device with their test switches, and
# soak-plot.
cargo test --workspace --locked --no-run
# The test's own deadline grows with the fault phase; this one is the backstop. `--workspace`
# keeps the features of the build above, so nothing is built again.
deadline=$((seconds + 1800))
status=0
FLEET_CHAOS_SECONDS="$seconds" FLEET_CHAOS_SAMPLES="$samples" \
    ./scripts/deadline.sh "$deadline" "the soak run" \
    cargo test --workspace --locked --test chaos -- --nocapture 2>&1 | tee "$out/soak.log" || status=$?
if [ -s "$samples" ]; then
    ./target/debug/soak-plot "$samples" "$out/soak.svg"
else
    echo "soak: no samples were written" >&2
    status=1
fi
echo "soak: log $out/soak.log, samples $samples, plot $out/soak.svg (exit $status)"
exit "$status"
