# Helpers shared by bench/parts/*.sh (sourced, not run). Progress goes to stderr; the
# parts print their Markdown section on stdout.
#
# Environment:
#   SCALE              quick | full (default quick)
#   BENCH_DATA         where generated events, state and outputs go (default target/bench-data)
#   BENCH_LOCK         lock file serializing measured runs (default /tmp/slipstream-bench.lock)
#   PYTHON             interpreter for the venv (default python3)

set -euo pipefail

BENCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$BENCH_ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$BENCH_ROOT/target}"
SCALE="${SCALE:-quick}"
BENCH_DATA="${BENCH_DATA:-$BENCH_ROOT/target/bench-data}"
BENCH_LOCK="${BENCH_LOCK:-/tmp/slipstream-bench.lock}"
BIN="$CARGO_TARGET_DIR/release/slipstream"
mkdir -p "$BENCH_DATA"

case "$SCALE" in
quick | full) ;;
*)
    echo "SCALE must be quick or full, not '$SCALE'" >&2
    exit 2
    ;;
esac

log() { echo "[${PART:-bench}] $*" >&2; }

# Runs a measured command alone on the machine (other benchmarks take the same lock).
locked() { flock "$BENCH_LOCK" "$@"; }

build_release() {
    log "building the release binary"
    cargo build --release --locked --quiet >&2
}

# The Python of the batch alternative (DuckDB, numpy), shared with tests/independent.rs.
ensure_python() {
    PY=$(deploy/local/install-batch-python.sh | tail -n 1)
}

# gen_events CONFIG CLIENTS OUT: the deterministic event file (seed 1), generated once.
gen_events() {
    local config=$1 clients=$2 out=$3
    if [ ! -f "$out.done" ]; then
        log "generating $clients clients for $config into $out"
        rm -f "$out"
        locked "$BIN" generate --config "$config" --clients "$clients" --seed 1 --out "$out" >&2
        touch "$out.done"
    fi
}

# The experiment of bench/experiment-4w.toml ended after `weeks` weeks of analysis
# (same enrollment, same clients a day): written to $BENCH_DATA/experiment-<weeks>w.toml.
config_weeks() {
    local weeks=$1 out="$BENCH_DATA/experiment-${1}w.toml"
    local end
    end=$(date -u -d "2026-11-07 + $((weeks * 7)) days" +%F)
    sed -e "s/^slug = \"bench-4w\"/slug = \"bench-${weeks}w\"/" \
        -e "s/^end_date = .*/end_date = \"$end\"/" bench/experiment-4w.toml >"$out"
    "$BIN" check-config "$out" >&2
    echo "$out"
}

# Deletes the published aggregate tables (one NDJSON file per window and basis) of
# $1 (an --out directory) while a replay writes them, except those matching the
# extended regex $2: at large scales they would not fit on the disk. The sink has
# written, fsynced and renamed each file before it is deleted, so its cost is measured.
# Prints the pid of the background pruner; stop it with `stop_pruner PID DIR KEEP`.
start_pruner() {
    local dir=$1 keep=$2
    (
        while true; do
            prune_once "$dir" "$keep"
            sleep 2
        done
    ) >/dev/null 2>&1 &
    echo $!
}
prune_once() {
    local dir=$1 keep=$2 f
    [ -d "$dir" ] || return 0
    for f in "$dir"/*_enrollments_*.ndjson "$dir"/*_exposures_*.ndjson; do
        [ -f "$f" ] || continue
        if ! basename "$f" | grep -Eq "$keep"; then
            rm -f "$f"
        fi
    done
}
stop_pruner() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    prune_once "$2" "$3"
}

# replay_measured CONFIG EVENTS DATA_DIR OUT_DIR: one replay into fresh directories under
# /usr/bin/time -v. Sets R_SECS (the replay's own clock), R_LINES, R_FOLDED, R_REJECTED,
# R_TABLES, R_ROWS, R_FLUSH, R_MATERIALIZE, R_SINK (seconds), R_RSS_KB, R_WALL (process).
replay_measured() {
    local config=$1 events=$2 dir=$3 out=$4
    rm -rf "$dir" "$out"
    local summary="$BENCH_DATA/replay-summary.txt" timing="$BENCH_DATA/replay-time.txt"
    locked /usr/bin/time -v -o "$timing" "$BIN" replay --config "$config" --input "$events" \
        --data-dir "$dir" --out "$out" >"$summary" 2>"$BENCH_DATA/replay-log.txt"
    cat "$summary" >&2
    local line
    line=$(grep '^replayed ' "$summary")
    R_LINES=$(sed -E 's/^replayed ([0-9]+) lines.*/\1/' <<<"$line")
    R_SECS=$(sed -E 's/.* in ([0-9.]+)s: .*/\1/' <<<"$line")
    R_FOLDED=$(sed -E 's/.*s: ([0-9]+) folded.*/\1/' <<<"$line")
    R_REJECTED=$(sed -E 's/.*, ([0-9]+) rejected;.*/\1/' <<<"$line")
    R_TABLES=$(sed -E 's/.*published ([0-9]+) tables.*/\1/' <<<"$line")
    R_ROWS=$(sed -E 's/.*tables \(([0-9]+) rows\).*/\1/' <<<"$line")
    line=$(grep '^time: ' "$summary")
    R_FLUSH=$(sed -E 's/^time: ([0-9.]+)s writing.*/\1/' <<<"$line")
    R_MATERIALIZE=$(sed -E 's/.*, ([0-9.]+)s materializing.*/\1/' <<<"$line")
    R_SINK=$(sed -E 's/.*, ([0-9.]+)s in the sink.*/\1/' <<<"$line")
    R_RSS_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$timing")
    R_WALL=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$timing" |
        awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }')
}

# Arithmetic and formatting (awk, so no bc needed).
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
range() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
# thousands separators: fmt_int 1234567 -> 1,234,567
fmt_int() { printf "%.0f" "$1" | sed -E ':a; s/^([0-9]+)([0-9]{3})/\1,\2/; ta'; }
fmt1() { printf "%.1f" "$1"; }
fmt2() { printf "%.2f" "$1"; }
mb() { awk "BEGIN { printf \"%.0f MB\", $1 / 1e6 }"; }

machine() {
    local cpu mem
    cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
    mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
    echo "$(nproc) x ${cpu:-unknown CPU}, $mem, $(uname -sr); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
}
