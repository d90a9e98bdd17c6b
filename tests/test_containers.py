"""The images, compose.yaml and the lock files, checked without a Docker engine.

- hadolint on both Dockerfiles, compose.yaml against the compose specification (offline schema);
- what the Dockerfiles promise (pinned bases that match the flash-attn wheel and the locks, non-root
  user, entry point, mount points, labels, no secrets, a build context that excludes .env);
- the lock files resolve for the images' platform and Python (pip --dry-run against PyPI), so that a
  pin that does not exist fails here rather than on a GPU box.
"""

from __future__ import annotations

import fnmatch
import html
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.train", "Dockerfile.infer"]
LOCKS = ["requirements-train.lock", "requirements-infer.lock", "requirements-vllm.lock"]
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
IMAGE_PYTHON = "3.12"  # CPython of the pytorch/pytorch:2.13.0 bases (Ubuntu 24.04)
# Every glibc platform tag the images accept (Ubuntu 24.04 has glibc 2.39; the locks aim at <= 2.35). pip
# does not widen --platform manylinux_2_35 to the older tags by itself, so they are all named.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_KEY|PRIVATE", re.I)


def tool(name: str) -> str:
    """A dev tool from this interpreter's environment (pip install -e '.[dev]'), else from PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; it comes with the dev extra: pip install -e '.[dev]'")
    return found


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / dockerfile).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def arg_defaults(dockerfile: str) -> dict[str, str]:
    defaults = {}
    for word, rest in instructions(dockerfile):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value
    return defaults


def env_values(dockerfile: str) -> dict[str, str]:
    values = {}
    for word, rest in instructions(dockerfile):
        if word == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                values[name] = value
    return values


def torch_pin() -> str:
    return re.search(r"^torch==(\S+)", (REPO / "docker/constraints.txt").read_text(), re.M).group(1)


# --- linters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_per_build_arguments_come_after_the_last_run(dockerfile):
    """VCS_REF and BUILD_DATE change with every commit or build; every RUN after an ARG has it in its environment,
    so declared early they would rebuild the lock layers each time. They only feed the labels, at the end."""
    steps = instructions(dockerfile)
    last_run = max(i for i, (word, _) in enumerate(steps) if word == "RUN")
    for name in ("VCS_REF", "BUILD_DATE"):
        declared = [i for i, (word, rest) in enumerate(steps) if word == "ARG" and rest.split("=")[0] == name]
        assert declared and min(declared) > last_run, f"{dockerfile}: ARG {name} before a RUN"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile: str):
    result = subprocess.run([tool("hadolint"), "--no-color", dockerfile], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_compose_file_valid_against_the_compose_spec():
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_parse():
    for script in ["run_training.sh", "run_inference.sh", "docker/launch.sh", "docker/lock.sh",
                   "docker/slurm/train.sbatch", "tests/containers/check.sh", "tests/containers/standin.sh", ".ci/run"]:
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
        if script != "docker/slurm/train.sbatch":
            assert os.access(REPO / script, os.X_OK), f"{script} is not executable"


def test_ci_runs_the_container_kit_only_when_asked():
    """.ci/run: the README's test command by default; the slow container kit first with CONTAINERS=1."""
    text = (REPO / ".ci/run").read_text()
    assert text.rstrip().endswith("exec ./run_tests.sh")
    assert 'if [[ ${CONTAINERS:-0} == 1 ]]; then\n    tests/containers/check.sh\nfi' in text


def test_container_kit_report(tmp_path: Path):
    """tests/containers/report.py: results.json and the table from check.sh's lines; a failed check is named."""
    sys.path.insert(0, str(REPO / "tests" / "containers"))
    try:
        import report
    finally:
        sys.path.pop(0)
    lines = [{"check": "build-train", "status": "pass", "seconds": 812.5, "detail": "4.1 GB", "figures": {"bytes": 4.1e9}},
             {"check": "resume", "status": "fail", "seconds": 90.0, "detail": "exit 137", "figures": {}},
             {"check": "launcher-apptainer", "status": "skip", "seconds": 0.0, "detail": "none here", "figures": {}}]
    (tmp_path / "checks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report.main(str(tmp_path / "checks.jsonl"), str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed"] == ["resume"] and results["checks"] == lines
    table = (tmp_path / "table.txt").read_text().splitlines()
    assert table[1].split()[:3] == ["build-train", "pass", "812.5"]
    assert table[-1] == "2 passed or skipped, 1 failed: resume"


