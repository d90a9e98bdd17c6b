#!/usr/bin/env bash
# The launcher behind run_training.sh and run_inference.sh:
#
#   docker/launch.sh train CONFIG.py [launcher options] [--key=value ...]
#   docker/launch.sh infer INPUT [launcher options] [--checkpoint DIR] [--output FILE] [--key=value ...]
#
# It picks where `python -m app` runs (--mode auto|docker|apptainer|local), builds the exact command
# and execs it. Launcher options: --mode M, --gpus N, --image NAME, --dry-run, --help. Every other
# argument passes through to `python -m app` unchanged (after `--`, even launcher-looking ones).
# Errors about the user's input or machine are one line on stderr and exit status 2.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND="${1:-}"
shift || true
case "$COMMAND" in
    train) PROG="${FINETUNE_PROG:-run_training.sh}"; WHAT="CONFIG.py" ;;
    infer) PROG="${FINETUNE_PROG:-run_inference.sh}"; WHAT="INPUT" ;;
    *) echo "usage: docker/launch.sh train|infer ARGS..." >&2; exit 2 ;;
esac

die() { echo "$PROG: error: $*" >&2; exit 2; }
note() { echo "$PROG: $*" >&2; }

usage() {
    local fsdp_help=""
    if [[ $COMMAND == train ]]; then
        fsdp_help=$'\n  --fsdp     shard parameters, gradients and optimizer state over the processes (--parallelism=fsdp)'
    fi
    cat <<EOF
usage: $PROG $WHAT [--mode auto|docker|apptainer|local] [--gpus N]$( [[ $COMMAND == train ]] && echo " [--fsdp]") [--image NAME] [--dry-run] [ARGS...]

Runs \`python -m app $COMMAND $WHAT ARGS...\`:
  auto       inside the image: directly; a working Docker engine: docker run of the image;
             else Apptainer/Singularity: apptainer exec --nv on the .sif; else the local .venv
  --gpus N   $( [[ $COMMAND == train ]] && echo "N processes through accelerate launch (N GPUs)" || echo "expose N GPUs to the container" )${fsdp_help}
  --image    Docker image or .sif file (default: $(default_image docker) / $(default_image apptainer))
  --dry-run  print the exact command and exit
Every other argument passes through unchanged, e.g. --lora_r=64. See docker/README.md.
EOF
}

project_version() {  # empty where there is no pyproject.toml (inside the image)
    [[ -f $REPO/pyproject.toml ]] || return 0
    sed -nE 's/^version[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' "$REPO/pyproject.toml" | head -n 1
}

VERSION="$(project_version)"
VERSION="${VERSION:-latest}"

default_image() {  # docker|apptainer
    local name="finetune-runner-$COMMAND"
    if [[ $1 == docker ]]; then
        if [[ $COMMAND == train ]]; then echo "${FINETUNE_TRAIN_IMAGE:-$name:$VERSION}"; else echo "${FINETUNE_INFER_IMAGE:-$name:$VERSION}"; fi
    else
        if [[ $COMMAND == train ]]; then echo "${FINETUNE_TRAIN_SIF:-$REPO/${name}_$VERSION.sif}"; else echo "${FINETUNE_INFER_SIF:-$REPO/${name}_$VERSION.sif}"; fi
    fi
}

# ---------------------------------------------------------------------------------------------------
# Arguments: launcher options are taken out wherever they are; the first remaining one is CONFIG/INPUT.
mode="${FINETUNE_MODE:-auto}"
gpus=""
image=""
dry_run=0
fsdp=0
args=()
while (($#)); do
    case "$1" in
        --mode) (($# >= 2)) || die "--mode needs a value: auto, docker, apptainer or local"; mode="$2"; shift 2 ;;
        --mode=*) mode="${1#*=}"; shift ;;
        --gpus) (($# >= 2)) || die "--gpus needs a number"; gpus="$2"; shift 2 ;;
        --gpus=*) gpus="${1#*=}"; shift ;;
        --image) (($# >= 2)) || die "--image needs a value"; image="$2"; shift 2 ;;
        --image=*) image="${1#*=}"; shift ;;
        --dry-run) dry_run=1; shift ;;
        --fsdp) [[ $COMMAND == train ]] || die "--fsdp is a training option"; fsdp=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; args+=("$@"); break ;;
        *) args+=("$1"); shift ;;
    esac
done

case "$mode" in
    auto|docker|apptainer|local|direct) ;;
    *) die "unknown --mode '$mode' (auto, docker, apptainer or local)" ;;
esac
if [[ -n $gpus ]] && ! [[ $gpus =~ ^[1-9][0-9]*$ ]]; then
    die "--gpus needs a positive number of GPUs, got '$gpus'"
fi
case "${FINETUNE_DOCKER_USER:-auto}" in
    auto|image|host) ;;
    *) [[ $FINETUNE_DOCKER_USER =~ ^[0-9]+(:[0-9]+)?$ ]] ||
           die "FINETUNE_DOCKER_USER='$FINETUNE_DOCKER_USER': expected auto, image, host or UID[:GID]" ;;
esac
((${#args[@]})) || die "missing $WHAT; usage: $PROG $WHAT [--mode M] [--gpus N] [--dry-run] [--key=value ...] (--help)"
target="${args[0]}"
rest=("${args[@]:1}")
# --fsdp is the config override, so the saved run config says so too
if ((fsdp)); then rest+=("--parallelism=fsdp"); fi

if [[ $COMMAND == train ]]; then
    [[ $target != -* ]] || die "the first argument must be the config file, got '$target'"
    [[ -e $target ]] || die "config file not found: $target"
    [[ -f $target ]] || die "config is not a file: $target"
else
    [[ $target != -* ]] || die "the first argument must be the input file, got '$target'"
    [[ -e $target ]] || die "input file not found: $target"
fi

# ---------------------------------------------------------------------------------------------------
# Where to run.
in_image() { [[ -n ${FINETUNE_RUNNER_IMAGE:-} ]]; }

docker_works() {
    command -v docker >/dev/null 2>&1 || return 1
    if command -v timeout >/dev/null 2>&1; then
        timeout "${FINETUNE_DOCKER_TIMEOUT:-20}" docker info >/dev/null 2>&1
    else
        docker info >/dev/null 2>&1
    fi
}

container_cli() {  # apptainer, else singularity
    if command -v apptainer >/dev/null 2>&1; then echo apptainer
    elif command -v singularity >/dev/null 2>&1; then echo singularity
    else return 1
    fi
}

reason=""
if [[ $mode == auto ]]; then
    if in_image; then mode=direct; reason="inside the $FINETUNE_RUNNER_IMAGE image"
    elif docker_works; then mode=docker; reason="docker info succeeded"
    elif container_cli >/dev/null; then mode=apptainer; reason="$(container_cli) on PATH, no working Docker engine"
    else mode=local; reason="no Docker engine, no Apptainer"
    fi
else
    reason="--mode $mode"
fi

# The command inside the chosen environment: python -m app ..., or accelerate launch for --gpus N > 1.
inner_command() {  # PYTHON ACCELERATE
    local python="$1" accelerate="$2"
    if [[ $COMMAND == train && -n $gpus && $gpus -gt 1 ]]; then
        inner=("$accelerate" launch --multi_gpu --num_machines 1 --num_processes "$gpus" -m app train "$target" "${rest[@]}")
    else
        inner=("$python" -m app "$COMMAND" "$target" "${rest[@]}")
    fi
}

# Paths the container must see, at the same absolute path as on the host (so relative paths, the
# config's data/ and checkpoints/ included, mean the same inside): the checkout, the working
# directory, and the directories of path arguments that lie outside both.
abs_path() {
    local p="$1"
    [[ $p == /* ]] || p="$PWD/$p"
    if command -v realpath >/dev/null 2>&1; then realpath -m -- "$p"; else echo "$p"; fi
}
is_under() { [[ $1 == "$2" || $1 == "$2"/* ]]; }

declare -a mounts=()      # "HOST_PATH:MODE"
add_mount() {  # PATH ro|rw
    local path="$1" m
    for m in "${mounts[@]}"; do
        is_under "$path" "${m%:*}" && return 0
    done
    mounts+=("$path:$2")
}

collect_mounts() {
    local repo cwd
    repo="$(abs_path "$REPO")"
    cwd="$(abs_path "$PWD")"
    add_mount "$repo" rw
    add_mount "$cwd" rw
    local t
    t="$(abs_path "$target")"
    add_mount "$(dirname "$t")" ro
    local i value
    for ((i = 0; i < ${#rest[@]}; i++)); do
        value=""
        case "${rest[i]}" in
            --checkpoint|--output) ((i + 1 < ${#rest[@]})) && value="${rest[i + 1]}" ;;
            --checkpoint=*|--output=*) value="${rest[i]#*=}" ;;
            --out_dir=*) value="${rest[i]#*=}"; value="${value#[\'\"]}"; value="${value%[\'\"]}"
                         [[ $value != None ]] || value="" ;;
        esac
        [[ -n $value ]] || continue
        value="$(abs_path "$value")"
        case "${rest[i]}" in
            --checkpoint*) add_mount "$value" ro ;;
            --output*|--out_dir*) add_mount "$(dirname "$value")" rw ;;
        esac
    done
}

hf_cache_host() { echo "${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}"; }

# Secrets and settings taken from the caller's environment by name (values never appear in the command).
PASS_ENV=(HF_TOKEN HUGGING_FACE_HUB_TOKEN HF_HUB_OFFLINE HF_HUB_ENABLE_HF_TRANSFER WANDB_API_KEY WANDB_PROJECT
          WANDB_ENTITY WANDB_MODE NCCL_DEBUG TOKENIZERS_PARALLELISM)

docker_has_gpu() {
    case "${FINETUNE_DOCKER_GPU:-}" in
        1|yes|true) return 0 ;;
        0|no|false) return 1 ;;
    esac
    docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia && return 0
    command -v nvidia-container-runtime-hook >/dev/null 2>&1
}

# Who the container runs as (FINETUNE_DOCKER_USER): `auto` (default) and `host` are your own uid:gid, so files
# written to the mounts belong to you, root's to root from a root shell; `image`: the image's user; `UID[:GID]`:
# that user. The launcher never changes the owner of a host folder: a user other than yours needs folders it
# may already write to.
image_user() {  # the image's USER as uid[:gid]; 1000:1000 (the Dockerfiles' default) when it cannot be read
    local user
    if user="$(docker image inspect --format '{{.Config.User}}' "$image" 2>/dev/null)"; then
        user="${user//[[:space:]]/}"
        echo "${user:-0:0}"   # no USER in the image: root
    else
        echo "1000:1000"
    fi
}

docker_user() {
    local spec="${FINETUNE_DOCKER_USER:-auto}"
    case "$spec" in
        auto|host) echo "$(id -u):$(id -g)" ;;
        image) image_user ;;
        *) echo "$spec" ;;   # UID[:GID], checked with the other arguments
    esac
}

build_command() {
    case "$mode" in
    direct)
        inner_command python accelerate
        cmd=("${inner[@]}")
        ;;
    local)
        inner_command "$REPO/.venv/bin/python" "$REPO/.venv/bin/accelerate"
        cmd=("${inner[@]}")
        ;;
    docker)
        image="${image:-$(default_image docker)}"
        if ! docker_works; then
            ((dry_run)) || die "--mode docker: the Docker engine does not answer (docker info failed); start it, or use --mode local"
            note "warning: the Docker engine does not answer (docker info failed)"
        fi
        local gpu_flags=()
        if docker_has_gpu; then
            if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then gpu_flags=(--gpus "\"device=${CUDA_VISIBLE_DEVICES}\"")
            elif [[ -n $gpus ]]; then gpu_flags=(--gpus "$gpus")
            else gpu_flags=(--gpus all)
            fi
        elif [[ -n $gpus ]]; then
            die "--gpus $gpus asked for, but the Docker engine has no GPU support (no NVIDIA runtime); install the NVIDIA Container Toolkit and restart Docker, or set FINETUNE_DOCKER_GPU=1 if --gpus works here"
        else
            note "the Docker engine has no GPU support: running on CPU"
        fi
        collect_mounts
        cmd=(docker run --rm --init)
        if [[ -t 0 && -t 1 && $dry_run == 0 ]]; then cmd+=(--interactive --tty); fi
        cmd+=("${gpu_flags[@]}" --shm-size "${FINETUNE_SHM_SIZE:-16g}")
        # the limits NCCL and pinned memory want, on GPU runs only: where the host cannot raise a limit,
        # asking for it stops the container from starting ("error setting rlimit")
        if ((${#gpu_flags[@]})); then cmd+=(--ulimit memlock=-1 --ulimit stack=67108864); fi
        container_user="$(docker_user)"
        cmd+=(--user "$container_user" --env HOME=/tmp)
        if [[ -f $REPO/.env ]]; then cmd+=(--env-file "$REPO/.env"); fi
        local name m
        for name in "${PASS_ENV[@]}"; do
            if [[ -n ${!name+set} ]]; then cmd+=(--env "$name"); fi
        done
        cmd+=(--volume "$(hf_cache_host):/cache/huggingface")
        for m in "${mounts[@]}"; do cmd+=(--volume "${m%:*}:${m%:*}:${m##*:}"); done
        cmd+=(--workdir "$(abs_path "$PWD")")
        if [[ -n ${FINETUNE_DOCKER_ARGS:-} ]]; then
            # shellcheck disable=SC2206  # split on purpose: extra docker run flags
            cmd+=(${FINETUNE_DOCKER_ARGS})
        fi
        inner_command python accelerate
        if [[ ${inner[0]} == accelerate ]]; then
            cmd+=(--entrypoint accelerate "$image" "${inner[@]:1}")
        else
            cmd+=("$image" "${inner[@]:3}")   # the image's ENTRYPOINT is python -m app
        fi
        ;;
    apptainer)
        local cli
        cli="$(container_cli)" || die "--mode apptainer: neither apptainer nor singularity is on PATH"
        image="${image:-$(default_image apptainer)}"
        collect_mounts
        cmd=("$cli" exec --nv --cleanenv)
        if [[ -f $REPO/.env ]]; then cmd+=(--env-file "$REPO/.env"); fi
        cmd+=(--bind "$(hf_cache_host):/cache/huggingface")
        for m in "${mounts[@]}"; do cmd+=(--bind "${m%:*}:${m%:*}:${m##*:}"); done
        cmd+=(--pwd "$(abs_path "$PWD")")
        if [[ -n ${FINETUNE_APPTAINER_ARGS:-} ]]; then
            # shellcheck disable=SC2206  # split on purpose: extra apptainer exec flags
            cmd+=(${FINETUNE_APPTAINER_ARGS})
        fi
        inner_command python accelerate
        cmd+=("$image" "${inner[@]}")
        ;;
    esac
}

cmd=()
inner=()
container_user=""
build_command

# Set-up steps that have to happen first (local .venv), as commands.
setup=()
if [[ $mode == local && ! -x $REPO/.venv/bin/python ]]; then
    py="${FINETUNE_PYTHON:-python3}"
    torch_pin="$(sed -nE 's/^torch==([^[:space:]#]+).*/\1/p' "$REPO/docker/constraints.txt" | head -n 1)"
    setup=("$py -m venv $(printf %q "$REPO/.venv")"
           "$(printf %q "$REPO/.venv/bin/pip") install torch==${torch_pin:-2.13.0}"
           "$(printf %q "$REPO/.venv/bin/pip") install -e $(printf %q "$REPO")")
fi
quoted() { local out; printf -v out '%q ' "$@"; echo "${out% }"; }

if ((dry_run)); then
    note "mode: $mode ($reason)"
    if [[ $mode == docker ]] && ! docker image inspect "$image" >/dev/null 2>&1; then
        note "warning: image $image is not built yet"
    fi
    if [[ $mode == apptainer && ! -e $image ]]; then
        note "warning: $image does not exist yet"
    fi
    for line in "${setup[@]}"; do echo "$line"; done
    quoted "${cmd[@]}"
    exit 0
fi

case "$mode" in
docker)
    if ! docker image inspect "$image" >/dev/null 2>&1; then
        if [[ $COMMAND == train ]]; then dockerfile=Dockerfile.train; else dockerfile=Dockerfile.infer; fi
        die "image $image is not built; build it with: docker build -f $dockerfile -t $image $(printf %q "$REPO")"
    fi
    mkdir -p "$(hf_cache_host)"
    ;;
apptainer)
    [[ -e $image ]] || die "Apptainer image $image not found; build it with: $(container_cli) build $(printf %q "$image") docker-daemon://$(default_image docker) (on a machine with Docker, after docker build; see docker/README.md)"
    mkdir -p "$(hf_cache_host)"
    for name in "${PASS_ENV[@]}"; do   # to the container through the environment, not the command line
        if [[ -n ${!name+set} ]]; then export "APPTAINERENV_${name}=${!name}" "SINGULARITYENV_${name}=${!name}"; fi
    done
    ;;
local)
    if ((${#setup[@]})); then
        py="${FINETUNE_PYTHON:-python3}"
        command -v "$py" >/dev/null 2>&1 || die "local mode needs $py (Python >= 3.11) to create .venv"
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "local mode needs Python >= 3.11 to create .venv; $py is $("$py" -c 'import sys; print(sys.version.split()[0])')"
        note "creating $REPO/.venv (first use)"
        for line in "${setup[@]}"; do
            echo "+ $line" >&2
            eval "$line" || die "setting up .venv failed at: $line"
        done
    fi
    ;;
esac

note "mode: $mode ($reason)"
echo "+ $(quoted "${cmd[@]}")" >&2
exec "${cmd[@]}"
