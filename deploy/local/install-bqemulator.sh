#!/usr/bin/env bash
# Installs the BigQuery emulator bqemulator 1.4.0 (PyPI) for local tests and prints the absolute
# path of its `bqemulator` executable on the last line of stdout.
#
# Why the extra packages (DESIGN.md section 7): the emulator runs on duckdb and loads duckdb's
# spatial extension at start; offline it cannot download that extension, so we pin duckdb 1.5.5,
# install the matching `duckdb-extension-spatial` wheel, and copy the extension file to where
# duckdb looks for it (~/.duckdb/extensions/v1.5.5/linux_amd64/).
#
# Idempotent and fast when already installed; safe to run concurrently (flock).
#
# Environment:
#   SLIPSTREAM_CACHE  cache root (default: $HOME/.cache/slipstream)
#   PYTHON            python interpreter used to create the venv (default: python3)
set -euo pipefail

cache="${SLIPSTREAM_CACHE:-$HOME/.cache/slipstream}"
venv="$cache/venv-bqemulator"
python="${PYTHON:-python3}"
bq_version="1.4.0"
duckdb_version="1.5.5"
ext_dir="$HOME/.duckdb/extensions/v$duckdb_version/linux_amd64"

die() { echo "install-bqemulator: $*" >&2; exit 1; }

installed() {
    [ -x "$venv/bin/bqemulator" ] && [ -f "$ext_dir/spatial.duckdb_extension" ] \
        && [ -f "$venv/.slipstream-installed-$bq_version-$duckdb_version" ]
}

if installed; then
    echo "$venv/bin/bqemulator"
    exit 0
fi

mkdir -p "$cache" || die "cannot create cache directory $cache"
exec 9>"$cache/.install-bqemulator.lock"
flock 9

if ! installed; then
    command -v "$python" >/dev/null 2>&1 || die "python interpreter '$python' not found (set PYTHON=...)"
    case "$(uname -m)" in
        x86_64) ;;
        *) die "only linux_amd64 is supported (the spatial extension is copied to $ext_dir)" ;;
    esac
    if [ ! -f "$venv/.slipstream-installed-$bq_version-$duckdb_version" ]; then
        echo "install-bqemulator: installing bqemulator==$bq_version into $venv" >&2
        rm -rf "$venv"
        "$python" -m venv "$venv" >&2 || die "could not create a venv at $venv (is python3-venv installed?)"
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            "bqemulator==$bq_version" "duckdb==$duckdb_version" \
            "duckdb-extension-spatial==$duckdb_version" numpy >&2 \
            || die "pip could not install bqemulator==$bq_version with duckdb==$duckdb_version from PyPI"
        [ -x "$venv/bin/bqemulator" ] || die "bqemulator installed but $venv/bin/bqemulator is missing"
    fi
    ext_src="$("$venv/bin/python" -c '
import duckdb_extension_spatial, os, sys
root = os.path.dirname(duckdb_extension_spatial.__file__)
print(os.path.join(root, "extensions", "v" + sys.argv[1], "spatial.duckdb_extension"))
' "$duckdb_version")" || die "cannot locate the duckdb_extension_spatial package in $venv"
    [ -f "$ext_src" ] || die "spatial extension not found at $ext_src"
    mkdir -p "$ext_dir" || die "cannot create $ext_dir"
    cp "$ext_src" "$ext_dir/spatial.duckdb_extension.tmp.$$"
    mv -f "$ext_dir/spatial.duckdb_extension.tmp.$$" "$ext_dir/spatial.duckdb_extension"
    touch "$venv/.slipstream-installed-$bq_version-$duckdb_version"
    echo "install-bqemulator: done" >&2
fi

echo "$venv/bin/bqemulator"
