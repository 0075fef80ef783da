#!/usr/bin/env bash
# Benchmarks (not tests): builds the gateway and the load generator in release mode and prints
# figures with the command that made them. Arguments go to bench-gateway, e.g.
#   ./scripts/bench.sh --idle 10000 --connects 3000 --publishers 20 --seconds 10
# Results are recorded in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p fleet-broker --bin gateway -p fleet-tests --bin bench-gateway
echo "# ./scripts/bench.sh $*"
exec target/release/bench-gateway "$@"
