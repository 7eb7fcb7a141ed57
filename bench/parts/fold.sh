#!/usr/bin/env bash
# Fold rate (issue 7, item 1): events per second that `slipstream replay` folds into
# durable state for a 4-week experiment (bench/experiment-4w.toml), peak resident memory,
# and bytes of sled state per enrolled client-window. Prints a Markdown section for
# bench/RESULTS.md on stdout; progress on stderr.
#
#   SCALE=quick bench/parts/fold.sh    # 2,000 and 5,000 clients, one run each (~1 min)
#   SCALE=full  bench/parts/fold.sh    # 100,000 clients x 3 runs, LARGE_CLIENTS x 1 run
#
# LARGE_CLIENTS (default 250000; 0 skips it): the issue asks for 1,000,000, which needs
# ~7.5 GB of events, ~8.5 GB of state and ~25 GB of published NDJSON (pruned while
# running, see start_pruner) and ~20 min per replay on a 2-core machine: set it when the
# disk and the time allow. FOLD_RUNS overrides the number of runs at 100,000 clients.
PART=fold
source "$(dirname "$0")/../lib/common.sh"

CONFIG=bench/experiment-4w.toml
if [ "$SCALE" = quick ]; then
    SIZES=(2000 5000)
    RUNS=(1 1)
else
    SIZES=(100000)
    RUNS=("${FOLD_RUNS:-3}")
    if [ "${LARGE_CLIENTS:-250000}" != 0 ]; then
        SIZES+=("${LARGE_CLIENTS:-250000}")
        RUNS+=(1)
    fi
fi

build_release
"$BIN" check-config "$CONFIG" >&2
WINDOWS=$("$BIN" check-config "$CONFIG" | sed -nE 's/.*, ([0-9]+) windows$/\1/p')
MACHINE=$(machine)
DATE=$(date -u +%F)

rows=()
for i in "${!SIZES[@]}"; do
    n=${SIZES[$i]}
    events="$BENCH_DATA/events-4w-$n.ndjson"
    gen_events "$CONFIG" "$n" "$events"
    secs=() e2e=() fold=() flush=() mat=() sink=() rss=() state=() perclient=() enrolled=0 lines=0
    for run in $(seq "${RUNS[$i]}"); do
        dir="$BENCH_DATA/fold-state" out="$BENCH_DATA/fold-out"
        log "replay of $n clients, run $run of ${RUNS[$i]}"
        # Keep one aggregate table: its rows are the enrolled clients (the enrollment table,
        # published when enrollment closes, misses enrollments that arrive late).
        keep='^bench_4w_enrollments_overall_1\.ndjson$'
        pruner=$(start_pruner "$out" "$keep")
        replay_measured "$CONFIG" "$events" "$dir" "$out"
        stop_pruner "$pruner" "$out" "$keep"
        lines=$R_LINES
        enrolled=$(wc -l <"$out/bench_4w_enrollments_overall_1.ndjson")
        bytes=$(du -sb "$dir" | cut -f1)
        fold_secs=$(calc "$R_SECS - $R_MATERIALIZE - $R_SINK")
        secs+=("$R_SECS")
        e2e+=("$(calc "$R_LINES / $R_SECS")")
        fold+=("$(calc "$R_LINES / $fold_secs")")
        flush+=("$R_FLUSH") mat+=("$R_MATERIALIZE") sink+=("$R_SINK")
        rss+=("$R_RSS_KB") state+=("$bytes")
        perclient+=("$(calc "$bytes / ($enrolled * $WINDOWS)")")
        log "$n clients: $(fmt_int "${e2e[-1]}") events/s end to end, $(fmt_int "${fold[-1]}") events/s into state, peak RSS $((R_RSS_KB / 1024)) MiB, state $(mb "$bytes")"
        rm -rf "$dir" "$out"
    done
    runs=${RUNS[$i]}
    e2e_cell="**$(fmt_int "$(median "${e2e[@]}")")**"
    fold_cell="**$(fmt_int "$(median "${fold[@]}")")**"
    if [ "$runs" -gt 1 ]; then
        e2e_cell="$e2e_cell ($(range "${e2e[@]}" | sed -E 's/([0-9]+)\.[0-9]*/\1/g'))"
        fold_cell="$fold_cell ($(range "${fold[@]}" | sed -E 's/([0-9]+)\.[0-9]*/\1/g'))"
    fi
    rows+=("| $(fmt_int "$n") ($(fmt_int "$enrolled") enrolled) | $(fmt_int "$lines") | $runs | $(fmt1 "$(median "${secs[@]}")") s | $e2e_cell | $fold_cell | $(fmt1 "$(median "${flush[@]}")") s | $(fmt1 "$(median "${mat[@]}")") s | $(fmt1 "$(median "${sink[@]}")") s | $(awk "BEGIN { printf \"%.2f GB\", $(median "${rss[@]}") * 1024 / 1e9 }") | $(mb "$(median "${state[@]}")") | $(fmt_int "$(median "${perclient[@]}")") |")
    if [ "$events" != "" ] && [ "${KEEP_EVENTS:-0}" = 0 ] && [ "$n" -gt 100000 ]; then
        rm -f "$events" "$events.done"
    fi
done

cat <<EOF
## Fold rate (issue 7)

\`SCALE=$SCALE bench/parts/fold.sh\`, $DATE. Machine: $MACHINE. Each run, into a fresh data
directory:

\`\`\`
slipstream generate --config bench/experiment-4w.toml --clients N --seed 1 --out events.ndjson
/usr/bin/time -v slipstream replay --config bench/experiment-4w.toml --input events.ndjson --data-dir DIR --out OUT
\`\`\`

The experiment: 2 branches, enrollment over 7 days, 28 days of analysis ($WINDOWS windows: 28 days,
4 weeks, overall, for both the enrollments and exposures bases), 7 metrics, 2 segments,
1,000 bootstrap replicates. Medians over the runs (range in brackets); times are the
replay's own breakdown.

| clients | events | runs | replay wall | end to end, events/s | into durable state, events/s | state batches | materializing | sink | peak RSS | state dir | bytes per enrolled client-window |
|---|---|---|---|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")

*End to end* is events (input lines, rejects included) over the replay's wall time: reading,
decoding, folding, writing atomic sled batches, and materializing and publishing every
window as it completes (aggregate rows, statistics, re-publications after late data, daily
sketch tables) to the local NDJSON sink. *Into durable state* leaves out materializing and
the sink: reading, decoding, folding, the sled batches (with their offsets) and merging the
delta log into per-client records, which is what a Kafka consumer must sustain. *State
batches* is the time the replay waited for its writer thread. The state directory (sled, after the run) holds the
per-client daily records, enrollment records, sketches and publication records; bytes per
enrolled client-window is its size over (enrolled clients x $WINDOWS windows). The
published aggregate tables are deleted as soon as the sink has renamed them into place,
so that large runs fit on the disk (their writing, fsync included, is measured).
EOF
