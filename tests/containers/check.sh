#!/usr/bin/env bash
# Container kit: builds both images (and both inference variants, and the CPU image) with podman from a stand-in
# base, then uses them as a user would and checks what the images promise (tests/containers/README.md).
#
#   tests/containers/check.sh            # everything from scratch (about 60 min on 2 loaded cores, ~35 GB; root, apt, PyPI)
#   tests/containers/check.sh --keep     # reuse the stand-in bases and the layer cache of an earlier run
#   tests/containers/check.sh --only build,image   # a subset of: setup base build secrets image resume compose launcher
#
# Writes results.json and table.txt to --out DIR (default results/containers-<time>), logs under DIR/logs, prints
# the table and exits non-zero when a check failed. Run as root on Debian 12 (podman 4.3 from apt, runc).
# shellcheck disable=SC2317  # the steps are functions called through "$step"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
REPO="$PWD"

KEEP=0
ONLY="setup,base,build,secrets,image,resume,compose,launcher"
OUT="results/containers-$(date -u +%Y%m%dT%H%M%SZ)"
while (($#)); do
    case "$1" in
        --keep) KEEP=1; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "check.sh: unknown argument $1 (--keep, --only LIST, --out DIR)" >&2; exit 2 ;;
    esac
done
[[ $(id -u) == 0 ]] || { echo "check.sh: run as root (rootful podman, apt-get, debootstrap)" >&2; exit 2; }

WORK="${FINETUNE_CONTAINERS_WORK:-/var/tmp/finetune-runner-containers}"
mkdir -p "$WORK" "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
RESULTS="$OUT/checks.jsonl"
: >"$RESULTS"
export CONTAINERS_CONF="$WORK/conf/containers.conf" CONTAINERS_STORAGE_CONF="$WORK/conf/storage.conf"
VERSION="$(sed -nE 's/^version[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' pyproject.toml | head -n 1)"
PY_BASE=localhost/finetune-runner-standin:python3.12
TORCH_BASE=localhost/finetune-runner-standin:torch2.13.0
TRAIN=localhost/finetune-runner-train:$VERSION
INFER=localhost/finetune-runner-infer:$VERSION
VLLM=localhost/finetune-runner-infer:$VERSION-vllm
CPU=localhost/finetune-runner-train:$VERSION-cpu
PROJECT=finetune-runner-kit   # compose project: never the user's own finetune-runner volumes
# the tiny recipe, shortened (FINETUNE_KIT_EPOCHS, default 1 of its 10 epochs: 50 steps) so that the kit's six
# training runs fit on a loaded 2-core machine; a config file, because compose's train-cpu takes TRAIN_CONFIG only
EPOCHS="${FINETUNE_KIT_EPOCHS:-1}"
CONFIG=configs/_kit_tiny.py
CONFIG_MOUNT=(-v "$REPO/$CONFIG:/workspace/$CONFIG:ro")   # written after the builds: never in an image
# marker secrets: set while building and running, must appear in no layer and no image config; kept in the work
# folder, so that a --keep run checks images built by an earlier one against the markers they were built with
if [[ ! -f $WORK/markers.env ]]; then
    printf 'HF_TOKEN=hf_kitmarker%ssecret\nWANDB_API_KEY=wandbkitmarker%skey\n' "$(date +%s%N)" "$(date +%s%N)" >"$WORK/markers.env"
fi
HF_TOKEN="$(sed -n 's/^HF_TOKEN=//p' "$WORK/markers.env")"
WANDB_API_KEY="$(sed -n 's/^WANDB_API_KEY=//p' "$WORK/markers.env")"
export HF_TOKEN WANDB_API_KEY
failed=0

want() { [[ ",$ONLY," == *",$1,"* ]]; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
record() {  # NAME STATUS SECONDS DETAIL [JSON-FIGURES]
    local figures="${5:-}"
    [[ -n $figures ]] || figures='{}'
    python3 -c 'import json, sys; print(json.dumps({"check": sys.argv[1], "status": sys.argv[2], "seconds": float(sys.argv[3]),
        "detail": sys.argv[4], "figures": json.loads(sys.argv[5])}))' "$1" "$2" "$3" "$4" "$figures" >>"$RESULTS"
    [[ $2 == fail ]] && failed=1
    log "$1: $2 ($4)"
}
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }
size_of() { podman image inspect --format '{{.Size}}' "$1" 2>/dev/null || echo 0; }
wait_http() {  # URL TIMEOUT_S: 0 when it answers 200 within the time
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1") == 200 ]] && return 0
        sleep 2
    done
    return 1
}

