#!/usr/bin/env bash
# Benchmarks (not tests): builds the gateway and the load generators in release mode and prints
# figures with the command that made them. Results are recorded in BENCHMARKS.md.
#   ./scripts/bench.sh --idle 10000 --connects 3000 --publishers 20 --seconds 10   (edge)
#   ./scripts/bench.sh updates --devices 200 --image-mib 32                        (fan-out)
#   ./scripts/bench.sh updates --status-during-upload --image-mib 64    (status acks vs upload)
set -euo pipefail
cd "$(dirname "$0")/.."
tool=bench-gateway
if [ "${1:-}" = "updates" ]; then
    tool=bench-updates
    shift
fi
cargo build --release --locked -p fleet-broker --bin gateway -p fleet-tests --bin "$tool"
echo "# ./scripts/bench.sh $([ "$tool" = bench-updates ] && echo "updates ")$*"
exec "target/release/$tool" "$@"
