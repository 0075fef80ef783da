#!/usr/bin/env bash
# The Python environment of the example service in examples/python/ (and of its test):
#   target/python/venv  a virtual environment with pinned paho-mqtt, grpcio-tools, cryptography
#   target/python/gen   the classes generated from proto/ by grpc_tools.protoc (fleet/v1/*_pb2.py)
# Neither is in git. Idempotent: the venv is rebuilt only when the pins change and the classes
# only when a .proto file or the compiler changes, so a second run takes well under a second.
# Installs python3 and python3-venv from Debian's packages when missing. Prints nothing but
# errors; FLEET_PYTHON_DIR overrides target/python.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: a new release of any of them must not change what the suite runs. protobuf is the
# runtime of the generated classes (grpcio-tools needs it too); its pin matches the compiler's.
pins=(paho-mqtt==2.2.0 grpcio-tools==1.85.1 protobuf==7.36.2 cryptography==50.0.2)

dir="${FLEET_PYTHON_DIR:-target/python}"
mkdir -p "$dir"
# Two runs at once (two test processes) take turns.
exec 9>"$dir/.lock"
flock 9

install_python() {
    echo "Installing python3 and python3-venv" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv
}
command -v python3 >/dev/null 2>&1 || install_python

venv="$dir/venv"
want="$(printf '%s\n' "$(python3 --version 2>&1)" "${pins[@]}")"
if [ "$(cat "$venv/.fleet-pins" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    # Debian's python3 makes a venv only with python3-venv (ensurepip) installed.
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        install_python
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --disable-pip-version-check -q "${pins[@]}"
    printf '%s\n' "$want" >"$venv/.fleet-pins"
fi

# The classes: regenerated into a fresh directory, then swapped in, when the stamp (the
# compiler's version and every .proto file's digest) differs.
protos=(proto/proto/fleet/v1/*.proto)
stamp="$("$venv/bin/python" -m grpc_tools.protoc --version)
$(sha256sum "${protos[@]}")"
gen="$dir/gen"
if [ "$(cat "$gen/.fleet-stamp" 2>/dev/null)" != "$stamp" ]; then
    tmp="$dir/gen.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    "$venv/bin/python" -m grpc_tools.protoc -I proto/proto --python_out="$tmp" --pyi_out="$tmp" \
        "${protos[@]#proto/proto/}"
    printf '%s\n' "$stamp" >"$tmp/.fleet-stamp"
    rm -rf "$gen"
    mv "$tmp" "$gen"
fi
