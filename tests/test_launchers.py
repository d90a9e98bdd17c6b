"""run_training.sh / run_inference.sh (docker/launch.sh) and docker/slurm/train.sbatch.

The command each mode builds is checked against stand-in `docker`, `apptainer`, `singularity`,
`python3`, `srun` and `scontrol` executables that record their arguments, on a PATH that holds only
them and the few system tools the scripts use, in a copy of the launcher files. Local mode also runs
for real once, on the tiny config, when the training engine is importable.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_FILES = ["run_training.sh", "run_inference.sh", "docker/launch.sh", "docker/constraints.txt",
                  "pyproject.toml", "docker/slurm/train.sbatch"]
SYSTEM_TOOLS = ["bash", "sh", "env", "sed", "head", "dirname", "basename", "realpath", "id", "timeout", "grep",
                "mkdir", "cat", "hostname", "sleep", "kill", "chown"]
VERSION = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
               if line.startswith("version"))
TRAIN_IMAGE = f"finetune-runner-train:{VERSION}"
INFER_IMAGE = f"finetune-runner-infer:{VERSION}"

# One stand-in for every tool: it appends {"tool", "argv", "env"} to $STUB_LOG and acts on a few
# STUB_* variables so that each test can shape the machine it pretends to be.
STUB = r'''#!{python}
import json, os, signal, sys, time
from pathlib import Path

tool = Path(sys.argv[0]).name
args = sys.argv[1:]
env = {{k: v for k, v in os.environ.items() if k.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{"tool": tool, "argv": args, "env": env}}) + "\n")

def rc(name, default=0):
    return int(os.environ.get(name, default))

if tool == "docker":
    if args[:1] == ["info"]:
        if "--format" in args:
            print(os.environ.get("STUB_DOCKER_RUNTIMES", '{{"runc":{{}}}}'))
        sys.exit(rc("STUB_DOCKER_INFO_RC"))
    if args[:2] == ["image", "inspect"]:
        if "--format" in args and not rc("STUB_DOCKER_IMAGE_RC"):
            print(os.environ.get("STUB_DOCKER_IMAGE_USER", "1000:1000"))  # the image's USER
        sys.exit(rc("STUB_DOCKER_IMAGE_RC"))
    sys.exit(rc("STUB_DOCKER_RUN_RC"))
if tool in ("python3", "python") and args[:2] == ["-m", "venv"]:
    bin_dir = Path(args[2]) / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "pip", "accelerate"):
        (bin_dir / name).symlink_to(os.path.realpath(sys.argv[0]))
    sys.exit(0)
if tool == "scontrol" and args[:2] == ["show", "hostnames"]:
    print("\n".join(os.environ.get("STUB_HOSTNAMES", "node1").split(",")))
    sys.exit(0)
if tool == "srun" and os.environ.get("STUB_SRUN_WAIT"):
    def on_term(signum, frame):
        with open(os.environ["STUB_LOG"], "a") as log:
            log.write(json.dumps({{"tool": "srun", "signal": "TERM"}}) + "\n")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    Path(os.environ["STUB_SRUN_WAIT"]).write_text("started")
    deadline = time.time() + 600  # until the test's signal; a hang guard, long enough for a loaded machine
    while time.time() < deadline:
        time.sleep(0.05)
    sys.exit(0)
sys.exit(rc("STUB_" + tool.upper().replace("-", "_") + "_RC"))
'''


class Machine:
    """A copy of the launcher files, stand-in tools on a closed PATH, and helpers to run the scripts."""

    def __init__(self, root: Path):
        self.root = root
        self.repo = root / "repo"
        self.bin = root / "bin"
        self.log = root / "calls.jsonl"
        self.bin.mkdir()
        for rel in LAUNCHER_FILES:
            (self.repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, self.repo / rel)
        (self.repo / "configs").mkdir()
        (self.repo / "configs" / "tiny.py").write_text('out_dir = "checkpoints/tiny"\n')
        (self.repo / "data" / "sample").mkdir(parents=True)
        (self.repo / "data" / "sample" / "test.csv").write_text("premise,hypothesis\na,b\n")
        for tool in SYSTEM_TOOLS:
            found = shutil.which(tool)
            if found:
                (self.bin / tool).symlink_to(found)
        self.env = {
            "PATH": str(self.bin),
            "HOME": str(root / "home"),
            "HF_HOME": str(root / "hf-cache"),
            "STUB_LOG": str(self.log),
            "LANG": "C.UTF-8",
        }

    def stub(self, *tools: str) -> None:
        for tool in tools:
            path = self.bin / tool
            path.unlink(missing_ok=True)  # never write through a link to a system tool
            path.write_text(STUB.format(python=sys.executable))
            path.chmod(0o755)

    def fake_id(self, uid: int, gid: int) -> None:
        """`id` answering as the given user (the tests run as root or not; the launcher must not care)."""
        path = self.bin / "id"
        path.unlink(missing_ok=True)
        path.write_text(f'#!/bin/sh\ncase "$1" in -u) echo {uid} ;; -g) echo {gid} ;; *) echo "uid={uid} gid={gid}" ;; esac\n')
        path.chmod(0o755)

    def venv_python(self) -> Path:
        """A stand-in interpreter at repo/.venv/bin/python, so local mode finds an existing .venv."""
        self.stub("python")
        (self.repo / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
        for name in ("python", "accelerate"):
            target = self.repo / ".venv" / "bin" / name
            target.unlink(missing_ok=True)
            target.symlink_to(self.bin / "python")
        return self.repo / ".venv" / "bin" / "python"

    def run(self, script: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.repo / script), *args], cwd=cwd or self.repo, env={**self.env, **env},
                              capture_output=True, text=True, timeout=60)

    def calls(self, tool: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r for r in rows if tool is None or r["tool"] == tool]

    def last_call(self, tool: str, first_arg: str) -> list[str]:
        matching = [c["argv"] for c in self.calls(tool) if c.get("argv", [None])[:1] == [first_arg]]
        assert matching, f"no `{tool} {first_arg}` call in {self.calls()}"
        return matching[-1]


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


@pytest.fixture
def docker_box(machine: Machine) -> Machine:
    """A working Docker engine with the NVIDIA runtime and the images built."""
    machine.stub("docker")
    machine.env["STUB_DOCKER_RUNTIMES"] = '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}'
    return machine


def dry_run_command(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1])


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "error:" in lines[0]
    return lines[0]


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# --- docker ------------------------------------------------------------------------------------------


def test_auto_picks_docker_and_runs_the_printed_command(docker_box: Machine):
    m = docker_box
    m.fake_id(1234, 2345)
    dry = m.run("run_training.sh", "configs/tiny.py", "--lora_r=64", "--dry-run")
    printed = dry_run_command(dry)
    assert "mode: docker" in dry.stderr
    assert not m.calls("docker") or all(c["argv"][0] != "run" for c in m.calls("docker"))

    real = m.run("run_training.sh", "configs/tiny.py", "--lora_r=64")
    assert real.returncode == 0, real.stderr
    ran = m.last_call("docker", "run")
    assert ["docker", *ran] == printed

    repo = str(m.repo.resolve())
    assert printed[:4] == ["docker", "run", "--rm", "--init"]
    assert flag_values(printed, "--gpus") == ["all"]
    assert flag_values(printed, "--user") == ["1234:2345"]  # the caller's ids: files on the mounts are theirs
    assert len(dry.stdout.strip().splitlines()) == 1  # no set-up step for a non-root caller
    assert f"{repo}:{repo}:rw" in flag_values(printed, "--volume")
    assert f"{m.env['HF_HOME']}:/cache/huggingface" in flag_values(printed, "--volume")
    assert flag_values(printed, "--workdir") == [repo]
    assert flag_values(printed, "--shm-size") == ["16g"]
    assert printed[-4:] == [TRAIN_IMAGE, "train", "configs/tiny.py", "--lora_r=64"]


def owners(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(f): (f.stat().st_uid, f.stat().st_gid) for f in folders}


def test_docker_from_a_root_shell_never_changes_the_owner_of_a_host_folder(docker_box: Machine, tmp_path: Path):
    """Root's container runs as root, so nothing on the host needs handing over: no chown, in a dry run or a real
    one, of the checkout, the checkpoints, an --out_dir, an --output folder or the Hugging Face cache."""
    m = docker_box
    m.fake_id(0, 0)
    m.stub("chown")  # any call is a failure below
    out_dir = tmp_path / "runs" / "exp1"
    results = tmp_path / "results"
    hf = Path(m.env["HF_HOME"])
    for folder in (out_dir, results, hf, m.repo / "checkpoints"):
        folder.mkdir(parents=True)
    before = owners(out_dir, results, hf, m.repo / "checkpoints", m.repo)

    dry = m.run("run_training.sh", "configs/tiny.py", f"--out_dir='{out_dir}'", "--dry-run")
    printed = dry_run_command(dry)
    assert flag_values(printed, "--user") == ["0:0"]
    assert len(dry.stdout.strip().splitlines()) == 1  # the command alone: no set-up step
    assert f"{out_dir.parent}:{out_dir.parent}:rw" in flag_values(printed, "--volume")
    real = m.run("run_training.sh", "configs/tiny.py", f"--out_dir='{out_dir}'")
    assert real.returncode == 0, real.stderr
    assert ["docker", *m.last_call("docker", "run")] == printed
    real = m.run("run_inference.sh", "data/sample/test.csv", f"--output={results}/pred.csv")
    assert real.returncode == 0, real.stderr
    assert flag_values(m.last_call("docker", "run"), "--user") == ["0:0"]

    assert not m.calls("chown")
    assert "chown" not in (REPO / "docker/launch.sh").read_text()
    assert owners(out_dir, results, hf, m.repo / "checkpoints", m.repo) == before

    # asked for explicitly: the image's user, or a given uid:gid, still without touching a folder
    dry = m.run("run_training.sh", "configs/tiny.py", "--dry-run", FINETUNE_DOCKER_USER="image",
                STUB_DOCKER_IMAGE_USER="2000:3000")
    assert flag_values(dry_run_command(dry), "--user") == ["2000:3000"] and len(dry.stdout.strip().splitlines()) == 1
    dry = m.run("run_training.sh", "configs/tiny.py", "--dry-run", FINETUNE_DOCKER_USER="4000:4000")
    assert flag_values(dry_run_command(dry), "--user") == ["4000:4000"] and len(dry.stdout.strip().splitlines()) == 1
    assert not m.calls("chown")
    error = one_line_error(m.run("run_training.sh", "configs/tiny.py", "--dry-run", FINETUNE_DOCKER_USER="nobody"))
    assert "FINETUNE_DOCKER_USER='nobody'" in error


def test_docker_limits_only_on_gpu_runs(docker_box: Machine):
    """memlock/stack limits are for NCCL and pinned memory; a host that cannot raise them must still run CPU jobs."""
    gpu = dry_run_command(docker_box.run("run_training.sh", "configs/tiny.py", "--dry-run"))
    assert flag_values(gpu, "--ulimit") == ["memlock=-1", "stack=67108864"]
    docker_box.env.pop("STUB_DOCKER_RUNTIMES")  # the same engine without the NVIDIA runtime
    cpu = dry_run_command(docker_box.run("run_training.sh", "configs/tiny.py", "--dry-run"))
    assert "--gpus" not in cpu and "--ulimit" not in cpu
    cpu = dry_run_command(docker_box.run("run_inference.sh", "data/sample/test.csv", "--dry-run"))
    assert "--ulimit" not in cpu


def test_docker_as_a_user_keeps_the_callers_ids_unless_asked(docker_box: Machine):
    m = docker_box
    m.fake_id(1234, 2345)
    printed = dry_run_command(m.run("run_training.sh", "configs/tiny.py", "--dry-run", FINETUNE_DOCKER_USER="image"))
    assert flag_values(printed, "--user") == ["1000:1000"]
    dry = m.run("run_training.sh", "configs/tiny.py", "--dry-run")
    assert flag_values(dry_run_command(dry), "--user") == ["1234:2345"] and len(dry.stdout.strip().splitlines()) == 1


def test_gpus_n_with_fsdp_shards_through_the_config_override(docker_box: Machine):
    printed = dry_run_command(docker_box.run("run_training.sh", "configs/tiny.py", "--gpus", "2", "--fsdp",
                                             "--lora_r=64", "--dry-run"))
    i = printed.index("--entrypoint")
    assert printed[i + 3:] == ["launch", "--multi_gpu", "--num_machines", "1", "--num_processes", "2", "-m", "app",
                               "train", "configs/tiny.py", "--lora_r=64", "--parallelism=fsdp"]
    error = one_line_error(docker_box.run("run_inference.sh", "data/sample/test.csv", "--fsdp", "--dry-run"))
    assert "--fsdp is a training option" in error


def test_docker_gpus_n_runs_accelerate_launch_inside(docker_box: Machine):
    printed = dry_run_command(docker_box.run("run_training.sh", "--gpus", "4", "configs/tiny.py", "--lora_r=64",
                                             "--dry-run"))
    assert flag_values(printed, "--gpus") == ["4"]
    i = printed.index("--entrypoint")
    assert printed[i:] == ["--entrypoint", "accelerate", TRAIN_IMAGE, "launch", "--multi_gpu", "--num_machines", "1",
                           "--num_processes", "4", "-m", "app", "train", "configs/tiny.py", "--lora_r=64"]


def test_docker_respects_cuda_visible_devices(docker_box: Machine):
    printed = dry_run_command(docker_box.run("run_training.sh", "configs/tiny.py", "--dry-run",
                                             CUDA_VISIBLE_DEVICES="1,3"))
    assert flag_values(printed, "--gpus") == ['"device=1,3"']


def test_docker_without_gpu_support_and_gpus_asked_is_a_clear_error(machine: Machine):
    machine.stub("docker")  # runtimes: runc only
    error = one_line_error(machine.run("run_training.sh", "configs/tiny.py", "--gpus", "2"))
    assert "--gpus 2" in error and "no GPU support" in error and "NVIDIA Container Toolkit" in error
    assert not [c for c in machine.calls("docker") if c["argv"][0] == "run"]


def test_docker_without_gpu_support_runs_on_cpu(machine: Machine):
    machine.stub("docker")
    result = machine.run("run_training.sh", "configs/tiny.py")
    assert result.returncode == 0, result.stderr
    assert "no GPU support: running on CPU" in result.stderr
    assert "--gpus" not in machine.last_call("docker", "run")


def test_image_not_built_says_the_build_command(docker_box: Machine):
    error = one_line_error(docker_box.run("run_training.sh", "configs/tiny.py", STUB_DOCKER_IMAGE_RC="1"))
    assert f"image {TRAIN_IMAGE} is not built" in error
    assert f"docker build -f Dockerfile.train -t {TRAIN_IMAGE}" in error
    error = one_line_error(docker_box.run("run_inference.sh", "data/sample/test.csv", STUB_DOCKER_IMAGE_RC="1"))
    assert f"docker build -f Dockerfile.infer -t {INFER_IMAGE}" in error


def test_dry_run_with_image_not_built_prints_and_warns(docker_box: Machine):
    result = docker_box.run("run_training.sh", "configs/tiny.py", "--dry-run", STUB_DOCKER_IMAGE_RC="1")
    assert dry_run_command(result)[-3:] == [TRAIN_IMAGE, "train", "configs/tiny.py"]
    assert "not built yet" in result.stderr


def test_explicit_docker_mode_with_engine_down(machine: Machine):
    machine.stub("docker")
    error = one_line_error(machine.run("run_training.sh", "configs/tiny.py", "--mode", "docker",
                                       STUB_DOCKER_INFO_RC="1"))
    assert "Docker engine does not answer" in error


def test_secrets_pass_by_name_only(docker_box: Machine):
    (docker_box.repo / ".env").write_text("WANDB_API_KEY=from-env-file\n")
    result = docker_box.run("run_training.sh", "configs/tiny.py", HF_TOKEN="hf_secret_value")
    assert result.returncode == 0, result.stderr
    ran = docker_box.last_call("docker", "run")
    assert "HF_TOKEN" in flag_values(ran, "--env")
    assert flag_values(ran, "--env-file") == [str(docker_box.repo / ".env")]
    joined = " ".join(ran) + result.stderr + result.stdout
    assert "hf_secret_value" not in joined and "from-env-file" not in joined
    assert "WANDB_API_KEY" not in flag_values(ran, "--env")  # not set in the caller's environment


def test_infer_mounts_paths_outside_the_checkout(docker_box: Machine, tmp_path: Path):
    ckpt = tmp_path / "elsewhere" / "run"
    ckpt.mkdir(parents=True)
    out = tmp_path / "results" / "pred.csv"
    printed = dry_run_command(docker_box.run("run_inference.sh", "data/sample/test.csv", "--checkpoint", str(ckpt),
                                             f"--output={out}", "--infer_batch_size=8", "--dry-run"))
    volumes = flag_values(printed, "--volume")
    assert f"{ckpt}:{ckpt}:ro" in volumes
    assert f"{out.parent}:{out.parent}:rw" in volumes
    assert printed[-7:] == [INFER_IMAGE, "infer", "data/sample/test.csv", "--checkpoint", str(ckpt),
                            f"--output={out}", "--infer_batch_size=8"]


def test_run_from_another_directory_mounts_it_too(docker_box: Machine, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "exp.py").write_text("lora_r = 8\n")
    printed = dry_run_command(docker_box.run("run_training.sh", "exp.py", "--dry-run", cwd=work))
    assert f"{work}:{work}:rw" in flag_values(printed, "--volume")
    assert flag_values(printed, "--workdir") == [str(work)]
    assert printed[-2:] == ["train", "exp.py"]


# --- apptainer / singularity --------------------------------------------------------------------------


def test_auto_picks_apptainer_without_a_docker_engine(machine: Machine):
    m = machine
    m.stub("docker", "apptainer")
    sif = m.repo / f"finetune-runner-train_{VERSION}.sif"
    sif.write_text("not really an image")
    dry = m.run("run_training.sh", "configs/tiny.py", "--lora_r=64", "--dry-run", STUB_DOCKER_INFO_RC="1")
    printed = dry_run_command(dry)
    assert "mode: apptainer" in dry.stderr

    real = m.run("run_training.sh", "configs/tiny.py", "--lora_r=64", STUB_DOCKER_INFO_RC="1",
                 HF_TOKEN="hf_secret_value")
    assert real.returncode == 0, real.stderr
    call = [c for c in m.calls("apptainer")][-1]
    assert ["apptainer", *call["argv"]] == printed
    assert call["env"]["APPTAINERENV_HF_TOKEN"] == "hf_secret_value"
    assert "hf_secret_value" not in " ".join(call["argv"])

    repo = str(m.repo.resolve())
    assert printed[:5] == ["apptainer", "exec", "--nv", "--cleanenv", "--bind"]
    assert f"{repo}:{repo}:rw" in flag_values(printed, "--bind")
    assert flag_values(printed, "--pwd") == [repo]
    assert printed[-7:] == [str(sif), "python", "-m", "app", "train", "configs/tiny.py", "--lora_r=64"]


def test_apptainer_gpus_n_and_singularity_fallback(machine: Machine):
    machine.stub("singularity")
    sif = machine.root / "custom.sif"
    sif.write_text("x")
    printed = dry_run_command(machine.run("run_training.sh", "configs/tiny.py", "--gpus=2", "--image", str(sif),
                                          "--dry-run"))
    assert printed[:3] == ["singularity", "exec", "--nv"]
    assert printed[printed.index(str(sif)) + 1:] == ["accelerate", "launch", "--multi_gpu", "--num_machines", "1",
                                                      "--num_processes", "2", "-m", "app", "train",
                                                      "configs/tiny.py"]


def test_apptainer_image_missing_says_how_to_build_it(machine: Machine):
    machine.stub("apptainer")
    error = one_line_error(machine.run("run_training.sh", "configs/tiny.py", "--mode", "apptainer"))
    assert "apptainer build" in error and f"docker-daemon://{TRAIN_IMAGE}" in error


# --- inside the image, local ---------------------------------------------------------------------------


def test_inside_the_image_runs_python_directly(machine: Machine):
    machine.stub("python", "docker")
    result = machine.run("run_training.sh", "configs/tiny.py", "--lora_r=64", FINETUNE_RUNNER_IMAGE="train")
    assert result.returncode == 0, result.stderr
    assert machine.last_call("python", "-m") == ["-m", "app", "train", "configs/tiny.py", "--lora_r=64"]
    assert not machine.calls("docker")
    printed = dry_run_command(machine.run("run_inference.sh", "data/sample/test.csv", "--dry-run",
                                          FINETUNE_RUNNER_IMAGE="infer"))
    assert printed == ["python", "-m", "app", "infer", "data/sample/test.csv"]


def test_the_image_layout_runs_directly(tmp_path: Path):
    """In the image /workspace holds only the scripts, docker/launch.sh and configs/ (no pyproject.toml)."""
    m = Machine(tmp_path)
    (m.repo / "pyproject.toml").unlink()
    (m.repo / "docker" / "constraints.txt").unlink()
    m.stub("python", "accelerate")
    result = m.run("run_training.sh", "configs/tiny.py", "--gpus", "2", FINETUNE_RUNNER_IMAGE="train")
    assert result.returncode == 0, result.stderr
    assert m.last_call("accelerate", "launch") == ["launch", "--multi_gpu", "--num_machines", "1", "--num_processes",
                                                   "2", "-m", "app", "train", "configs/tiny.py"]
    printed = dry_run_command(m.run("run_training.sh", "configs/tiny.py", "--dry-run", FINETUNE_RUNNER_IMAGE="train"))
    assert printed == ["python", "-m", "app", "train", "configs/tiny.py"]


def test_local_mode_with_an_existing_venv(machine: Machine):
    machine.stub("docker")  # the client alone, no engine: auto must end in local mode
    python = machine.venv_python()
    dry = machine.run("run_training.sh", "configs/tiny.py", "--lora_r=64", "--dry-run", STUB_DOCKER_INFO_RC="1")
    assert "mode: local" in dry.stderr
    assert dry_run_command(dry) == [str(python), "-m", "app", "train", "configs/tiny.py", "--lora_r=64"]
    assert len(dry.stdout.strip().splitlines()) == 1
    result = machine.run("run_training.sh", "configs/tiny.py", "--lora_r=64", STUB_DOCKER_INFO_RC="1")
    assert result.returncode == 0, result.stderr
    assert machine.last_call("python", "-m") == ["-m", "app", "train", "configs/tiny.py", "--lora_r=64"]

    printed = dry_run_command(machine.run("run_training.sh", "configs/tiny.py", "--gpus", "2", "--dry-run",
                                          STUB_DOCKER_INFO_RC="1"))
    assert printed[0] == str(machine.repo / ".venv" / "bin" / "accelerate")
    assert printed[1:6] == ["launch", "--multi_gpu", "--num_machines", "1", "--num_processes"]


def test_local_mode_creates_the_venv_torch_first(machine: Machine):
    m = machine
    m.stub("python3")
    venv = m.repo / ".venv"
    dry = m.run("run_training.sh", "configs/tiny.py", "--dry-run", "--mode", "local")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip().splitlines() == [
        f"python3 -m venv {venv}",
        f"{venv}/bin/pip install torch==2.13.0",
        f"{venv}/bin/pip install -e {m.repo}",
        f"{venv}/bin/python -m app train configs/tiny.py",
    ]
    assert not venv.exists()

    result = m.run("run_training.sh", "configs/tiny.py", "--max_steps=2", "--mode", "local")
    assert result.returncode == 0, result.stderr
    steps = [(c["tool"], c["argv"]) for c in m.calls() if not (c["tool"] == "python3" and c["argv"][:1] == ["-c"])]
    assert steps == [
        ("python3", ["-m", "venv", str(venv)]),
        ("pip", ["install", "torch==2.13.0"]),
        ("pip", ["install", "-e", str(m.repo)]),
        ("python", ["-m", "app", "train", "configs/tiny.py", "--max_steps=2"]),
    ]
    assert (venv / "bin" / "python").exists()


def test_local_mode_needs_python_3_11(machine: Machine):
    machine.stub("python3")
    error = one_line_error(machine.run("run_training.sh", "configs/tiny.py", "--mode", "local",
                                       STUB_PYTHON3_RC="1"))
    assert "Python >= 3.11" in error


# --- arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("run_training.sh", ["configs/missing.py"], "config file not found: configs/missing.py"),
        ("run_training.sh", [], "missing CONFIG.py"),
        ("run_training.sh", ["configs/tiny.py", "--gpus", "0"], "--gpus needs a positive number"),
        ("run_training.sh", ["configs/tiny.py", "--mode", "kubernetes"], "unknown --mode 'kubernetes'"),
        ("run_training.sh", ["--lora_r=64", "configs/tiny.py"], "the first argument must be the config file"),
        ("run_inference.sh", ["missing.csv"], "input file not found: missing.csv"),
    ],
)
def test_clear_errors(machine: Machine, script: str, args: list[str], expected: str):
    machine.stub("docker")
    error = one_line_error(machine.run(script, *args, "--dry-run"))
    assert expected in error


def test_unknown_arguments_pass_through_unchanged(machine: Machine):
    python = str(machine.venv_python())
    args = ["--lora_r=64", "--target_modules=['q_proj', 'v_proj']", "--learning_rate=1e-4"]
    printed = dry_run_command(machine.run("run_training.sh", "configs/tiny.py", "--mode=local", "--dry-run", *args,
                                          "--", "--dry-run", "--gpus=3"))
    assert printed == [python, "-m", "app", "train", "configs/tiny.py", *args, "--dry-run", "--gpus=3"]
    printed = dry_run_command(machine.run("run_inference.sh", "data/sample/test.csv", "--checkpoint", "ck",
                                          "--output", "o.csv", "--fresh", "--mode", "local", "--dry-run"))
    assert printed == [python, "-m", "app", "infer", "data/sample/test.csv", "--checkpoint", "ck", "--output", "o.csv",
                       "--fresh"]


def test_help(machine: Machine):
    result = machine.run("run_training.sh", "--help")
    assert result.returncode == 0
    assert "--gpus N" in result.stdout and "--dry-run" in result.stdout


# --- Slurm ---------------------------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_GPUS_ON_NODE": "4", "STUB_HOSTNAMES": "gpu07,gpu08"}


@pytest.fixture
def slurm(machine: Machine) -> Machine:
    machine.stub("srun", "scontrol", "apptainer")
    (machine.repo / f"finetune-runner-train_{VERSION}.sif").write_text("x")
    machine.env.update(SLURM_ENV, SLURM_SUBMIT_DIR=str(machine.repo))
    return machine


def sbatch(m: Machine, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(m.repo / "docker/slurm/train.sbatch"), *args], cwd=m.root,
                          env={**m.env, **env}, capture_output=True, text=True, timeout=60)


def test_sbatch_launches_torchrun_with_c10d_rendezvous_in_apptainer(slurm: Machine):
    result = sbatch(slurm, "configs/tiny.py", "--lora_r=64", HF_TOKEN="hf_secret_value")
    assert result.returncode == 0, result.stderr
    (call,) = slurm.calls("srun")
    argv = call["argv"]
    repo = str(slurm.repo)
    sif = str(slurm.repo / f"finetune-runner-train_{VERSION}.sif")
    assert argv[:4] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", str(slurm.bin / "apptainer"), "exec"]
    assert "--nv" in argv and flag_values(argv, "--pwd") == [repo]
    assert repo in flag_values(argv, "--bind")
    torchrun = argv[argv.index(sif) + 1:]
    assert torchrun == ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_id=4242", "--rdzv_backend=c10d",
                        "--rdzv_endpoint=gpu07:29742", "-m", "app", "train", "configs/tiny.py", "--lora_r=64",
                        f"--out_dir={repo}/checkpoints/tiny"]
    assert call["env"]["APPTAINERENV_HF_TOKEN"] == "hf_secret_value"
    assert "hf_secret_value" not in " ".join(argv)
    assert not [c for c in slurm.calls("scontrol") if c["argv"][:1] == ["requeue"]]


def test_sbatch_fsdp_passes_the_parallelism_override(slurm: Machine):
    result = sbatch(slurm, "configs/tiny.py", "--fsdp", "--lora_r=64")
    assert result.returncode == 0, result.stderr
    argv = slurm.calls("srun")[0]["argv"]
    tail = argv[argv.index("train"):]
    assert tail[:4] == ["train", "configs/tiny.py", "--parallelism=fsdp", "--lora_r=64"] and "--fsdp" not in argv


def test_sbatch_keeps_a_user_out_dir_and_shared_storage(slurm: Machine, tmp_path: Path):
    shared = tmp_path / "shared"
    del slurm.env["HF_HOME"]
    result = sbatch(slurm, "configs/tiny.py", "--out_dir=/scratch/x", FINETUNE_SHARED_DIR=str(shared),
                    FINETUNE_SIF=str(slurm.repo / f"finetune-runner-train_{VERSION}.sif"))
    assert result.returncode == 0, result.stderr
    argv = slurm.calls("srun")[0]["argv"]
    assert argv[-1] == "--out_dir=/scratch/x" and argv.count("--out_dir=/scratch/x") == 1
    assert f"{shared}/.cache/huggingface:/cache/huggingface" in flag_values(argv, "--bind")
    assert str(shared) in flag_values(argv, "--bind")


def test_sbatch_header_requeues_and_signals_before_the_limit():
    text = (REPO / "docker/slurm/train.sbatch").read_text()
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --signal=B:USR1@" in text
    assert subprocess.run(["bash", "-n", str(REPO / "docker/slurm/train.sbatch")]).returncode == 0


def _start_and_signal(m: Machine, sig: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    started = m.root / "srun-started"
    proc = subprocess.Popen(["bash", str(m.repo / "docker/slurm/train.sbatch"), "configs/tiny.py"], cwd=m.root,
                            env={**m.env, "STUB_SRUN_WAIT": str(started)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # hang guards: the script reaches srun in seconds idle
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.communicate(timeout=60)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), m.calls()


def test_sbatch_time_limit_signal_checkpoints_and_requeues(slurm: Machine):
    result, calls = _start_and_signal(slurm, signal.SIGUSR1)
    assert result.returncode == 0, result.stderr
    assert {"tool": "srun", "signal": "TERM"} in calls
    requeues = [c["argv"] for c in calls if c["tool"] == "scontrol" and c["argv"][:1] == ["requeue"]]
    assert requeues == [["requeue", "4242"]]
    assert "requeueing job 4242" in result.stderr


def test_sbatch_sigterm_is_forwarded_without_requeue(slurm: Machine):
    result, calls = _start_and_signal(slurm, signal.SIGTERM)
    assert result.returncode == 143
    assert {"tool": "srun", "signal": "TERM"} in calls
    assert not [c for c in calls if c["tool"] == "scontrol" and c["argv"][:1] == ["requeue"]]


def test_sbatch_missing_image(slurm: Machine):
    (slurm.repo / f"finetune-runner-train_{VERSION}.sif").unlink()
    result = sbatch(slurm, "configs/tiny.py")
    assert result.returncode == 2
    assert "apptainer build" in result.stderr


# --- local mode for real ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_mode_trains_and_infers_the_tiny_config_end_to_end(tmp_path: Path):
    """The real scripts in this checkout, its .venv, the tiny config: two steps, then inference on 8 rows."""
    pytest.importorskip("app.engine.loop", reason="the training engine is not in this checkout")
    pytest.importorskip("app.infer", reason="inference is not in this checkout")
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in the checkout (local mode would create one; that needs the network)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "CUDA_VISIBLE"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "docker").exists() and not (Path(p) / "apptainer").exists())
    out = tmp_path / "run"
    train = subprocess.run(
        [str(REPO / "run_training.sh"), "configs/tiny.py", "--max_steps=2", "--eval_rows=4", "--max_new_tokens=4",
         f"--out_dir={out}", f"--model_name={tmp_path / 'tiny-model'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "mode: local" in train.stderr
    assert (out / "checkpoints" / "final").is_dir()

    rows = (REPO / "data/sample/test.csv").read_text().splitlines()[:9]
    (tmp_path / "input.csv").write_text("\n".join(rows) + "\n")
    pred = tmp_path / "pred.csv"
    infer = subprocess.run(
        [str(REPO / "run_inference.sh"), str(tmp_path / "input.csv"), "--checkpoint", str(out), "--output", str(pred),
         "--max_new_tokens=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert len(pred.read_text().splitlines()) == 9
