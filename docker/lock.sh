#!/usr/bin/env bash
# Regenerate the image lock files from pyproject.toml, with hashes:
#
#   pip install uv==0.13.9      # once
#   docker/lock.sh              # keeps existing pins where still valid
#   UPGRADE=1 docker/lock.sh    # moves every unpinned dependency to its newest version
#
# The locks target the Python and platform of the base images: CPython 3.12, x86_64, glibc >= 2.35
# (the pytorch/pytorch:2.13.0 images are Ubuntu 24.04, glibc 2.39; 2.35 keeps 22.04 bases working).
# Wheels only: nothing is compiled while an image builds. They are resolved together with the base
# image's torch (docker/constraints.txt); what the base image already provides (torch, triton,
# nvidia-*, cuda-* from torch's own dependency tree) is resolved but not written out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV="${UV:-uv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PLATFORM="${PLATFORM:-x86_64-manylinux_2_35}"
INDEX_URL="${INDEX_URL:-https://pypi.org/simple}"
CONSTRAINTS=docker/constraints.txt

if ! command -v "$UV" >/dev/null 2>&1; then
    echo "error: $UV not found; install it with: pip install uv==0.13.9" >&2
    exit 2
fi

common=("$UV" pip compile --quiet --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM"
        --index-url "$INDEX_URL" --only-binary :all: --constraint "$CONSTRAINTS")
[[ "${UPGRADE:-0}" == 1 ]] && common+=(--upgrade)

# torch's own dependency closure on the target platform; its CUDA/Triton members come from the base image.
mapfile -t from_base < <(
    echo torch | "${common[@]}" --no-header --no-annotate - |
        sed -nE 's/^(triton|nvidia-[a-z0-9._-]+|cuda-[a-z0-9._-]+)==.*/\1/p'
)
skip=(--no-emit-package torch)
for name in "${from_base[@]}"; do skip+=(--no-emit-package "$name"); done

lock() {  # OUTPUT INPUT... [--extra NAME ...]
    local out=$1
    shift
    "${common[@]}" --generate-hashes --custom-compile-command "docker/lock.sh" "${skip[@]}" -o "$out" "$@"
    echo "wrote $out ($(grep -cE '^[a-z0-9]' "$out") packages)"
}

lock docker/requirements-train.lock pyproject.toml docker/requirements-train.in --extra quant --extra wandb --extra plots
lock docker/requirements-infer.lock pyproject.toml --extra quant
lock docker/requirements-vllm.lock pyproject.toml --extra quant --extra vllm