kit_config() {
    printf '# written by tests/containers/check.sh, removed when it ends\nbase_config = "tiny.py"\nnum_epochs = %s\n' \
        "$EPOCHS" >"$CONFIG"
}

# ---------------------------------------------------------------------------------------------------------------
setup() {
    local t0; t0=$(now)
    # podman from Debian with runc (crun refuses hybrid cgroups here), debootstrap for the stand-in base
    local pkgs=(podman runc debootstrap uidmap slirp4netns fuse-overlayfs containernetworking-plugins iptables catatonit curl)
    if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}") \
            >"$OUT/logs/apt.log" 2>&1 || { record setup fail "$(since "$t0")" "apt-get install failed: $OUT/logs/apt.log"; return 1; }
    fi
    mkdir -p "$WORK/conf"
    # limits the VM lets a container have (it refuses to raise nofile/nproc past these), overlay storage
    cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    cat >"$CONTAINERS_STORAGE_CONF" <<'EOF'
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
    # podman-compose 1.x (Debian's 1.0.3 has no --profile) and the docker CLI's API through podman's socket
    if [[ ! -x $WORK/tools/bin/podman-compose ]]; then
        python3 -m venv "$WORK/tools" && "$WORK/tools/bin/pip" install -q "podman-compose==1.6.0" >"$OUT/logs/pip-tools.log" 2>&1 ||
            { record setup fail "$(since "$t0")" "pip install podman-compose failed: $OUT/logs/pip-tools.log"; return 1; }
    fi
    record setup pass "$(since "$t0")" "$(podman --version), $("$WORK/tools/bin/podman-compose" --version 2>/dev/null | head -n 1)"
}

base() {
    local t0; t0=$(now)
    if ((KEEP)) && podman image exists "$TORCH_BASE"; then
        record base pass "$(since "$t0")" "kept $PY_BASE and $TORCH_BASE"
        return 0
    fi
    tests/containers/standin.sh python "$PY_BASE" "$WORK" >"$OUT/logs/base.log" 2>&1 &&
        tests/containers/standin.sh torch "$TORCH_BASE" "$PY_BASE" "$WORK" >>"$OUT/logs/base.log" 2>&1 ||
        { record base fail "$(since "$t0")" "stand-in base: $OUT/logs/base.log"; return 1; }
    record base pass "$(since "$t0")" "$(grep -h '^stand-in' "$OUT/logs/base.log" | paste -sd ';' -)" \
        "{\"python_base_bytes\": $(size_of "$PY_BASE"), \"torch_base_bytes\": $(size_of "$TORCH_BASE")}"
}

cpu_torch_index() {  # PyTorch's CPU index where it answers, else PyPI's (CUDA) build: the documented fallback
    if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 10 https://download.pytorch.org/whl/cpu/torch/) == 200 ]]; then
        echo "https://download.pytorch.org/whl/cpu none"
    else
        echo "https://pypi.org/simple 13.0"
    fi
}

