#!/usr/bin/env bash
# Statistics engine (issue 7, part 4; issue 9): one window of 1,000,000 clients with 1,000
# bootstrap replicates (bench/statistics.rs), in both cap modes, and the calibration
# simulations (stats::tests::calibration). SCALE=full: 3 runs of each mode, 2,000 simulated
# experiments; quick: 100,000 clients, 1 run, 400 experiments.
source "$(dirname "$0")/../lib.sh"

clients=$([ "$SCALE" = full ] && echo 1000000 || echo 100000)
runs="${RUNS:-$([ "$SCALE" = full ] && echo 3 || echo 1)}"
sims=$([ "$SCALE" = full ] && echo 2000 || echo 400)
work="$BENCH_DATA/statistics"
trap 'rm -rf "$work"' EXIT
rm -rf "$work"
mkdir -p "$work"

build_bench statistics
for i in $(seq 1 "$runs"); do
    for mode in per_replicate fixed; do
        arg=$([ "$mode" = fixed ] && echo fixed || true)
        log "run $i, $mode cap"
        # shellcheck disable=SC2086
        locked /usr/bin/time -f 'peak RSS %M kB' cargo bench --locked --quiet --bench statistics -- \
            "$clients" 1000 2 $arg >"$work/$mode-$i.txt" 2>"$work/$mode-$i.err"
        grep -h 'total\|peak RSS' "$work/$mode-$i.txt" "$work/$mode-$i.err" >&2
    done
done
log "calibration: $sims simulated A/A experiments per cap mode"
locked cargo test --release --locked --quiet --lib --no-run >&2
cal_start=$(date +%s.%N)
CALIBRATION_SIMS=$sims locked cargo test --release --locked --quiet --lib stats::tests::calibration -- --nocapture --test-threads 1 \
    >"$work/calibration.txt" 2>&1 || { tail -n 20 "$work/calibration.txt" >&2; die "calibration failed"; }
cal_secs=$(awk -v a="$cal_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

phase() { sed -n "s/^$2 *\([0-9.]*\) s.*/\1/p" "$1"; }
cat <<MD
## Statistics engine (issue 7, part 4)

\`SCALE=$SCALE bench/parts/statistics.sh\`: $runs × \`cargo bench --bench statistics -- $clients 1000 2 [fixed]\`
(one window of $(fmt "$clients") clients, 10 metrics, 2 branches, 3 segments, 1,000 bootstrap
replicates, 2 threads; synthetic data). Goal: under 10 s for 1,000,000 clients. Medians of
$runs runs; peak RSS of the bench process.

| cap mode | phase 1 (distribution) | phase 2 (bootstrap sums) | rows | total | peak RSS |
|---|---|---|---|---|---|
MD
for mode in per_replicate fixed; do
    col() { for i in $(seq 1 "$runs"); do phase "$work/$mode-$i.txt" "$1"; done | median; }
    rss=$(for i in $(seq 1 "$runs"); do sed -n 's/^peak RSS \([0-9]*\) kB/\1/p' "$work/$mode-$i.err"; done | median)
    name=$([ "$mode" = fixed ] && echo "fixed (Jetstream)" || echo "per-replicate (default)")
    echo "| $name | $(col 'phase 1 (distribution summary):') s | $(col 'phase 2 (bootstrap sums):') s | $(col 'finish (rows):') s | **$(col 'total:') s** | $((rss / 1024)) MB |"
done
cat <<MD

Calibration: \`CALIBRATION_SIMS=$sims cargo test --release --lib stats::tests::calibration -- --nocapture\`:
$sims A/A experiments, 1,000 clients per branch; the share of 95% intervals that cover the
truth (branch mean, difference, relative uplift). The test fails outside 93-97% (heavy tails
under the fixed cap: below 90%). Both cap modes, one after the other on one thread: $cal_secs s.

| distribution and interval | per-replicate cap (default) | fixed cap (Jetstream) |
|---|---|---|
MD
for name in $(sed -n 's/.*PerReplicate coverage \(.*\): [0-9.]*%$/\1/p' "$work/calibration.txt" | tr ' ' '~'); do
    n=${name//\~/ }
    per=$(grep -F "PerReplicate coverage $n: " "$work/calibration.txt" | sed 's/.*: //')
    fixed=$(grep -F "Fixed coverage $n: " "$work/calibration.txt" | sed 's/.*: //')
    echo "| $n | $per | $fixed |"
done
