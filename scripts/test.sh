#!/usr/bin/env bash
# Runs the whole test suite. Installs the third-party tools the tests drive (from Debian's
# packages) when they are missing; a test whose tool is still missing fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package -> command the tests run.
# (mosquitto, the cloud broker of the bridge tests, and nats-server, the cloud cluster of the
# cluster tests, live in /usr/sbin.)
declare -A tools=([openssl]=openssl [mosquitto-clients]=mosquitto_pub [mosquitto]=mosquitto
    [nats-server]=nats-server)
missing=()
for pkg in "${!tools[@]}"; do
    command -v "${tools[$pkg]}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tools[$pkg]}" ] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "Installing test tools: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# The Python example service's venv and generated classes (tests/tests/python_service.rs;
# pip runs only on the first call, and python3-venv is installed when missing).
./scripts/deadline.sh 600 "the Python environment" ./scripts/python-env.sh

# Build first (a clean build on 2 cores takes minutes and cannot hang), then run under a
# deadline: a test that hangs fails the run with a message naming it, well inside CI's limit,
# instead of running until something kills it. Every test bounds its own waits; this is the
# backstop. FLEET_TEST_DEADLINE (seconds) overrides the run's deadline.
./scripts/deadline.sh 2400 "building the tests" cargo test --workspace --locked --no-run "$@"
./scripts/deadline.sh "${FLEET_TEST_DEADLINE:-1200}" "the test suite" \
    cargo test --workspace --locked --no-fail-fast "$@"
# Every fuzz target a few seconds on its seeds (its own workspace and target directory; fails
# when a target does not build, crashes or runs no input). Installs g++ when missing.
./scripts/deadline.sh 900 "the fuzz smoke run" ./scripts/fuzz.sh smoke
