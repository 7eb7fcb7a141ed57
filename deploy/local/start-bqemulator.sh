#!/usr/bin/env bash
# Starts the BigQuery emulator (bqemulator 1.4.0, in-memory unless BQEMULATOR_PERSISTENT=1) on
# loopback, waits until its REST API answers, and prints its pid on the last line of stdout.
#
# Usage: start-bqemulator.sh REST_PORT GRPC_PORT PROJECT [DIR]
#   DIR   where its log (bqemulator.log) and pid file (bqemulator.pid) go;
#         default: $SLIPSTREAM_CACHE/bqemulator-REST_PORT. Stop it with `kill PID`.
#
# Environment:
#   BQEMULATOR_START_TIMEOUT  seconds to wait for REST (default 60)
#   WATCH_PID                 if set, a watchdog kills the emulator once this process has exited
#   BQEMULATOR_PERSISTENT     1: keep tables in DIR/data (a DuckDB file) instead of memory, so a
#                             restart on the same DIR (even after kill -9) finds what was committed
#   SLIPSTREAM_CACHE          cache root used by install-bqemulator.sh
#
# Caveats (DESIGN.md section 11): memory grows ~100-160 MiB per 100k rows and is never freed,
# so start a fresh emulator per test binary; at most 6 concurrent AppendRows connections.
set -euo pipefail

die() { echo "start-bqemulator: $*" >&2; exit 1; }

[ $# -ge 3 ] && [ $# -le 4 ] || die "usage: start-bqemulator.sh REST_PORT GRPC_PORT PROJECT [DIR]"
rest_port="$1"
grpc_port="$2"
project="$3"
for p in "$rest_port" "$grpc_port"; do
    [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] || die "ports must be 1..65535, got '$p'"
done
[ "$rest_port" != "$grpc_port" ] || die "REST_PORT and GRPC_PORT must differ"
[[ "$project" =~ ^[a-z][a-z0-9-]*$ ]] || die "PROJECT must be a lower-case project id (letters, digits, '-'), got '$project'"
cache="${SLIPSTREAM_CACHE:-$HOME/.cache/slipstream}"
dir="${4:-$cache/bqemulator-$rest_port}"
timeout_s="${BQEMULATOR_START_TIMEOUT:-60}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$rest_port" "$grpc_port"; do
    port_open "$p" && die "127.0.0.1:$p already accepts connections; pick another port"
done
command -v curl >/dev/null 2>&1 || die "curl is required to check that the emulator answers"

bqemulator="$("$here/install-bqemulator.sh" | tail -n 1)"
[ -x "$bqemulator" ] || die "install-bqemulator.sh did not print an executable path (got '$bqemulator')"

mkdir -p "$dir" || die "cannot create $dir"
dir="$(cd "$dir" && pwd)"
log="$dir/bqemulator.log"

storage=(--ephemeral)
if [ "${BQEMULATOR_PERSISTENT:-0}" = 1 ]; then
    mkdir -p "$dir/data" || die "cannot create $dir/data"
    storage=(--persistent --data-dir "$dir/data")
fi

(cd "$dir" && exec setsid "$bqemulator" start \
    --rest-host 127.0.0.1 --rest-port "$rest_port" \
    --grpc-host 127.0.0.1 --grpc-port "$grpc_port" \
    --project "$project" "${storage[@]}" \
    </dev/null >"$log" 2>&1) &
pid=$!
echo "$pid" >"$dir/bqemulator.pid"

# "Answers" means a real API call succeeds, not just an open port.
url="http://127.0.0.1:$rest_port/bigquery/v2/projects/$project/datasets"
deadline=$((SECONDS + timeout_s))
until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "--- last lines of $log ---" >&2; tail -n 20 "$log" >&2 || true
        die "bqemulator exited before answering on 127.0.0.1:$rest_port"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        kill "$pid" 2>/dev/null || true
        die "bqemulator did not answer GET $url within ${timeout_s}s (log: $log)"
    fi
    sleep 0.2
done
until port_open "$grpc_port"; do
    if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        die "bqemulator's gRPC port 127.0.0.1:$grpc_port did not open within ${timeout_s}s (log: $log)"
    fi
    sleep 0.2
done

if [ -n "${WATCH_PID:-}" ]; then
    setsid bash -c 'while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 1; done; kill "$2" 2>/dev/null || true' \
        _ "$WATCH_PID" "$pid" </dev/null >/dev/null 2>&1 &
fi

echo "start-bqemulator: pid $pid, REST http://127.0.0.1:$rest_port, gRPC 127.0.0.1:$grpc_port, project $project, log $log" >&2
echo "$pid"
