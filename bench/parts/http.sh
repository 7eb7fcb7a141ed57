#!/usr/bin/env bash
# HLL queries over HTTP under load (issue 7, part 5): sketch state at issue 4's scale built
# into sled (bench/http_load.rs build), served by `slipstream serve` on loopback, queried by
# a closed-loop load generator at 1 and 16 connections (bench/http_load.rs load).
# SCALE=full: 1,000,000 active clients a day; quick: 100,000 (both 20,000 combinations, 28 days).
source "$(dirname "$0")/../lib.sh"

per_day=$([ "$SCALE" = full ] && echo 1000000 || echo 100000)
secs=$([ "$SCALE" = full ] && echo 5 || echo 2)
runs="${RUNS:-3}"
config=deploy/examples/experiment.toml
work="$BENCH_DATA/http"
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
rm -rf "$work"
mkdir -p "$work"

build_release
build_bench http_load
log "building sketch state: $per_day active clients a day"
HTTP_BENCH_CLIENTS=$per_day locked cargo bench --locked --quiet --bench http_load -- \
    build --config "$config" --data-dir "$work/state" >"$work/build.txt"
log "$(cat "$work/build.txt")"
last=$(sed -n 's/.*last date \([0-9-]*\)$/\1/p' "$work/build.txt")

port="$(free_port)"
env -u SLIPSTREAM_TOKEN "$BIN" serve --config "$config" --data-dir "$work/state" \
    --listen "127.0.0.1:$port" 2>"$work/serve.log" &
server=$!
until curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; do
    kill -0 "$server" 2>/dev/null || die "serve exited: $(cat "$work/serve.log")"
    sleep 0.2
done
log "serving on 127.0.0.1:$port; load for ${secs}s a cell, $runs runs"
locked cargo bench --locked --quiet --bench http_load -- load --url "http://127.0.0.1:$port" \
    --last-date "$last" --secs "$secs" --requests 20000 --runs "$runs" --concurrency 1,16 \
    >"$work/table.md" 2>"$work/load.log"
cat "$work/load.log" >&2
rss=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$server/status")

cell() { # cell ROW-PREFIX FIELD: a column of the table's row
    awk -F'|' -v row="$1" -v f="$2" '$2 == " " row " " { gsub(/^ +| +$/, "", $f); print $f }' "$work/table.md"
}
p99() { cell "$1" "$2" | sed 's/.*\/ \([0-9.]*\) ms/\1/'; }

cat <<MD
## HLL queries over HTTP under load (issue 7, part 5)

\`SCALE=$SCALE bench/parts/http.sh\`. State: \`cargo bench --bench http_load -- build --config $config
--data-dir DIR\` with \`HTTP_BENCH_CLIENTS=$per_day\`: the population of \`bench/activity.rs\` (the
same as \`bench/sketch.rs\`: $per_day active clients a day out of a pool of twice that, 20,000
dimension combinations a day, 28 days, 2% upgrades) written through the fold's sketch buffer
into sled, one batch a day. Built: $(sed 's/^built //' "$work/build.txt").
Served by \`slipstream serve --config $config --data-dir DIR --listen 127.0.0.1:PORT\` (peak
RSS ${rss} MB). Load: \`cargo bench --bench http_load -- load --url URL --last-date $last --secs $secs
--runs $runs --concurrency 1,16\`: for each query and concurrency, N keep-alive connections in a
closed loop (the next request leaves when the answer is read) for ${secs} s or 20,000 requests,
after a warm-up; the load generator runs on one thread, so the server keeps the other core.
DAU queries rotate over the 28 dates, filters over 50 countries and 5 os values; MAU queries are
the 28 days ending on the last date. Medians of $runs runs of each cell, run in turn.

$(cat "$work/table.md")

Reading: issue 4's goals are an unfiltered DAU under 5 ms at p99 and a filtered MAU under 50 ms
at p99. Over HTTP, with sled underneath, the unfiltered DAU answers at p99 in
$(p99 "DAU, unfiltered" 3) ms alone and $(p99 "DAU, unfiltered" 5) ms with 16 connections on
2 cores; the one-filter MAU in $(p99 "MAU, country=X" 3) ms and $(p99 "MAU, country=X" 5) ms.
At 16 connections the latency is mostly queueing for the two cores (the load generator takes
one): requests per second is the figure that grows or not with concurrency.
MD
