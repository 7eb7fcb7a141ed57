#!/usr/bin/env bash
# Kafka path vs the broker's own limit (issue 7, part 2): messages per second through
# `slipstream run` from a local tansu broker, against a bare rdkafka consumer with the same
# client settings (bench/kafka_read.rs) reading the same topics, alternated in one run.
# SCALE=full: 100,000 clients (about 2.3M events); quick: 10,000. RUNS (default 3) rounds of the three consumers.
source "$(dirname "$0")/../lib.sh"

clients=$([ "$SCALE" = full ] && echo 100000 || echo 10000)
runs="${RUNS:-3}"
config=deploy/examples/experiment.toml
work="$BENCH_DATA/kafka"
port="$(free_port)"
cleanup() {
    [ -f "$work/tansu/tansu.pid" ] && deploy/local/stop-tansu.sh "$port" "$work/tansu" || true
    rm -rf "$work"
}
trap cleanup EXIT
rm -rf "$work"
mkdir -p "$work"

build_release
build_bench kafka_read
log "generating $clients clients"
locked "$BIN" generate --config "$config" --clients "$clients" --seed 1 --out "$work/events.ndjson" >&2
events_mb=$(du -m "$work/events.ndjson" | cut -f1)
PARTITIONS=4 WATCH_PID=$$ deploy/local/start-tansu.sh "$port" "$work/tansu" >/dev/null
brokers="127.0.0.1:$port"
log "producing to $brokers"
produced=$(locked "$BIN" produce --brokers "$brokers" --input "$work/events.ndjson" --config "$config")
log "$produced"
messages=$(sed -n 's/^produced \([0-9]*\) messages.*/\1/p' <<<"$produced")
rm -f "$work/events.ndjson"

# The "fold only" variant: the same experiment with only the overall window of the
# enrollments basis, which is published after the stream ends (so outside the rate).
sed -e 's/^periods = .*/periods = ["overall"]/' -e 's/^analysis_bases = .*/analysis_bases = ["enrollments"]/' \
    "$config" >"$work/fold-only.toml"
grep -q '^periods = \["overall"\]' "$work/fold-only.toml" || die "could not derive the fold-only config from $config"

bare() {
    locked cargo bench --locked --quiet --bench kafka_read -- --brokers "$brokers" >"$work/bare-$1.txt"
    log "bare $1: $(cat "$work/bare-$1.txt")"
}
service() { # service NAME RUN CONFIG
    # A fresh group and data directory per run, so every run reads all topics from offset 0.
    { cat "$3"; printf '\n[pipeline.kafka]\ngroup_id = "bench-%s-%s-%s"\n' "$1" "$2" "$$"; } >"$work/$1-$2.toml"
    locked "$BIN" run --config "$work/$1-$2.toml" --brokers "$brokers" --data-dir "$work/state-$1-$2" \
        --out "$work/out-$1-$2" --idle-exit-secs 2 >"$work/$1-$2.txt" 2>"$work/$1-$2.log"
    log "$1 $2: $(grep -E '^(consumed |rate:|time:)' "$work/$1-$2.txt" | tr '\n' ' ')"
    rm -rf "$work/state-$1-$2" "$work/out-$1-$2"
}
for i in $(seq 1 "$runs"); do
    # Rotate which goes first, so none always gets the warmest broker.
    case $((i % 3)) in
        1) bare "$i"; service run "$i" "$config"; service fold "$i" "$work/fold-only.toml" ;;
        2) service run "$i" "$config"; service fold "$i" "$work/fold-only.toml"; bare "$i" ;;
        0) service fold "$i" "$work/fold-only.toml"; bare "$i"; service run "$i" "$config" ;;
    esac
done

# One line per run: bare msgs/s, MB/s; run: first-to-last s, final s, msgs/s to durable,
# state/materialize/sink s; fold only: msgs/s first to last, final s; ratios.
rate_line() { sed -n 's/^rate: \([0-9.]*\)s from the first to the last message (\([0-9]*\) messages\/s), then \([0-9.]*\)s.*/\1 \2 \3/p' "$1"; }
for i in $(seq 1 "$runs"); do
    b=$(sed -n 's/.*: \([0-9]*\) messages\/s, \([0-9.]*\) MB\/s.*/\1 \2/p' "$work/bare-$i.txt")
    read -r bare_rate bare_mbs <<<"$b"
    read -r run_secs _ run_final <<<"$(rate_line "$work/run-$i.txt")"
    n=$(sed -n 's/^consumed \([0-9]*\) messages.*/\1/p' "$work/run-$i.txt")
    tline=$(grep '^time: ' "$work/run-$i.txt")
    t_flush=$(sed -E 's/^time: ([0-9.]+)s writing.*/\1/' <<<"$tline")
    t_merge=$(sed -E 's/.*, ([0-9.]+)s merging the delta log.*/\1/' <<<"$tline")
    t_mat=$(sed -E 's/.*, ([0-9.]+)s materializing.*/\1/' <<<"$tline")
    t_sink=$(sed -E 's/.*, ([0-9.]+)s in the sink.*/\1/' <<<"$tline")
    read -r fold_secs fold_rate fold_final <<<"$(rate_line "$work/fold-$i.txt")"
    awk -v b="$bare_rate" -v mb="$bare_mbs" -v n="$n" -v rs="$run_secs" -v rf="$run_final" \
        -v tf="$t_flush" -v tm="$t_mat" -v ts="$t_sink" -v fs="$fold_secs" -v fr="$fold_rate" -v ff="$fold_final" \
        -v tg="$t_merge" \
        'BEGIN { d = n / (rs + rf); printf "%s %s %.2f %.2f %.0f %s %s %s %.2f %s %.2f %.4f %.4f %s\n", b, mb, rs, rf, d, tf, tm, ts, fs, fr, ff, d / b, fr / b, tg }' \
        >>"$work/table"