build_one() {  # NAME TAG DOCKERFILE BUILD-ARGS...: default podman format (OCI), no --skip-unused-stages, no SHELL help
    local name=$1 tag=$2 file=$3 t0
    shift 3
    t0=$(now)
    local args=()
    for a in "$@"; do args+=(--build-arg "$a"); done
    # no VCS_REF/BUILD_DATE: the labels come before the lock installs, so a new commit would rebuild those layers
    if podman build --layers --pull=never -f "$file" -t "$tag" "${args[@]}" . >"$OUT/logs/build-$name.log" 2>&1; then
        record "build-$name" pass "$(since "$t0")" "$tag, $(($(size_of "$tag") / 1000000)) MB" \
            "{\"bytes\": $(size_of "$tag"), \"build_args\": \"$*\"}"
    else
        record "build-$name" fail "$(since "$t0")" "$(tail -n 3 "$OUT/logs/build-$name.log" | tr '\n' ' ' | cut -c1-300)"
    fi
}

build() {
    # a .env in the build context with the marker secrets: .dockerignore must keep it out of every layer
    if [[ ! -e .env ]]; then printf 'HF_TOKEN=%s\nWANDB_API_KEY=%s\n' "$HF_TOKEN" "$WANDB_API_KEY" >.env; KIT_ENV=1; fi
    build_one train "$TRAIN" Dockerfile.train "BASE_IMAGE=$TORCH_BASE" TORCH_CUDA=13.0 FLASH_ATTN_URL=
    build_one infer "$INFER" Dockerfile.infer "BASE_IMAGE=$TORCH_BASE" TORCH_CUDA=13.0
    build_one vllm "$VLLM" Dockerfile.infer WITH_VLLM=1 "BASE_IMAGE=$TORCH_BASE"
    read -r index cuda < <(cpu_torch_index)
    build_one cpu "$CPU" Dockerfile.train "BASE_IMAGE=$PY_BASE" "TORCH_INDEX_URL=$index" "TORCH_CUDA=$cuda" FLASH_ATTN_URL=
    if podman image exists "$VLLM"; then
        local t0; t0=$(now)
        if podman run --rm --entrypoint python "$VLLM" -c 'import vllm; print(vllm.__version__)' >"$OUT/logs/vllm-import.log" 2>&1; then
            record vllm-import pass "$(since "$t0")" "vllm $(tail -n 1 "$OUT/logs/vllm-import.log")"
        else
            record vllm-import fail "$(since "$t0")" "$(tail -n 2 "$OUT/logs/vllm-import.log" | tr '\n' ' ')"
        fi
    fi
}

secrets() {  # no marker in any image config, history or file the Dockerfiles add
    local t0 tag found=""; t0=$(now)
    for tag in "$TRAIN" "$INFER" "$VLLM" "$CPU"; do
        podman image exists "$tag" || continue
        if { podman image inspect "$tag"; podman history --no-trunc "$tag"; } | grep -qF -e "$HF_TOKEN" -e "$WANDB_API_KEY"; then
            found+="$tag config; "
        fi
        local mnt; mnt="$(podman image mount "$tag")"
        if grep -rlsF -e "$HF_TOKEN" -e "$WANDB_API_KEY" "$mnt/workspace" "$mnt/home" "$mnt/etc" "$mnt/tmp" "$mnt/root" \
                "$mnt/data" "$mnt/usr/local/lib/python3.12/site-packages/app" >/dev/null 2>&1; then
            found+="$tag files; "
        fi
        podman image unmount "$tag" >/dev/null
    done
    if [[ -z $found ]]; then record secrets pass "$(since "$t0")" "no marker token or key in any image config, history or added file"
    else record secrets fail "$(since "$t0")" "marker found: $found"; fi
}

local_python() {  # the local venv the ratio compares against: .venv, else one made like run_tests.sh makes it
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import app, torch' 2>/dev/null; then echo "$REPO/.venv/bin/python"; return; fi
    if [[ ! -x $WORK/local-venv/bin/python ]]; then
        python3 -m venv "$WORK/local-venv" && "$WORK/local-venv/bin/pip" install -q torch==2.13.0 &&
            "$WORK/local-venv/bin/pip" install -q -e . >"$OUT/logs/local-venv.log" 2>&1
    fi
    echo "$WORK/local-venv/bin/python"
}

