#!/usr/bin/env bash
# Batched inference on a CSV/JSONL, wherever it can run (Docker image, Apptainer, or the local .venv):
#
#   ./run_inference.sh test.csv [--checkpoint DIR] [--output FILE] [--key=value ...]
#   ./run_inference.sh test.csv --dry-run                  # print the exact command
#   ./run_inference.sh --serve                             # docker compose --profile serve up serve (vLLM)
#
# Options: --mode auto|docker|apptainer|local, --gpus N, --image NAME, --dry-run. See docker/README.md.
if [[ ${1:-} == --serve ]]; then  # ./run_inference.sh --serve [compose args]: compose.yaml's OpenAI-compatible server
    shift
    cd "$(dirname "${BASH_SOURCE[0]}")" && exec docker compose --profile serve up serve "$@"
fi
FINETUNE_PROG="${FINETUNE_PROG:-$(basename "$0")}" exec "$(dirname "${BASH_SOURCE[0]}")/docker/launch.sh" infer "$@"
