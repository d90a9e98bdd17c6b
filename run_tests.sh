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
exec .venv/bin/pytest -q -p no:cacheprovider --durations=15 "$@"
