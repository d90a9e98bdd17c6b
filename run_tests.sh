#!/usr/bin/env bash
# Set up .venv (first use; refreshed on later runs) and run the test suite: ./run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# torch first, pinned: a later unpinned `torch` requirement would otherwise pull CUDA wheels on a CPU box
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
# the demo page's browser test needs Chromium: installed where we are root with apt-get (never fatal; skipped without)
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
    (timeout 120 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends chromium) \
        >/dev/null 2>&1 || echo "note: chromium not installed; the browser test will be skipped" >&2
fi
exec .venv/bin/pytest -q -p no:cacheprovider --durations=15 "$@"
