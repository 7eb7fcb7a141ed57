#!/usr/bin/env bash
# Streaming vs batch recompute (issue 7, item 3): time to have every window's results of an
# experiment by (a) slipstream folding the events once (`replay`, end to end, publishing
# every window's aggregates and statistics to the local sink) and (b) the batch approach a
# team would otherwise run: Jetstream's nightly recompute of each completed window from the
# raw events, with DuckDB SQL and numpy (bench/batch/recompute.py), computing the same
# statistics. Run side by side for a 2-week and a 4-week version of the same experiment
# (same clients a day), and (b) checked against (a)'s tables. Prints a Markdown section for
# bench/RESULTS.md on stdout; progress on stderr.
#
#   SCALE=quick bench/parts/batch.sh   # 3,000 clients, 2 and 4 weeks, one run each
#   SCALE=full  bench/parts/batch.sh   # 100,000 clients x 3 runs each; LARGE_CLIENTS x 1 (4 weeks)
#
# LARGE_CLIENTS (default 250000; 0 skips it): see bench/parts/fold.sh for why not 1,000,000
# by default. BATCH_RUNS overrides the number of runs at 100,000 clients.
PART=batch
source "$(dirname "$0")/../lib/common.sh"

if [ "$SCALE" = quick ]; then
    PLAN=("3000 2 1" "3000 4 1")
else
    r=${BATCH_RUNS:-3}
    PLAN=("100000 2 $r" "100000 4 $r")
    if [ "${LARGE_CLIENTS:-250000}" != 0 ]; then
        PLAN+=("${LARGE_CLIENTS:-250000} 4 1")
    fi
fi

build_release
ensure_python
MACHINE=$(machine)
DATE=$(date -u +%F)
DUCKDB_VERSION=$("$PY" -c 'import duckdb; print(duckdb.__version__)')

# json_get FILE KEY.PATH: one value of the JSON object in FILE.
json_get() { "$PY" -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v if not isinstance(v, (dict, list)) else json.dumps(v))' "$1" "$2"; }

