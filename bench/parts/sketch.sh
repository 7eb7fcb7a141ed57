#!/usr/bin/env bash
# Activity sketches in memory (issue 4): build cost, storage per day and query latencies of
# the sketch layer without HTTP or sled (bench/sketch.rs). SCALE=full: 1,000,000 active
# clients a day; quick: 100,000 (both 20,000 combinations, 28 days). One run (each query is
# timed 10-1,000 times).
source "$(dirname "$0")/../lib.sh"

clients=$([ "$SCALE" = full ] && echo 1000000 || echo 100000)
out="$(mktemp)"
trap 'rm -f "$out"' EXIT

build_bench sketch
log "running with $clients active clients a day"
SKETCH_BENCH_CLIENTS=$clients locked cargo bench --locked --quiet --bench sketch >"$out"
cat "$out" >&2

cat <<MD
## Activity sketches in memory (issue 4)

\`SKETCH_BENCH_CLIENTS=$clients cargo bench --bench sketch\` (\`SCALE=$SCALE bench/parts/sketch.sh\`):
the population of \`bench/activity.rs\` ($(fmt "$clients") active clients a day out of a pool of twice
that, 20,000 dimension combinations a day, 28 days, precision 12), built through the write buffer
into the in-memory store (no sled, no HTTP: \`bench/parts/http.sh\` measures those), then each
query timed 10-1,000 times. Goals: unfiltered DAU p99 under 5 ms, filtered MAU p99 under 50 ms.

| query | p50 | p99 | note |
|---|---|---|---|
MD
sed -n 's/^\(.*[^ ]\) \{1,\}p50 \{1,\}\([0-9.]*\) ms \{1,\}p99 \{1,\}\([0-9.]*\) ms *\(.*\)$/| \1 | \2 ms | \3 ms | \4 |/p' "$out"
echo
echo "Build and storage, as printed:"
echo
echo '```'
grep -v 'p50' "$out"
echo '```'
