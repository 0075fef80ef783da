#!/usr/bin/env bash
# Runs the whole test suite. Installs the third-party tools the tests drive (from Debian's
# packages) when they are missing; a test whose tool is still missing fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package -> command the tests run.
# (mosquitto, the cloud broker of the bridge tests, lives in /usr/sbin.)
declare -A tools=([openssl]=openssl [mosquitto-clients]=mosquitto_pub [mosquitto]=mosquitto)
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

cargo test --workspace --locked "$@"