rows=() checks=() growth=()
declare -A RATIO
for plan in "${PLAN[@]}"; do
    read -r n weeks runs <<<"$plan"
    config=$(config_weeks "$weeks")
    slug="bench_${weeks}w"
    events="$BENCH_DATA/events-${weeks}w-$n.ndjson"
    gen_events "$config" "$n" "$events"
    last_day=$(date -u -d "2026-11-07 + $((weeks * 7 + 30)) days" +%F)
    check_windows="day:1,week:1,week:$weeks,overall:1"
    keep="^${slug}_(enrollments|exposures)_(day_1|week_1|week_${weeks}|overall_1)\.ndjson$"
    a=() b=() ratio=() a_fold=() a_mat=() a_sink=() a_rss=() b_load=() b_agg=() b_stats=() b_write=() b_rss=()
    for run in $(seq "$runs"); do
        dir="$BENCH_DATA/batch-state" out="$BENCH_DATA/batch-out" db="$BENCH_DATA/batch.duckdb"
        log "$n clients, $weeks weeks, run $run of $runs: (a) slipstream replay"
        pruner=$(start_pruner "$out" "$keep")
        replay_measured "$config" "$events" "$dir" "$out"
        stop_pruner "$pruner" "$out" "$keep"
        lines=$R_LINES rejected=$R_REJECTED tables=$R_TABLES
        a+=("$R_WALL") a_mat+=("$R_MATERIALIZE") a_sink+=("$R_SINK") a_rss+=("$R_RSS_KB")
        a_fold+=("$(calc "$R_SECS - $R_MATERIALIZE - $R_SINK")")
        check_args=()
        if [ "$run" = 1 ]; then
            # Untimed: publish the late changes that stayed below republish_threshold, so
            # that (a)'s tables hold every event, as (b)'s do.
            log "finalize (untimed) so that every window includes its late events"
            locked "$BIN" finalize --config "$config" --data-dir "$dir" --out "$out" --date "$last_day" >&2
            prune_once "$out" "$keep"
            check_args=(--check "$out" --check-windows "$check_windows")
        fi
        log "$n clients, $weeks weeks, run $run of $runs: (b) batch recompute with DuckDB"
        rm -rf "$db" "$db.wal" "$BENCH_DATA/duckdb-tmp"
        result="$BENCH_DATA/batch-result.json"
        locked /usr/bin/time -v -o "$BENCH_DATA/batch-time.txt" "$PY" bench/batch/recompute.py \
            --config "$config" --events "$events" --db "$db" --temp "$BENCH_DATA/duckdb-tmp" \
            "${check_args[@]}" >"$result"
        wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$BENCH_DATA/batch-time.txt" |
            awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }')
        check_secs=$(json_get "$result" seconds.check)
        b+=("$(calc "$wall - $check_secs")")
        b_load+=("$(json_get "$result" seconds.load)") b_agg+=("$(json_get "$result" seconds.aggregates)")
        b_stats+=("$(json_get "$result" seconds.statistics)") b_write+=("$(json_get "$result" seconds.write)")
        b_rss+=("$(awk -F': ' '/Maximum resident set size/ {print $2}' "$BENCH_DATA/batch-time.txt")")
        ratio+=("$(calc "${b[-1]} / ${a[-1]}")")
        log "(a) $(fmt1 "${a[-1]}") s, (b) $(fmt1 "${b[-1]}") s: (b)/(a) = $(fmt2 "${ratio[-1]}")"
        b_rejected=$(json_get "$result" rejected)
        if [ "$b_rejected" != "$rejected" ]; then
            log "the batch side rejected $b_rejected lines, slipstream $rejected"
            exit 1
        fi
        if [ "$run" = 1 ]; then
            checks+=("- $(fmt_int "$n") clients, $weeks weeks: windows $(json_get "$result" check.windows | tr -d '[]" ' | sed 's/,/, /g') of both bases: $(fmt_int "$(json_get "$result" check.aggregate_rows_compared)") per-client aggregate rows identical (same clients, every metric within 1e-9, same flags, dates and segments); $(fmt_int "$(json_get "$result" check.statistics_rows_compared)") statistics rows, the same set, identity counts, counts, sums, binomial points and decile points equal; bootstrap mean points within $(fmt2 "$(json_get "$result" check.worst_point_over_width.mean)") and binomial comparison points within $(fmt2 "$(json_get "$result" check.worst_point_over_width.binomial)") of the interval width and decile comparison points within $(fmt2 "$(json_get "$result" check.worst_point_over_width.deciles)") of the interval width or of 1 when wider (integer metrics: their replicate deciles take a few integer values and the interval is often a single one) (different random draws on the two sides), mean interval widths within $(awk "BEGIN { printf \"%.0f%%\", 100 * $(json_get "$result" check.worst_mean_width_ratio_minus_1) }") of slipstream's (Monte Carlo noise of 1,000 replicates). Rejected lines: $(fmt_int "$b_rejected") on both sides ($(json_get "$result" rejects | tr -d '{}"' | sed 's/: / /g'))."
            )
        fi
        rm -rf "$dir" "$out" "$db" "$db.wal" "$BENCH_DATA/duckdb-tmp"
    done
    RATIO[$n-$weeks]=$(median "${ratio[@]}")
    A=$(median "${a[@]}") B=$(median "${b[@]}")
    declare -g "A_${n}_${weeks}=$A" "B_${n}_${weeks}=$B"
    rows+=("| $weeks weeks, $(fmt_int "$n") clients | $(fmt_int "$lines") | $runs | **$(fmt1 "$A") s** ($(fmt1 "$(median "${a_fold[@]}")") / $(fmt1 "$(median "${a_mat[@]}")") / $(fmt1 "$(median "${a_sink[@]}")")) | **$(fmt1 "$B") s** ($(fmt1 "$(median "${b_load[@]}")") / $(fmt1 "$(median "${b_agg[@]}")") / $(fmt1 "$(median "${b_stats[@]}")") / $(fmt1 "$(median "${b_write[@]}")")) | **$(fmt2 "${RATIO[$n-$weeks]}")**$([ "$runs" -gt 1 ] && echo " ($(range "${ratio[@]}" | awk -F- '{ printf "%.2f-%.2f", $1, $2 }'))") | $(awk "BEGIN { printf \"%.2f / %.2f GB\", $(median "${a_rss[@]}") * 1024 / 1e9, $(median "${b_rss[@]}") * 1024 / 1e9 }") |")
    if [ "${KEEP_EVENTS:-0}" = 0 ] && [ "$n" -gt 100000 ]; then
        rm -f "$events" "$events.done"
    fi
done

# How (a), (b) and the ratio change from 2 to 4 weeks, at each size measured at both.
for plan in "${PLAN[@]}"; do
    read -r n weeks _ <<<"$plan"
    if [ "$weeks" = 4 ] && [ -n "${RATIO[$n-2]:-}" ]; then
        a2="A_${n}_2" a4="A_${n}_4" b2="B_${n}_2" b4="B_${n}_4"
        growth+=("$(fmt_int "$n") clients: from 2 to 4 weeks, (a) x$(fmt2 "$(calc "${!a4} / ${!a2}")"), (b) x$(fmt2 "$(calc "${!b4} / ${!b2}")"), (b)/(a) from $(fmt2 "${RATIO[$n-2]}") to $(fmt2 "${RATIO[$n-4]}")")
    fi
done

cat <<EOF
## Streaming vs batch recompute (issue 7)

\`SCALE=$SCALE bench/parts/batch.sh\`, $DATE. Machine: $MACHINE. Per run, on the same
event file (\`slipstream generate --config CONFIG --clients N --seed 1\`), one after the other:

\`\`\`
(a) /usr/bin/time -v slipstream replay --config CONFIG --input events.ndjson --data-dir DIR --out OUT
(b) /usr/bin/time -v python bench/batch/recompute.py --config CONFIG --events events.ndjson --db DB.duckdb
\`\`\`

CONFIG is bench/experiment-4w.toml (sled page cache 2048 MiB; 28 days of analysis: 33 windows, both analysis bases,
7 metrics, 2 segments, 1,000 bootstrap replicates) or the same experiment ending two weeks
earlier (14 days: 17 windows), with the same clients and enrollment. (a) is slipstream's wall
time, end to end: decoding and folding every event once into sled, then materializing and
publishing each window as it completes. (b) is the batch job a team would otherwise run,
modelled on Jetstream: DuckDB $DUCKDB_VERSION (both cores) loads the raw events once (parsed line by
line, rejects counted, telemetry stored sorted by date like a date-partitioned table); after
enrollment closes it builds the enrollment table; then each night it recomputes the windows
completed that night, each from the raw telemetry of the window's span joined with the
enrollments (overlapping days, weeks and overall re-read the same rows), writing the
per-client aggregate table and computing in numpy (vectorized, both cores) the same
statistics: Bayesian-bootstrap means with a per-replicate 99.5th-percentile cap, deciles
with bootstrap intervals, Beta-posterior binomial, count, sum, empirical CDF, identity
counts, differences and relative uplifts, with the same replicate count. Its tables stay in
the DuckDB file; slipstream's go to NDJSON files. Medians over the runs (range in brackets).

| experiment | events | runs | (a) slipstream (fold / materialize / sink) | (b) batch (load / aggregates SQL / statistics / write) | (b)/(a) | peak RSS (a) / (b) |
|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")

Growth with the experiment's length: $(printf '%s; ' "${growth[@]}" | sed 's/; $//').

Correctness, checked in the first run of each size (after an untimed \`slipstream finalize\`
has published the late events that stayed below \`republish_threshold\`; the batch job reads
every event):
$(printf '%s\n' "${checks[@]}")
EOF
