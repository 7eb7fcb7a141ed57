#!/usr/bin/env bash
# The main job on the embedded default: the bundled example experiment, a synthetic event
# file, folded into state/ and published as NDJSON tables under results/. No broker, no
# cloud account. Re-running resumes where the last run stopped (nothing is counted twice).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLIENTS="${CLIENTS:-20000}"
CONFIG="${CONFIG:-deploy/examples/experiment.toml}"
cargo build --release --locked --quiet
bin=target/release/slipstream
mkdir -p target/demo
events="target/demo/events-$CLIENTS.ndjson"
$bin check-config "$CONFIG"
if [ ! -s "$events" ]; then
  $bin generate --config "$CONFIG" --clients "$CLIENTS" --seed 1 --out "$events"
fi
$bin replay --config "$CONFIG" --input "$events" --data-dir state --out results
echo "tables: $(ls results | wc -l) files in results/ (e.g. results/statistics_bug_12345_slug_weekly.ndjson)"
