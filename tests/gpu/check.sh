#!/usr/bin/env bash
# GPU verification kit: checks the CUDA paths and measures the headline figures (tests/gpu/README.md).
#   tests/gpu/check.sh                 one GPU, at most 8 minutes, no network
#   tests/gpu/check.sh --cpu-smoke     the same script with tiny shapes on CPU (under 2 minutes)
# Python: $PYTHON if set; else, on a GPU, python3 when it has torch (the GPU image's), else .venv/bin/python;
# for the smoke, .venv/bin/python first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2

has_torch() { [[ -x $(command -v "$1" 2>/dev/null) ]] && "$1" -c 'import torch' >/dev/null 2>&1; }

py=${PYTHON:-}
if [[ -z $py ]]; then
    candidates=(python3 .venv/bin/python)
    [[ " $* " == *" --cpu-smoke "* ]] && candidates=(.venv/bin/python python3)
    for c in "${candidates[@]}"; do
        if has_torch "$c"; then py=$c; break; fi
    done
fi
if [[ -z $py ]]; then
    echo "tests/gpu/check.sh: no Python with torch found (tried python3 and .venv/bin/python); set PYTHON=/path/to/python" >&2
    exit 3
fi
exec "$py" tests/gpu/run.py "$@"
