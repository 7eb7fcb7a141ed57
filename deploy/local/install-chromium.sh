#!/usr/bin/env bash
# Headless Chromium for tests/results_page.rs, from Debian's packages (the test runs it with
# --headless --no-sandbox and no network use). Needs root for apt-get; quick when installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    command -v chromium
    exit 0
fi
echo "install-chromium: installing Debian's chromium package" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >&2
command -v chromium
