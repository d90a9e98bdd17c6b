#!/usr/bin/env bash
# Batched inference on a CSV/JSONL, wherever it can run (Docker image, Apptainer, or the local .venv):
#
#   ./run_inference.sh test.csv [--checkpoint DIR] [--output FILE] [--key=value ...]
#   ./run_inference.sh test.csv --dry-run                  # print the exact command
#
# Options: --mode auto|docker|apptainer|local, --gpus N, --image NAME, --dry-run. See docker/README.md.
FINETUNE_PROG="${FINETUNE_PROG:-$(basename "$0")}" exec "$(dirname "${BASH_SOURCE[0]}")/docker/launch.sh" infer "$@"
