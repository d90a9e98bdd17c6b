#!/usr/bin/env bash
# Regenerate the image lock files from pyproject.toml, with hashes:
#
#   pip install uv==0.13.9      # once
#   docker/lock.sh              # keeps existing pins where still valid
#   UPGRADE=1 docker/lock.sh    # moves every unpinned dependency to its newest version
#
# The locks target the Python and platform of the base images: CPython 3.12, x86_64, glibc >= 2.35
# (the pytorch/pytorch:2.13.0 images are Ubuntu 24.04, glibc 2.39; 2.35 keeps 22.04 bases working).
# Wheels only: nothing is compiled while an image builds. Every transitive requirement is pinned with a
# hash, resolved together with the base image's torch (docker/constraints.txt), except what the base
# image already provides at exactly the resolved version: torch, and the triton, nvidia-* and cuda-*
# members of torch's own dependency tree. A lock that needs another version of one of those (vLLM's
# cuda-python wants cuda-bindings ~=13.4.4 where torch alone brings 13.5.0) pins it, so that
# `pip install --no-deps --require-hashes` over the base gives an environment where `pip check` passes.
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

# torch's own dependency closure on the target platform, as NAME==VERSION; its CUDA/Triton members come
# from the base image.
mapfile -t from_base < <(
    echo torch | "${common[@]}" --no-header --no-annotate - |
        sed -nE 's/^((triton|nvidia-[a-z0-9._-]+|cuda-[a-z0-9._-]+)==[^[:space:]]+).*/\1/p'
)

lock() {  # OUTPUT INPUT... [--extra NAME ...]
    local out=$1 pin resolved
    shift
    # first the plain resolution, to see which of the base's packages this lock needs at another version
    resolved="$("${common[@]}" --no-header --no-annotate "$@")"
    local skip=(--no-emit-package torch)
    for pin in "${from_base[@]}"; do
        if grep -qxF "$pin" <<<"$resolved"; then skip+=(--no-emit-package "${pin%%==*}"); fi
    done
    "${common[@]}" --generate-hashes --custom-compile-command "docker/lock.sh" "${skip[@]}" -o "$out" "$@"
    echo "wrote $out ($(grep -cE '^[a-z0-9]' "$out") packages)"
}

lock docker/requirements-train.lock pyproject.toml docker/requirements-train.in --extra wandb
lock docker/requirements-infer.lock pyproject.toml
lock docker/requirements-vllm.lock pyproject.toml --extra vllm