# --- what the images promise -----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_contract(dockerfile: str):
    steps = instructions(dockerfile)
    last = {word: rest for word, rest in steps}
    assert json.loads(last["ENTRYPOINT"]) == ["python", "-m", "app"]
    assert last["WORKDIR"] == "/workspace"
    assert last["USER"] == "${APP_UID}:${APP_GID}"
    assert arg_defaults(dockerfile)["APP_UID"] not in ("", "0")
    assert env_values(dockerfile)["HF_HOME"] == "/cache/huggingface"
    assert set(json.loads(last["VOLUME"])) == {"/checkpoints", "/cache/huggingface"}
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "mkdir -p /workspace /data /checkpoints" in runs
    # a fresh hf-cache volume has hub/, which `transformers serve` scans for /v1/models (a 500 without it)
    assert '"${HF_HOME}/hub"' in runs and re.search(r'chown [^&]*"\$\{HF_HOME\}/hub"', runs)
    labels = " ".join(rest for word, rest in steps if word == "LABEL")
    for key in ["title", "description", "version", "revision", "created", "base.name"]:
        assert f"org.opencontainers.image.{key}=" in labels


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_no_secret_in_any_layer(dockerfile: str):
    for word, rest in instructions(dockerfile):
        if word == "ARG":
            assert not SECRET_NAME.search(rest.split("=")[0]), rest
        if word == "ENV":
            for name, _ in re.findall(r"(\w+)=(\S+)", rest):
                assert not SECRET_NAME.search(name), name
        if word in ("RUN", "COPY", "ADD"):
            assert ".env" not in rest.split() and "HF_TOKEN" not in rest and "WANDB_API_KEY" not in rest, rest