image() {  # the image's own train and infer, as the non-root user, outputs on the volume; the ratio to the local venv
    local t0 vol py local_s image_s uid
    vol=finetune-runner-kit-checkpoints
    podman volume rm -f "$vol" >/dev/null 2>&1
    t0=$(now)
    uid="$(podman run --rm -v "$vol:/checkpoints" --entrypoint sh "$TRAIN" -c 'id -u; touch /checkpoints/w && echo writable')"
    if [[ $uid == $'1000\nwritable' ]]; then record image-user pass "$(since "$t0")" "uid 1000 inside, /checkpoints writable"
    else record image-user fail "$(since "$t0")" "got: $uid"; fi

    py="$(local_python)"
    rm -rf "$WORK/local-run" && mkdir -p "$WORK/local-run"
    t0=$(now)
    "$py" -m app train "$CONFIG" "--out_dir=$WORK/local-run/tiny" "--model_name=$WORK/local-run/tiny-model" \
        >"$OUT/logs/local-train.log" 2>&1
    local_s=$(since "$t0")
    t0=$(now)
    if podman run --rm -e HF_TOKEN -e WANDB_API_KEY -v "$vol:/checkpoints" "${CONFIG_MOUNT[@]}" "$TRAIN" train "$CONFIG" >"$OUT/logs/image-train.log" 2>&1; then
        image_s=$(since "$t0")
        local ratio; ratio=$(python3 -c "print(round($image_s / $local_s, 2))")
        record image-train pass "$image_s" "train $CONFIG ($EPOCHS epoch of tiny.py) in $TRAIN: ${image_s}s, local venv ${local_s}s, ratio ${ratio}x" \
            "{\"image_s\": $image_s, \"local_s\": $local_s, \"ratio\": $ratio}"
    else
        record image-train fail "$(since "$t0")" "$(tail -n 2 "$OUT/logs/image-train.log" | tr '\n' ' ')"
    fi
    t0=$(now)
    if podman run --rm -v "$vol:/checkpoints" "$INFER" infer data/sample/test.csv --checkpoint checkpoints/tiny \
            --output checkpoints/tiny/predictions.csv >"$OUT/logs/image-infer.log" 2>&1 &&
        rows=$(podman run --rm -v "$vol:/checkpoints" --entrypoint sh "$INFER" -c 'wc -l < /checkpoints/tiny/predictions.csv') &&
        ((rows > 1)); then
        record image-infer pass "$(since "$t0")" "infer in $INFER: $rows lines in the volume's checkpoints/tiny/predictions.csv"
    else
        record image-infer fail "$(since "$t0")" "$(tail -n 2 "$OUT/logs/image-infer.log" | tr '\n' ' ')"
    fi
}

