#!/usr/bin/env bash
# Benchmarks (not tests): builds the gateway and the load generators in release mode and prints
# figures with the command that made them. Results are recorded in BENCHMARKS.md.
#   ./scripts/bench.sh --idle 10000 --connects 3000 --publishers 20 --seconds 10   (edge)
#   ./scripts/bench.sh updates --devices 200 --image-mib 32                        (fan-out)
#   ./scripts/bench.sh updates --status-during-upload --image-mib 64    (status acks vs upload)
#   ./scripts/bench.sh mqtt                 (MQTT core vs Mosquitto 2.0.11; --help for flags)
#   ./scripts/bench.sh mqtt --scenarios rate --rates 10000,40000
set -euo pipefail
cd "$(dirname "$0")/.."
tool=bench-gateway
sub=""
case "${1:-}" in
    updates) tool=bench-updates; sub="updates "; shift ;;
    mqtt) tool=bench-mqtt; sub="mqtt "; shift ;;
esac
cargo build --release --locked -p fleet-broker --bin gateway -p fleet-tests --bin "$tool"
echo "# ./scripts/bench.sh ${sub}$*"
echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
exec "target/release/$tool" "$@"