done
col() { awk -v c="$1" '{ print $c }' "$work/table" | median; }
pct() { awk -v r="$1" 'BEGIN { printf "%.0f%%", 100 * r }'; }

cat <<MD
## Kafka path vs a bare consumer (issue 7, part 2)

\`SCALE=$SCALE bench/parts/kafka.sh\`: \`slipstream generate --config $config --clients $clients --seed 1\`
($events_mb MB of NDJSON), produced once with \`slipstream produce\` into a local tansu broker
(\`deploy/local/start-tansu.sh\`, memory engine, 4 partitions per topic): $(fmt "$messages") messages.
Then $runs rounds of three consumers, rotating which goes first, each with a fresh consumer group
reading everything from offset 0:

- **bare**: \`cargo bench --bench kafka_read -- --brokers B\`, an rdkafka \`BaseConsumer\` built with
  the service's own client settings (\`ingest::kafka::consumer_config\`) that only counts messages
  until every partition reaches its high watermark; rate = messages / (last message - first message).
- **run**: \`slipstream run --config $config --brokers B --data-dir NEW --out NEW --idle-exit-secs 2\`
  (local sink; every day, week and overall window of both bases published with its 1,000-replicate
  statistics as the watermark passes it; materializing and publishing still run on the consume
  loop, while state batches are written by a writer thread and merged by the compactor). Rate = messages / (first
  message to last message + the final flush and publication after it): the time until everything
  read is durable and published. The idle wait (2 s) and the group join are excluded; \`run\` prints
  both times (\`rate:\` line of its summary).
- **fold only**: the same \`run\` with the experiment reduced to its overall window of the
  enrollments basis (\`periods = ["overall"]\`, \`analysis_bases = ["enrollments"]\`), which is
  published after the stream ends: rate = messages / (last message - first message), i.e.
  receive, decode, fold, sketches and the atomic state batches with their offsets (the
  delta-log segment of each batch durable; the compactor merges them beside the fold).

| round | bare msgs/s (MB/s) | run: first to last msg + final publish | run msgs/s | run / bare | fold only: first to last msg | fold-only msgs/s | fold only / bare |
|---|---|---|---|---|---|---|---|
MD
i=0
while read -r b mb rs rf d _ _ _ fs fr _ r1 r2 _; do
    i=$((i + 1))
    echo "| $i | $(fmt "$b") ($mb) | $rs s + $rf s | $(fmt "$d") | $(pct "$r1") | $fs s | $(fmt "$fr") | $(pct "$r2") |"
done <"$work/table"
echo "| **median** | **$(fmt "$(col 1)")** ($(col 2)) | $(col 3) s + $(col 4) s | **$(fmt "$(col 5)")** | **$(pct "$(col 12)")** | $(col 9) s | **$(fmt "$(col 10)")** | **$(pct "$(col 13)")** |"
verdict() { awk -v r="$1" 'BEGIN { if (r >= 0.8) print "meets the goal"; else printf "misses the 80%% goal by %.0f points", 100 * (0.8 - r) }'; }
cat <<MD

Where \`run\`'s time went on the consume loop (medians of its summary's \`time:\` line): $(col 6) s
waiting for state batches (handing each to the writer thread, waiting for the one before), $(col 14) s
merging the delta log before materializing, $(col 7) s materializing tables (reading state, aggregates
and statistics), $(col 8) s in the sink; the rest is receiving, decoding and folding. Reading: with
the same client settings a bare consumer reads $(fmt "$(col 1)") messages/s from this broker.
\`slipstream run\` with every window published reaches $(pct "$(col 12)") of that and
$(verdict "$(col 12)"); folding alone reaches $(pct "$(col 13)") and $(verdict "$(col 13)").

Why, from profiles taken by hand on 2026-11-23 (\`perf record --call-graph dwarf\`, \`perf sched
timehist\`, fold-only, 100,000 clients): with every window published, the bootstrap statistics of
each window dominate ($(col 7) s of the run's $(col 3) s materializing, plus $(col 14) s merging the
delta log before each pass), and publication still runs on the consume loop. Folding only, the machine is CPU-bound: per
message, the consume thread spends about 2.8 µs of CPU (JSON decoding 0.9 µs; the fold 1.3 µs,
most of it the 12 activity-sketch updates per event), the state writer 1.4 µs (segment
encoding, sketch merges, fsync), the compactor 2.2 µs (sled reads and writes of per-client
records), librdkafka 0.8 µs, the broker 1.1 µs and sled's I/O threads 0.6 µs: about 9 µs of
CPU a message on 2 cores, a ceiling near 220,000 messages/s. At 80% of the bare consumer
(about 740,000 messages/s) the consume thread alone would need two cores.
MD
