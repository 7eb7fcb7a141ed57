#!/usr/bin/env bash
# Installs the Python packages of the independent implementation of slipstream's tables
# and statistics (bench/batch/recompute.py: DuckDB SQL and numpy), for tests/independent.rs
# and the batch benchmark, and prints the absolute path of the venv's python on the last
# line of stdout.
#
# Idempotent and fast when already installed; safe to run concurrently (flock).
#
# Environment:
#   SLIPSTREAM_CACHE  cache root (default: $HOME/.cache/slipstream)
#   PYTHON            python interpreter used to create the venv (default: python3)
set -euo pipefail

cache="${SLIPSTREAM_CACHE:-$HOME/.cache/slipstream}"
venv="$cache/venv-batch"
packages=("duckdb==1.5.5" "numpy==2.4.6" "scipy==1.17.1")
python="${PYTHON:-python3}"
marker="$venv/.installed-$(echo "${packages[*]}" | tr ' =' '_-')"

die() { echo "install-batch-python: $*" >&2; exit 1; }

if [ -f "$marker" ] && [ -x "$venv/bin/python" ]; then
    echo "$venv/bin/python"
    exit 0
fi

mkdir -p "$cache" || die "cannot create cache directory $cache"
exec 9>"$cache/.install-batch-python.lock"
flock 9
if [ -f "$marker" ] && [ -x "$venv/bin/python" ]; then
    echo "$venv/bin/python"
    exit 0
fi

command -v "$python" >/dev/null 2>&1 || die "python interpreter '$python' not found (set PYTHON=...)"
echo "install-batch-python: installing ${packages[*]} into $venv" >&2
rm -rf "$venv"
"$python" -m venv "$venv" >&2 || die "could not create a venv at $venv (is python3-venv installed?)"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}" >&2 \
    || die "pip could not install ${packages[*]} from PyPI"
"$venv/bin/python" -c 'import duckdb, numpy, scipy' || die "the packages do not import"
touch "$marker"
echo "$venv/bin/python"