def test_training_base_matches_the_flash_attn_wheel_and_the_locks():
    args = arg_defaults("Dockerfile.train")
    base = args["BASE_IMAGE"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn9-devel", base)
    assert m, f"expected a pinned pytorch/pytorch devel tag, got {base}"
    torch_version, cuda_major, cuda_minor = m.groups()
    assert torch_version == torch_pin()

    wheel = args["FLASH_ATTN_URL"].rsplit("/", 1)[1].replace("%2B", "+")
    w = re.fullmatch(r"flash_attn-([\d.]+)\+cu(\d+)torch(\d+\.\d+)-cp(\d)(\d+)-cp\d+-linux_x86_64\.whl", wheel)
    assert w, wheel
    _, wheel_cuda, wheel_torch, py_major, py_minor = w.groups()
    assert wheel_torch == ".".join(torch_version.split(".")[:2])
    assert wheel_cuda == cuda_major + cuda_minor
    assert f"{py_major}.{py_minor}" == IMAGE_PYTHON
    assert re.fullmatch(r"[0-9a-f]{64}", args["FLASH_ATTN_SHA256"])
    runs = " ".join(rest for word, rest in instructions("Dockerfile.train") if word == "RUN")
    assert args["TORCH_CUDA"] == f"{cuda_major}.{cuda_minor}"
    assert re.search(rf'--python {IMAGE_PYTHON}\s+--cuda "\$\{{TORCH_CUDA\}}"', runs)
    assert "--require-hashes" in runs and "FLASH_ATTN_SHA256" in runs
    assert f'PYTHON_VERSION="${{PYTHON_VERSION:-{IMAGE_PYTHON}}}"' in (REPO / "docker/lock.sh").read_text()


def test_inference_image_is_a_runtime_base_with_vllm_behind_a_build_arg():
    args = arg_defaults("Dockerfile.infer")
    assert args["WITH_VLLM"] == "0"
    for name, cuda in (("BASE_IMAGE", "12.6"), ("VLLM_BASE_IMAGE", "13.0")):
        m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda([\d.]+)-cudnn9-runtime", args[name])
        assert m and m.group(1) == torch_pin() and m.group(2) == cuda, args[name]
    text = (REPO / "Dockerfile.infer").read_text()
    assert "devel" not in " ".join(rest for word, rest in instructions("Dockerfile.infer") if word in ("FROM", "ARG"))
    # the vLLM variant expects the CUDA 13.0 build and names its base when given another
    runs = " ".join(rest for word, rest in instructions("Dockerfile.infer") if word == "RUN")
    assert 'cuda="${TORCH_CUDA:-13.0}"' in runs and "--build-arg BASE_IMAGE=${VLLM_BASE_IMAGE}" in runs
    serve = compose()["x-serve-image"]["build"]["args"]
    assert default_of(serve["BASE_IMAGE"]) == args["VLLM_BASE_IMAGE"] and str(serve["WITH_VLLM"]) == "1"
    vllm_install = re.search(r'if \[ "\$\{WITH_VLLM\}" = 1 \]; then(.*?)else(.*?)fi', text, re.S)
    assert vllm_install and "requirements-vllm.lock" in vllm_install.group(1)
    assert "requirements-vllm.lock" not in vllm_install.group(2) and "gcc" not in vllm_install.group(2)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_stage_is_reachable_without_a_variable_stage_name(dockerfile: str):
    """podman 4.x (buildah) decides which stages a build uses before it expands build arguments: a FROM that
    names a stage through a variable (FROM base-vllm-${WITH_VLLM}) is then "image not known". One FROM per
    Dockerfile, on an image named by an ARG."""
    froms = [rest for word, rest in instructions(dockerfile) if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"], froms


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_run_steps_do_not_depend_on_shell(dockerfile: str, tmp_path: Path):
    """podman builds in its default OCI format drop SHELL (and with it bash and pipefail), so every RUN step is
    POSIX sh that parses under dash, with no pipe whose first command's failure could pass unseen."""
    steps = instructions(dockerfile)
    assert "SHELL" not in [word for word, _ in steps]
    sh = shutil.which("dash") or shutil.which("sh")
    for i, (word, rest) in enumerate(steps):
        if word != "RUN":
            continue
        assert not re.search(r"(?<![|])[|](?![|])", rest), f"{dockerfile}: a pipe in RUN {rest[:80]}"
        script = tmp_path / f"run{i}.sh"
        script.write_text(rest)
        parsed = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{dockerfile}: RUN {rest[:80]}: {parsed.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_cpu_build_arguments(dockerfile: str):
    """The CPU image: torch at the pinned version from TORCH_INDEX_URL onto a base without one, checked as a CPU
    build (TORCH_CUDA=none); flash-attn only where its URL is set."""
    args = arg_defaults(dockerfile)
    assert args["TORCH_INDEX_URL"] == ""
    runs = " ".join(rest for word, rest in instructions(dockerfile) if word == "RUN")
    assert 'pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r /tmp/build/constraints.txt' in runs
    assert [line for line in (REPO / "docker/constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")] == [f"torch=={torch_pin()}"]
    if dockerfile == "Dockerfile.train":
        assert 'if [ -n "${FLASH_ATTN_URL}" ]; then python -c "import flash_attn"; fi' in runs


def dockerignore_included(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories wins."""
    included = True
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pattern.startswith("**/"):
            regex = fnmatch.translate(pattern[3:])
            match = any(re.match(regex, c.rsplit("/", 1)[-1]) for c in candidates)
        else:
            match = any(re.match(regex, c) for c in candidates)
        if match:
            included = negate
    return included


def test_build_context_has_what_the_images_copy_and_no_secrets():
    for dockerfile in DOCKERFILES:
        for word, rest in instructions(dockerfile):
            if word != "COPY" or rest.startswith("--from"):
                continue
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                if "*" in source:
                    continue  # optional (README.md*)
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source}: missing"
                assert dockerignore_included(source), f"{dockerfile}: COPY {source}: excluded by .dockerignore"
    for private in [".env", ".git/config", ".venv/bin/python", "checkpoints/tiny/x.safetensors", "runs/a",
                    "data/private.csv", "app/__pycache__/x.pyc"]:
        assert not dockerignore_included(private), private
    for shipped in ["app/__main__.py", "configs/tiny.py", "data/sample/train.csv", "docker/launch.sh",
                    "pyproject.toml"]:
        assert dockerignore_included(shipped), shipped
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"


def test_base_check_script(tmp_path: Path):
    """docker/check_base.py, the first build step, against this environment's torch."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    constraints = tmp_path / "constraints.txt"
    import torch

    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    script = str(REPO / "docker/check_base.py")
    ok = subprocess.run([sys.executable, script, "--constraints", str(constraints), "--python", here,
                         "--no-cxx11-abi-check"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    constraints.write_text("torch==1.0.0\n")
    bad = subprocess.run([sys.executable, script, "--constraints", str(constraints), "--python", "2.7", "--cuda",
                          "99.9"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "Python" in bad.stderr and "torch 1.0.0" not in bad.stderr and "expected 1.0.0" in bad.stderr
    assert "expected 99.9" in bad.stderr
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    cuda = subprocess.run([sys.executable, script, "--constraints", str(constraints), "--python", here,
                           "--no-cxx11-abi-check", "--cuda", torch.version.cuda or "none"],
                          capture_output=True, text=True, timeout=120)
    assert cuda.returncode == 0, cuda.stderr  # "none": a CPU build, as the CPU image asks


# --- compose ----------------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def default_of(value: str) -> str:
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return m.group(1) if m else value


def test_compose_default_stack_trains_the_tiny_config_with_tensorboard():
    services = compose()["services"]
    assert {name for name, s in services.items() if not s.get("profiles")} == {"train", "tensorboard"}
    train = services["train"]
    assert train["command"][0] == "train" and (REPO / default_of(train["command"][1])).is_file()
    assert default_of(train["image"]) == f"finetune-runner-train:{VERSION}"
    assert train["build"]["dockerfile"] == "Dockerfile.train"
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert train["shm_size"]
    assert train["env_file"] == [{"path": ".env", "required": False}]
    volumes = train["volumes"]
    assert any(v.endswith(":/data:ro") for v in volumes)
    assert "checkpoints:/checkpoints" in volumes and "hf-cache:/cache/huggingface" in volumes
    assert set(compose()["volumes"]) == {"checkpoints", "hf-cache"}
    board = services["tensorboard"]
    assert board["entrypoint"] == ["tensorboard"] and "/checkpoints" in board["command"]
    assert all(p.startswith("127.0.0.1:") for p in board["ports"])


def test_compose_inference_and_cpu_variants_are_opt_in():
    services = compose()["services"]
    assert services["infer"]["profiles"] == ["infer"]
    assert services["infer"]["build"]["dockerfile"] == "Dockerfile.infer"
    assert default_of(services["infer"]["image"]) == f"finetune-runner-infer:{VERSION}"
    assert "deploy" in services["infer"]
    for name in ("train-cpu", "infer-cpu"):
        assert services[name]["profiles"] == ["cpu"] and "deploy" not in services[name]


def test_compose_serve_and_demo_services_are_opt_in_healthchecked_and_local():
    services = compose()["services"]
    assert services["serve"]["profiles"] == ["serve"] and services["serve"]["entrypoint"] == ["vllm", "serve"]
    assert "deploy" in services["serve"] and "deploy" not in services["serve-cpu"]
    assert services["serve-cpu"]["profiles"] == ["cpu"]
    assert services["serve-cpu"]["entrypoint"] == ["transformers", "serve"]
    assert services["demo"]["profiles"] == ["demo"] and services["demo-cpu"]["profiles"] == ["cpu"]
    assert "deploy" in services["demo"] and "deploy" not in services["demo-cpu"]
    for name in ("serve", "demo"):  # the cpu ones run the CPU image (test_cpu_profile_runs_the_cpu_image)
        build = services[name]["build"]
        assert build["dockerfile"] == "Dockerfile.infer" and str(build["args"]["WITH_VLLM"]) == "1"
    for name in ("serve", "serve-cpu", "demo", "demo-cpu"):
        s = services[name]
        assert any(v.startswith("checkpoints:/checkpoints") for v in s["volumes"])
        assert all(p.startswith("127.0.0.1:") for p in s["ports"])
        test = s["healthcheck"]["test"]
        assert test[0] == "CMD" and "http://127.0.0.1:" in test[-1]
    port = lambda s: s["ports"][0].rsplit(":", 1)[1]  # noqa: E731
    assert "/v1/models" in services["serve"]["healthcheck"]["test"][-1] and port(services["serve"]) == "8000"
    demo = services["demo"]
    assert demo["command"][0] == "demo" and "--port" in demo["command"] and "/health" in demo["healthcheck"]["test"][-1]
    assert demo["command"][demo["command"].index("--port") + 1] == port(demo)


def test_limits_that_a_host_may_refuse_are_on_gpu_services_only():
    """A ulimit the host cannot raise stops the container ("error setting rlimit type 8"): the CPU services ask
    for none, the GPU ones (NCCL, pinned memory) keep memlock and stack."""
    services = compose()["services"]
    for name, service in services.items():
        if "deploy" in service:
            assert service["ulimits"] == {"memlock": -1, "stack": 67108864}, name
        else:
            assert "ulimits" not in service, name


def test_cpu_profile_runs_the_cpu_image():
    services = compose()["services"]
    cpu = [name for name, s in services.items() if s.get("profiles") == ["cpu"]]
    assert set(cpu) == {"train-cpu", "tensorboard-cpu", "infer-cpu", "serve-cpu", "demo-cpu"}
    for name in cpu:
        s = services[name]
        assert default_of(s["image"]) == f"finetune-runner-train:{VERSION}-cpu", name
        assert s["build"]["dockerfile"] == "Dockerfile.train" and "deploy" not in s
        args = {k: default_of(str(v)) for k, v in s["build"]["args"].items()}
        assert args == {"BASE_IMAGE": "python:3.12-slim-bookworm", "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu",
                        "TORCH_CUDA": "none", "FLASH_ATTN_URL": ""}
    for name in ("infer-cpu", "demo-cpu"):  # they read the checkpoint train-cpu writes
        assert services[name]["depends_on"] == {"train-cpu": {"condition": "service_completed_successfully"}}


def test_env_example_documents_every_compose_variable_and_holds_no_secret():
    text = (REPO / ".env.example").read_text()
    used = set(re.findall(r"\$\{(\w+)", (REPO / "compose.yaml").read_text()))
    documented = set(re.findall(r"^#?\s*(\w+)=", text, re.M))
    assert used <= documented, used - documented
    assert {"HF_TOKEN", "WANDB_API_KEY"} <= documented
    for line in text.splitlines():
        if line and not line.startswith("#"):
            pytest.fail(f".env.example must only hold commented examples, got: {line}")


# --- lock files -------------------------------------------------------------------------------------------


def locked(lock: str) -> dict[str, str]:
    text = (REPO / "docker" / lock).read_text()
    assert "docker/lock.sh" in text.splitlines()[1], "regenerate with docker/lock.sh"
    pins = {}
    for block in re.split(r"\n(?=[a-z0-9])", text):
        first = block.splitlines()[0]
        if first.startswith("#"):
            continue
        m = re.match(r"([a-z0-9][a-z0-9._-]*)==(\S+) \\$", first)
        assert m, f"{lock}: not an exact pin: {first}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), f"{lock}: no hash for {first}"
        pins[m.group(1)] = m.group(2)
    return pins


@pytest.mark.parametrize("lock", LOCKS)
def test_locks_are_exact_hashed_and_leave_torch_to_the_base(lock: str):
    pins = locked(lock)
    for name in pins:
        assert name not in ("torch", "triton") and not name.startswith(("nvidia-cublas", "nvidia-cudnn-cu",
                                                                        "nvidia-nccl", "nvidia-cuda-runtime")), name
    project = (REPO / "pyproject.toml").read_text()
    for name, version in re.findall(r'"([a-z0-9-]+)==([^"]+)"', project.split("[project.optional-dependencies]")[0]):
        assert pins.get(name) == version, f"{lock}: {name} should be {version} as in pyproject.toml"
    assert "bitsandbytes" in pins
    if lock == "requirements-train.lock":
        assert {"einops", "wandb"} <= set(pins)
    if lock == "requirements-vllm.lock":
        assert "vllm" in pins


@pytest.fixture(scope="session")
def pip_for_checks(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A current pip: pip 23.x checks Requires-Python against the running interpreter even with --python-version."""
    if os.environ.get("FINETUNE_SKIP_NETWORK_TESTS") == "1":
        pytest.skip("FINETUNE_SKIP_NETWORK_TESTS=1: the lock resolution check needs PyPI")
    venv = tmp_path_factory.mktemp("pip-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180)
    pip = str(venv / "bin" / "pip")
    result = subprocess.run([pip, "install", "--quiet", "pip==26.3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, "could not install pip 26.3 from PyPI:\n" + result.stderr[-2000:]
    return pip


def pip_dry_run(pip: str, requirements: Path, target: Path) -> subprocess.CompletedProcess:
    command = [pip, "install", "--dry-run", "--ignore-installed", "--no-deps", "--require-hashes", "--only-binary=:all:",
               "--python-version", IMAGE_PYTHON, "--implementation", "cp", "--target", str(target),
               "--progress-bar", "off", "-r", str(requirements)]
    for platform in [*PLATFORMS, "any"]:
        command += ["--platform", platform]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("lock", ["requirements-train.lock", "requirements-infer.lock"])
def test_lock_resolves_for_the_image_platform(lock: str, pip_for_checks: str, tmp_path: Path):
    """Every pin exists as a wheel for CPython 3.12 / x86_64 glibc 2.35, with the locked hashes."""
    result = pip_dry_run(pip_for_checks, REPO / "docker" / lock, tmp_path / "target")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Would install" in result.stdout


def index_check(lock: str) -> list[str]:
    """Every pin has a wheel for CPython 3.12 / x86_64 glibc <= 2.35 on the package index, allowing Python
    3.12, whose sha256 is one of the lock's hashes: the resolution check without downloading a file."""
    from concurrent.futures import ThreadPoolExecutor

    from packaging import tags
    from packaging.specifiers import SpecifierSet
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    supported = set(tags.cpython_tags((3, 12), platforms=PLATFORMS))
    supported |= set(tags.compatible_tags((3, 12), "cp312", PLATFORMS))
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    text = (REPO / "docker" / lock).read_text()
    blocks = {m.group(1): (m.group(2), set(re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3))))
              for m in re.finditer(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\\n((?:\s+--hash=\S+.*\n)+)", text, re.M)}
    assert len(blocks) == len(locked(lock))

    def check(item: tuple[str, tuple[str, set[str]]]) -> str | None:
        name, (version, hashes) = item
        with urllib.request.urlopen(f"{index}/{canonicalize_name(name)}/", timeout=120) as response:
            page = response.read().decode()
        found = []
        for href, sha, attrs in re.findall(r'<a href="([^"#]+)#sha256=([0-9a-f]{64})"([^>]*)>', page):
            filename = urllib.parse.unquote(href.rsplit("/", 1)[1])
            if not filename.endswith(".whl"):
                continue
            try:
                _, wheel_version, _, wheel_tags = parse_wheel_filename(filename)
            except InvalidWheelFilename:  # ancient uploads with non-standard names
                continue
            if str(wheel_version) != version or not (wheel_tags & supported):
                continue
            requires = re.search(r'data-requires-python="([^"]*)"', attrs)
            if requires and not SpecifierSet(html.unescape(requires.group(1))).contains("3.12.0"):
                continue
            found.append(sha)
        if not found:
            return f"{name}=={version}: no wheel for CPython 3.12 on x86_64 glibc <= 2.35"
        if not set(found) & hashes:
            return f"{name}=={version}: none of the locked hashes is a compatible wheel on the index"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [problem for problem in pool.map(check, sorted(blocks.items())) if problem]


def test_vllm_lock_resolves_for_the_image_platform(pip_for_checks: str):
    """The vLLM lock, on the index's file list: checking it with pip would download several GB of CUDA
    wheels (vllm, flashinfer, cutlass; the index here serves no PEP 658 metadata), so this reads each
    package's page instead: a compatible wheel, Python 3.12 allowed, a locked hash that matches it."""
    problems = index_check("requirements-vllm.lock")
    assert not problems, "\n".join(problems)


def pip_resolve(pip: str, requirements: list[Path], target: Path, *extra: str) -> subprocess.CompletedProcess:
    """pip's full resolution (dependencies included) for the image's Python and platform, nothing installed."""
    command = [pip, "install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--python-version",
               IMAGE_PYTHON, "--implementation", "cp", "--target", str(target), "--progress-bar", "off", *extra]
    for platform in [*PLATFORMS, "any"]:
        command += ["--platform", platform]
    for path in requirements:
        command += ["-r", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def base_torch(pip_for_checks: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the base image provides: torch at the pin and its dependency tree from the index, as
    {name: "name==version --hash=sha256:..."} lines (PyPI's torch 2.13.0, the CUDA 13.0 build)."""
    work = tmp_path_factory.mktemp("base-torch")
    (work / "torch.txt").write_text(f"torch=={torch_pin()}\n")
    result = pip_resolve(pip_for_checks, [work / "torch.txt"], work / "target", "--report", str(work / "report.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    pins = {}
    for item in json.loads((work / "report.json").read_text())["install"]:
        name = item["metadata"]["name"].lower().replace("_", "-")
        sha = item["download_info"]["archive_info"]["hashes"]["sha256"]
        pins[name] = f"{name}=={item['metadata']['version']} --hash=sha256:{sha}"
    return pins


def resolve_over_the_base(lock: Path, base: dict[str, str], pip: str, work: Path) -> subprocess.CompletedProcess:
    """The image's install, resolved: the lock over the base's packages (the lock's own pins win, as with
    `pip install --no-deps` in the Dockerfile), every dependency pinned with a hash (--require-hashes)."""
    names = {m.group(1) for m in re.finditer(r"^([a-z0-9][a-z0-9._-]*)==", lock.read_text(), re.M)}
    (work / "base.txt").write_text("".join(line + "\n" for name, line in base.items() if name not in names))
    return pip_resolve(pip, [lock, work / "base.txt"], work / "target", "--require-hashes")


@pytest.mark.slow
@pytest.mark.parametrize("lock", LOCKS)
def test_lock_resolves_with_its_dependencies_over_the_base_torch(lock: str, base_torch: dict[str, str],
                                                                 pip_for_checks: str, tmp_path: Path):
    """Every dependency of every locked package is either locked (with a hash) or in the base at a version that
    satisfies it: a dependency left out as "comes with the base" at the wrong version (vLLM's cuda-python needs
    cuda-bindings ~=13.4.4, torch brings 13.5.0) fails here instead of at the image's `pip check`."""
    result = resolve_over_the_base(REPO / "docker" / lock, base_torch, pip_for_checks, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Would install" in result.stdout


def test_index_check_agrees_with_pip_on_the_inference_lock(pip_for_checks: str):
    assert index_check("requirements-infer.lock") == []
