#!/usr/bin/env bash
# Runs every check and test of slipstream on a fresh machine: installs the test services
# (the tansu Kafka broker; see DESIGN.md section 7) into a cache directory, then formatting,
# lints, and all unit and integration tests. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "== installing test services"
SLIPSTREAM_TANSU="$(deploy/local/install-tansu.sh | tail -n 1)"
export SLIPSTREAM_TANSU
echo "tansu: $SLIPSTREAM_TANSU"

SLIPSTREAM_BQEMULATOR="$(deploy/local/install-bqemulator.sh | tail -n 1)"
export SLIPSTREAM_BQEMULATOR
echo "bqemulator: $SLIPSTREAM_BQEMULATOR"

# The independent implementation of the tables and statistics (DuckDB SQL and numpy) that
# tests/independent.rs compares slipstream's output with.
SLIPSTREAM_BATCH_PYTHON="$(deploy/local/install-batch-python.sh | tail -n 1)"
export SLIPSTREAM_BATCH_PYTHON SLIPSTREAM_REQUIRE_BATCH_PYTHON=1
echo "batch python: $SLIPSTREAM_BATCH_PYTHON"

CHROMIUM="$(deploy/local/install-chromium.sh | tail -n 1)"
echo "chromium: $CHROMIUM"
# The results page test must run the real browser here, not skip it.
export SLIPSTREAM_REQUIRE_CHROMIUM=1

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --all-targets --locked

# The statistics calibration simulations (thousands of A/A experiments) need an optimized
# build; in debug builds they are skipped.
echo "== cargo test --release (statistics calibration)"
cargo test --release --locked --lib stats::tests::calibration
