#!/usr/bin/env bash
# The stand-in bases of the container kit (tests/containers/README.md): the one place that knows they are
# not the real pytorch/pytorch:2.13.0 and python:3.12-slim images. How they differ from those:
#   - Debian 12 (bookworm, debootstrap minbase) instead of Ubuntu 24.04 / Debian trixie;
#   - CPython 3.12 copied from the host's pyenv build (no Debian suite ships 3.12) instead of conda's / the
#     official image's build: same minor, so the cp312 locks apply unchanged;
#   - standin-torch: torch 2.13.0 from PyPI, the CUDA 13.0 build with its nvidia-* wheels (no CUDA toolkit,
#     no cuDNN headers), where the real training/inference bases are CUDA 12.6; the images are therefore
#     built with TORCH_CUDA=13.0 and without the flash-attn wheel (it is compiled for CUDA 12.6 and comes from
#     a host this machine cannot reach);
#   - the host's CA bundle at /etc/ssl/certs/ca-certificates.crt with PIP_CERT pointing at it (pip inside a
#     build otherwise fails TLS verification behind this machine's proxy).
#
#   standin.sh python TAG WORK      bookworm + CPython 3.12 (the stand-in for python:3.12-slim)
#   standin.sh torch TAG BASE WORK  + torch==2.13.0 from WORK/wheels (the stand-in for pytorch/pytorch:2.13.0-*)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

find_python312() {  # PYTHON312 (a CPython 3.12 prefix), else the newest pyenv 3.12.x
    local prefix="${PYTHON312:-}"
    if [[ -z $prefix ]]; then
        prefix="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.* 2>/dev/null | sort -V | tail -n 1 || true)"
    fi
    [[ -n $prefix && -x $prefix/bin/python3.12 ]] ||
        { echo "standin.sh: no CPython 3.12 found; set PYTHON312 to the prefix of one (PREFIX/bin/python3.12)" >&2; exit 2; }
    echo "$prefix"
}

python_base() {  # TAG WORK
    local tag="$1" work="$2" prefix rootfs
    prefix="$(find_python312)"
    rootfs="$work/rootfs"
    rm -rf "$rootfs"
    # the shared libraries CPython's extension modules link against, and what useradd/apt need in a build
    debootstrap --variant=minbase \
        --include=ca-certificates,libssl3,libffi8,zlib1g,libbz2-1.0,liblzma5,libsqlite3-0,libreadline8,libncursesw6,libuuid1,libgdbm6,libexpat1,passwd,procps \
        bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
        { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
    # CPython under /usr/local, as in the official python images (libpython found through ld.so.conf)
    tar -C "$prefix" --exclude='lib/python3.12/test' --exclude='lib/python3.12/site-packages/*' -cf - . |
        tar -C "$rootfs/usr/local" -xf -
    chroot "$rootfs" /sbin/ldconfig
    for name in python python3; do ln -sf python3.12 "$rootfs/usr/local/bin/$name"; done
    chroot "$rootfs" /usr/local/bin/python3.12 -m ensurepip --default-pip >/dev/null
    for name in pip pip3; do ln -sf pip3.12 "$rootfs/usr/local/bin/$name"; done
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf - . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'LABEL org.opencontainers.image.description=stand-in for python:3.12-slim (finetune-runner container kit)' \
        --change 'CMD ["python3"]' - "$tag" >/dev/null
    rm -rf "$rootfs"
    podman run --rm "$tag" python -c 'import ssl, sqlite3, ctypes, lzma, bz2, sys; print("stand-in python", sys.version.split()[0])'
}

torch_base() {  # TAG BASE WORK
    local tag="$1" base="$2" work="$3"
    ls "$work"/wheels/torch-2.13.0-*.whl >/dev/null 2>&1 ||
        "$(find_python312)/bin/python3.12" -m pip download --quiet --only-binary :all: --progress-bar off \
            -d "$work/wheels" "torch==$(sed -nE 's/^torch==(\S+).*/\1/p' docker/constraints.txt)"
    podman build --quiet --format docker --network none -v "$work/wheels:/wheels:ro" --build-arg "BASE=$base" \
        -t "$tag" -f tests/containers/standin-torch.Containerfile tests/containers >/dev/null
    podman run --rm "$tag" python -c 'import torch; print("stand-in torch", torch.__version__, "CUDA", torch.version.cuda)'
}

case "${1:-}" in
    python) python_base "$2" "$3" ;;
    torch) torch_base "$2" "$3" "$4" ;;
    *) echo "usage: standin.sh python TAG WORK | torch TAG BASE WORK" >&2; exit 2 ;;
esac
