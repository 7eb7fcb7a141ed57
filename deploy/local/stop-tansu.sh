#!/usr/bin/env bash
# Stops a broker started by start-tansu.sh PORT [DIR] (SIGTERM, then SIGKILL after 5 s).
# Usage: stop-tansu.sh PORT [DIR]   (same arguments as start-tansu.sh)
set -euo pipefail

die() { echo "stop-tansu: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: stop-tansu.sh PORT [DIR]"
port="$1"
cache="${SLIPSTREAM_CACHE:-$HOME/.cache/slipstream}"
dir="${2:-$cache/tansu-$port}"
pidfile="$dir/tansu.pid"

[ -f "$pidfile" ] || die "no pid file at $pidfile (was the broker started with the same PORT and DIR?)"
pid="$(cat "$pidfile")"
if ! kill -0 "$pid" 2>/dev/null; then
    echo "stop-tansu: broker pid $pid is not running" >&2
    rm -f "$pidfile"
    exit 0
fi
# Only kill it if it is really tansu (a stale pid file must not kill an unrelated process).
grep -q tansu "/proc/$pid/cmdline" 2>/dev/null || die "pid $pid from $pidfile is not a tansu process; not killing it"
kill "$pid"
for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "stop-tansu: stopped $pid" >&2; exit 0; }
    sleep 0.1
done
kill -9 "$pid" 2>/dev/null || true
rm -f "$pidfile"
echo "stop-tansu: killed $pid with SIGKILL after 5 s" >&2
