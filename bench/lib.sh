# Shared by the bench/parts/*.sh scripts (sourced, not run). Each part prints one Markdown
# section on stdout and logs on stderr; see bench/run.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SCALE="${SCALE:-full}"
case "$SCALE" in
    quick | full) ;;
    *) echo "SCALE must be quick or full, got '$SCALE'" >&2; exit 2 ;;
esac
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# Generated data lives here and is deleted by each part on exit.
BENCH_DATA="$CARGO_TARGET_DIR/bench-data"
# Measured runs are serialized machine-wide, so two benchmarks never share the 2 cores.
BENCH_LOCK="${BENCH_LOCK:-/tmp/slipstream-bench.lock}"
BIN="$CARGO_TARGET_DIR/release/slipstream"
PART="$(basename "$0" .sh)"

log() { echo "[$PART $(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs a command under the machine-wide benchmark lock.
locked() { flock "$BENCH_LOCK" "$@"; }

# Median of the numbers on stdin, one a line (the lower middle for an even count).
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

# A loopback port that was free a moment ago.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

build_release() {
    log "building the release binary"
    locked cargo build --release --locked --quiet >&2
}

# Compiles a bench target once (under the lock: a release build takes minutes of CPU).
build_bench() {
    log "building bench target $1"
    locked cargo bench --locked --bench "$1" --no-run >&2
}

# A whole number with thousands separators (locale-independent): fmt 1234567.8 -> 1,234,568.
fmt() {
    awk -v n="$1" 'BEGIN { s = sprintf("%.0f", n); r = ""
        while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }
        print s r }'
}