resume() {  # SIGTERM to the training container: it checkpoints and exits; the same command resumes from there
    local t0 vol=finetune-runner-kit-resume name=finetune-runner-kit-train mp
    podman volume rm -f "$vol" >/dev/null 2>&1
    podman rm -f "$name" >/dev/null 2>&1
    podman volume create "$vol" >/dev/null
    mp="$(podman volume inspect --format '{{.Mountpoint}}' "$vol")"
    t0=$(now)
    podman run -d --name "$name" -v "$vol:/checkpoints" "${CONFIG_MOUNT[@]}" "$TRAIN" train "$CONFIG" --save_every=20 >/dev/null
    local deadline=$((SECONDS + 900))
    until compgen -G "$mp/tiny/checkpoints/step_*" >/dev/null || ((SECONDS > deadline)); do sleep 2; done
    podman stop -t 300 "$name" >/dev/null
    local code; code="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
    podman logs "$name" >"$OUT/logs/resume-stop.log" 2>&1
    podman rm "$name" >/dev/null
    local stopped; stopped="$(grep -oE 'stopped by SIGTERM at step [0-9]+' "$OUT/logs/resume-stop.log" | tail -n 1)"
    podman run --rm -v "$vol:/checkpoints" "${CONFIG_MOUNT[@]}" "$TRAIN" train "$CONFIG" --save_every=20 >"$OUT/logs/resume-rerun.log" 2>&1
    local rerun=$? resumed; resumed="$(grep -oE 'resumed from .* at step [0-9]+' "$OUT/logs/resume-rerun.log" | tail -n 1)"
    if [[ $code == 143 && -n $stopped && $rerun == 0 && ${resumed##* } == "${stopped##* }" ]]; then
        record resume pass "$(since "$t0")" "exit 143, $stopped; re-run $resumed and finished"
    else
        record resume fail "$(since "$t0")" "exit $code, '${stopped:-no stop line}', re-run rc $rerun, '${resumed:-no resume line}'"
    fi
    podman volume rm -f "$vol" >/dev/null 2>&1
}

compose_cmd() { "$WORK/tools/bin/podman-compose" -p "$PROJECT" "$@"; }

compose() {  # the cpu profile as a user runs it: train, TensorBoard, the demo, inference, and transformers serve
    local t0 cid
    export CPU_IMAGE="$CPU" TRAIN_CONFIG="$CONFIG" TENSORBOARD_PORT=16006 DEMO_PORT=17860 SERVE_PORT=18000
    compose_cmd --profile cpu down -v >/dev/null 2>&1
    t0=$(now)
    compose_cmd --profile cpu up -d train-cpu tensorboard-cpu demo-cpu >"$OUT/logs/compose-up.log" 2>&1
    if wait_http http://127.0.0.1:17860/health 1500; then
        local up_s; up_s=$(since "$t0")
        record compose-demo pass "$up_s" "compose --profile cpu up: train-cpu finished, demo-cpu answered /health after ${up_s}s" \
            "{\"up_to_healthy_demo_s\": $up_s}"
    else
        record compose-demo fail "$(since "$t0")" "demo-cpu did not answer /health: $OUT/logs/compose-up.log"
    fi
    if wait_http http://127.0.0.1:16006/ 120; then record compose-tensorboard pass 0 "tensorboard-cpu answered 200"
    else record compose-tensorboard fail 0 "tensorboard-cpu did not answer"; fi
    cid="$(podman ps -q --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=demo-cpu")"
    local uid; uid="$(podman exec "$cid" id -u 2>/dev/null)"
    if [[ $uid == 1000 ]]; then record compose-user pass 0 "demo-cpu runs as uid 1000"
    else record compose-user fail 0 "demo-cpu runs as '${uid}'"; fi
    t0=$(now)
    if compose_cmd --profile cpu run --rm --no-deps infer-cpu >"$OUT/logs/compose-infer.log" 2>&1; then
        record compose-infer pass "$(since "$t0")" "infer-cpu wrote checkpoints/tiny/predictions.csv"
    else record compose-infer fail "$(since "$t0")" "$(tail -n 2 "$OUT/logs/compose-infer.log" | tr '\n' ' ')"; fi
    t0=$(now)
    compose_cmd --profile cpu run --rm --no-deps infer-cpu export checkpoints/tiny --output checkpoints/export/tiny --merge \
        >"$OUT/logs/compose-export.log" 2>&1
    compose_cmd --profile cpu up -d serve-cpu >>"$OUT/logs/compose-up.log" 2>&1
    if wait_http http://127.0.0.1:18000/v1/models 600 &&
        podman run --rm --network host --entrypoint python "$CPU" -c '
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:18000/v1", api_key="none")
# /v1/models lists the Hugging Face cache; the served export is asked for by its path
model = "/checkpoints/export/tiny"
reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A man plays a guitar."}], max_tokens=16)
print(model, repr(reply.choices[0].message.content))' >"$OUT/logs/serve-client.log" 2>&1; then
        record compose-serve pass "$(since "$t0")" "serve-cpu answered /v1/chat/completions: $(tail -n 1 "$OUT/logs/serve-client.log" | cut -c1-120)"
    else
        record compose-serve fail "$(since "$t0")" "$(tail -n 2 "$OUT/logs/serve-client.log" 2>/dev/null | tr '\n' ' ')"
    fi
    compose_cmd --profile cpu logs >"$OUT/logs/compose-services.log" 2>&1
    compose_cmd --profile cpu down -v >/dev/null 2>&1
}

launcher() {  # ./run_training.sh --mode docker through podman's docker socket; apptainer where one runs
    local t0 sock="$WORK/podman.sock" pid
    t0=$(now)
    rm -f "$sock"
    podman system service --time=0 "unix://$sock" >"$OUT/logs/podman-service.log" 2>&1 &
    pid=$!
    local deadline=$((SECONDS + 30))
    until [[ -S $sock ]] || ((SECONDS > deadline)); do sleep 1; done
    export DOCKER_HOST="unix://$sock"
    # folders of another user (the owner a launcher must never change), and root's own
    local home="$WORK/launcher" before after
    rm -rf "$home" && mkdir -p "$home/hf" "$home/runs"
    chown 4242:4242 "$home/hf"
    before="$(stat -c '%n %u:%g' "$REPO" "$home" "$home/hf" "$home/runs")"
    if HF_HOME="$home/hf" ./run_training.sh "$CONFIG" --mode docker --image "$TRAIN" \
            "--out_dir=$home/runs/tiny" "--model_name=$home/runs/tiny-model" >"$OUT/logs/launcher-docker.log" 2>&1 &&
        [[ -n $(compgen -G "$home/runs/tiny/checkpoints/*") ]]; then
        after="$(stat -c '%n %u:%g' "$REPO" "$home" "$home/hf" "$home/runs")"
        if [[ $before == "$after" ]]; then
            record launcher-docker pass "$(since "$t0")" "run_training.sh --mode docker (podman socket): checkpoints in $home/runs/tiny, every host folder kept its owner"
        else
            record launcher-docker fail "$(since "$t0")" "owners changed: $before -> $after"
        fi
    else
        record launcher-docker fail "$(since "$t0")" "$(tail -n 2 "$OUT/logs/launcher-docker.log" | tr '\n' ' ')"
    fi
    kill "$pid" 2>/dev/null
    unset DOCKER_HOST
    if command -v apptainer >/dev/null 2>&1 || command -v singularity >/dev/null 2>&1; then
        t0=$(now)
        local sif="$WORK/finetune-runner-train_$VERSION.sif"
        podman save --format docker-archive -o "$WORK/train.tar" "$TRAIN" &&
            apptainer build --force "$sif" "docker-archive://$WORK/train.tar" >"$OUT/logs/apptainer-build.log" 2>&1
        rm -f "$WORK/train.tar"
        if ./run_training.sh "$CONFIG" --mode apptainer --image "$sif" "--out_dir=$home/runs/tiny-apptainer" \
                "--model_name=$home/runs/tiny-model" >"$OUT/logs/launcher-apptainer.log" 2>&1; then
            record launcher-apptainer pass "$(since "$t0")" "run_training.sh --mode apptainer"
        else
            record launcher-apptainer fail "$(since "$t0")" "$(tail -n 2 "$OUT/logs/launcher-apptainer.log" | tr '\n' ' ')"
        fi
    else
        record launcher-apptainer skip 0 "no apptainer/singularity on this host (Debian 12 has none; tests/containers/README.md)"
    fi
}

cleanup() { if [[ ${KIT_ENV:-0} == 1 ]]; then rm -f .env; fi; rm -f "$CONFIG"; }
trap cleanup EXIT

if ((!KEEP)) && want base; then
    for tag in "$TRAIN" "$INFER" "$VLLM" "$CPU" "$TORCH_BASE" "$PY_BASE"; do podman rmi -f "$tag" >/dev/null 2>&1; done
    podman image prune -f >/dev/null 2>&1
fi
for step in setup base build secrets image resume compose launcher; do
    if want "$step"; then
        log "== $step"
        case $step in image|resume|compose|launcher) kit_config ;; esac
        "$step" || { [[ $step == setup || $step == base ]] && break; }
    fi
done
python3 tests/containers/report.py "$RESULTS" "$OUT"
exit "$failed"
