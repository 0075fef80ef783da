#!/usr/bin/env bash
# Runs a command with a deadline: `scripts/deadline.sh SECONDS WHAT COMMAND...`.
# The command runs in its own process group, so that when the deadline passes everything it
# started (test binaries, gateways, devices, mosquitto) is stopped with it: TERM, then KILL
# after 10 s. A missed deadline fails with exit 124 and a message that names what hung and
# which of its processes were still running, instead of running on until an outer limit
# kills it without a word.
set -uo pipefail
if (($# < 3)); then
    echo "usage: $0 SECONDS WHAT COMMAND..." >&2
    exit 64
fi
limit=$1 what=$2
shift 2

setsid "$@" &
pid=$!
# setsid makes the child the leader of a new group whose id is its pid.
deadline=$((SECONDS + limit))
while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
        echo >&2
        echo "DEADLINE: $what did not finish within ${limit} s; stopping it." >&2
        echo "Processes still running in it:" >&2
        ps -o pid,etimes,args -g "$pid" >&2 || true
        kill -TERM -- "-$pid" 2>/dev/null
        for _ in $(seq 10); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        kill -KILL -- "-$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        echo "DEADLINE: $what hung (over ${limit} s): failing." >&2
        exit 124
    fi
    sleep 1
done
wait "$pid"
