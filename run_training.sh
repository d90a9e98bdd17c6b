#!/usr/bin/env bash
# Fine-tune with a config, wherever it can run (Docker image, Apptainer, or the local .venv):
#
#   ./run_training.sh configs/ablation1.py --lora_r=64     # --key=value overrides pass through
#   ./run_training.sh configs/ablation1.py --gpus 4        # 4 processes through accelerate launch
#   ./run_training.sh configs/confidence_head_full.py --gpus 4 --fsdp   # the same, FSDP2-sharded
#   ./run_training.sh configs/tiny.py --dry-run            # print the exact command
#
# Options: --mode auto|docker|apptainer|local, --gpus N, --fsdp, --image NAME, --dry-run. See docker/README.md.
FINETUNE_PROG="${FINETUNE_PROG:-$(basename "$0")}" exec "$(dirname "${BASH_SOURCE[0]}")/docker/launch.sh" train "$@"
