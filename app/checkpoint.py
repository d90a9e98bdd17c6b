"""Checkpoints: written to a temp directory and renamed into place, so a kill never leaves a half checkpoint.

Layout of out_dir/checkpoints/<name>/ (name = step_000120, best, final):
  adapter_model.safetensors + adapter_config.json (LoRA) or model.safetensors + config.json (full)
  tokenizer files
  optimizer.safetensors + optimizer.json   tensors and the rest of the optimizer state (no pickle), keyed by
                                           parameter index, or by name when a sharded (FSDP) run gathered it
  scheduler.json                           learning-rate scheduler state
  rng_rank{R}.json + rng_rank{R}.safetensors   python/numpy/torch RNG of every process
  trainer_state.json                       step, data position, best metric
  run_config.json                          the resolved config
  manifest.json                            size and sha256 of every other file (written by publish())

`verify_checkpoint` checks a directory against its manifest (checkpoints written before manifests existed get
the cheap checks only: JSON files parse, safetensors headers read, tokenizer present); a failure is a one-line
UserError naming the file. `latest` resumes from the newest checkpoint that passes and warns about the others.
Weights are read from safetensors only: a directory holding only pickle weights (*.bin, *.pt) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from app.atomic import give_new_modes, write_json_atomic
from app.errors import UserError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of the shards
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def write_json(path: Path, value) -> None:
    """Atomic JSON write with sorted keys (app.atomic: temp file, fsync, rename)."""
    write_json_atomic(path, value, sort_keys=True)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --- optimizer / scheduler / RNG state without pickle ---------------------------------------------------
def _split_tensors(value, path: str, tensors: dict):
    """Move every tensor of a nested state into `tensors` (keyed by path); return what JSON can hold."""
    if torch.is_tensor(value):
        tensors[path] = value.detach().cpu().clone()  # clone: bitsandbytes shares qmaps between params
        return None
    if isinstance(value, dict):
        plain = {k: _split_tensors(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {k: v for k, v in plain.items() if not (v is None and torch.is_tensor(value[k]))}
    return value


def save_optimizer(optimizer, directory: Path) -> None:
    save_optimizer_state(optimizer.state_dict(), directory)


def _keyed_by_name(sd: dict) -> bool:
    return any(isinstance(p, str) for g in sd["param_groups"] for p in g["params"])


def save_optimizer_state(sd: dict, directory: Path) -> None:
    """Optimizer state as safetensors (tensors, also nested ones such as bitsandbytes' quant state) + JSON. Keyed
    by parameter index (torch's own state_dict) or by parameter name (a sharded run's gathered state)."""
    tensors: dict = {}
    plain = {str(pid): _split_tensors(state, str(pid), tensors) for pid, state in sd["state"].items()}
    save_file(tensors, str(directory / "optimizer.safetensors"))
    keys = "names" if _keyed_by_name(sd) else "indices"
    write_json(directory / "optimizer.json", {"param_groups": sd["param_groups"], "state": plain, "keys": keys})


def read_optimizer_state(directory: Path) -> dict:
    """What save_optimizer_state wrote, keyed as it was saved."""
    meta = read_json(directory / "optimizer.json")
    state = meta["state"]
    for name, tensor in load_file(str(directory / "optimizer.safetensors")).items():
        *parents, key = name.split("/")
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = tensor
    by_name = meta.get("keys") == "names"
    return {"state": {(pid if by_name else int(pid)): v for pid, v in state.items()},
            "param_groups": meta["param_groups"]}


def keyed_by(sd: dict, names: list[str], by_name: bool) -> dict:
    """An optimizer state re-keyed by parameter name or by index; `names` lists the optimizer's parameters in its
    own order (groups in order, each group's params in order), which is what torch's indices count."""
    if _keyed_by_name(sd) == by_name:
        return sd
    key = (lambda i: names[i]) if by_name else {n: i for i, n in enumerate(names)}.__getitem__
    return {"state": {key(k): v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [key(p) for p in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer(optimizer, directory: Path) -> None:
    optimizer.load_state_dict(read_optimizer_state(directory))


def save_scheduler(scheduler, directory: Path) -> None:
    sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    write_json(directory / "scheduler.json", sd)


def load_scheduler(scheduler, directory: Path) -> None:
    sd = read_json(directory / "scheduler.json")
    sd["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sd)


def save_rng(directory: Path, rank: int) -> None:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    write_json(
        directory / f"rng_rank{rank}.json",
        {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]},
    )
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))


def load_rng(directory: Path, rank: int) -> None:
    meta = read_json(directory / f"rng_rank{rank}.json")
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(directory / f"rng_rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)


# --- manifest -----------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every file of the directory, subfolders included, except the manifest itself."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: Path) -> None:
    """manifest.json: relative path -> size and sha256 of every file of the directory."""
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(directory)}
    write_json(directory / MANIFEST, {"files": files})


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest's {relative path: {"size", "sha256"}}, None without one; UserError when unreadable."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        files = read_json(path)["files"]
        if all(isinstance(v["size"], int) and isinstance(v["sha256"], str) for v in files.values()):
            outside = next((rel for rel in files if not _inside(rel)), None)
            if outside is not None:  # never read (or hash) a file the checkpoint does not hold
                raise UserError(f"{path}: entry {outside!r} is outside the checkpoint (corrupt or tampered manifest)")
            return files
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise UserError(f"{path}: unreadable checkpoint manifest (corrupt checkpoint)")


def _inside(rel: str) -> bool:
    """A manifest entry names a file under the checkpoint: a relative path without '..'."""
    parts = PurePosixPath(rel).parts
    return bool(parts) and not PurePosixPath(rel).is_absolute() and ".." not in parts


# --- verification -------------------------------------------------------------------------------------------
def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def has_safetensors_weights(path: Path) -> bool:
    """adapter_model.safetensors in a LoRA directory, model.safetensors (or its shard index) otherwise."""
    return any((path / name).is_file() for name in (ADAPTER_WEIGHTS if _is_adapter(path) else MODEL_WEIGHTS))


def require_safetensors(path: str | Path) -> None:
    """Refuse a local model directory whose weights are pickle files only (this runner loads safetensors only).
    A hub model name, or a directory with safetensors weights (or no weights at all), passes."""
    path = Path(path)
    if not path.is_dir() or has_safetensors_weights(path):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return
    how = ("load it with peft (PeftModel.from_pretrained(base, DIR))" if _is_adapter(path)
           else "load it with transformers (AutoModelForCausalLM.from_pretrained(DIR))")
    raise UserError(f"{path / pickles[0]}: pickle weights are never loaded (safetensors only); convert them once: "
                    f"{how}, then .save_pretrained(DIR, safe_serialization=True)")


def _check_sizes(path: Path, manifest: dict[str, dict]) -> None:
    for rel, entry in manifest.items():
        file = path / rel
        if not file.is_file():
            raise UserError(f"{file}: missing, listed in {MANIFEST} (incomplete or corrupt checkpoint)")
        size = file.stat().st_size
        if size != entry["size"]:
            raise UserError(f"{file}: size {size}, {MANIFEST} says {entry['size']} bytes "
                            "(truncated or corrupt checkpoint)")


def _check_hashes(path: Path, manifest: dict[str, dict]) -> None:
    for rel, entry in manifest.items():
        if sha256_file(path / rel) != entry["sha256"]:
            raise UserError(f"{path / rel}: sha256 differs from {MANIFEST} (corrupt checkpoint)")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _json_object(file: Path) -> dict:
    try:
        value = read_json(file)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{file}: not valid JSON ({_one_line(err)}) (truncated or corrupt checkpoint)") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: not a JSON object (corrupt checkpoint)")
    return value


def _check_safetensors(file: Path) -> None:
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file}: unreadable safetensors file ({_one_line(err)}) "
                        "(truncated or corrupt checkpoint)") from None


def _check_contents(path: Path) -> None:
    """What can be checked without reading the tensors: weights, JSON files, safetensors headers, tokenizer."""
    if not has_safetensors_weights(path):
        expected = ADAPTER_WEIGHTS[0] if _is_adapter(path) else " or ".join(MODEL_WEIGHTS)
        raise UserError(f"{path}: no model weights ({expected})")
    for file in sorted(path.glob("*.json")):
        _json_object(file)
    for file in sorted(path.glob("*.safetensors")):
        _check_safetensors(file)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer files ({' or '.join(TOKENIZER_FILES)})")


def verify_checkpoint(path: Path, hashes: bool = True) -> None:
    """Raise a one-line UserError naming the file at fault when the checkpoint directory is broken.

    With a manifest: every listed file present with its size (and, when `hashes`, its sha256); always: weights
    in safetensors, JSON files parse as objects, safetensors headers read, tokenizer files present."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a checkpoint directory")
    require_safetensors(path)
    manifest = read_manifest(path)
    if manifest is not None:
        _check_sizes(path, manifest)
    _check_contents(path)
    if manifest is not None and hashes:
        _check_hashes(path, manifest)


def checkpoint_step(path: Path) -> int:
    """The step in trainer_state.json; UserError when it is missing or unreadable."""
    file = path / "trainer_state.json"
    if not file.is_file():
        raise UserError(f"{file}: missing (incomplete checkpoint)")
    step = _json_object(file).get("step")
    if not isinstance(step, int):
        raise UserError(f"{file}: no integer 'step' (corrupt checkpoint)")
    return step


def verified_step(path: Path) -> int:
    """The step of a checkpoint that passes `verify_checkpoint` (UserError otherwise): one to resume from."""
    verify_checkpoint(path)
    return checkpoint_step(path)


# --- directories ------------------------------------------------------------------------------------------
def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def temp_dir(out_dir: str | Path, name: str) -> Path:
    return checkpoints_dir(out_dir) / f".tmp-{name}"


def _claimed_step(path: Path) -> tuple[float, bool]:
    """Sort key, newest last: the step in the name (final: its trainer_state, unreadable = newest); final wins ties."""
    match = STEP_DIR.match(path.name)
    if match:
        return int(match.group(1)), False
    try:
        return checkpoint_step(path), True
    except UserError:
        return float("inf"), True


def latest(out_dir: str | Path) -> Path | None:
    """The newest checkpoint (step_* or final; never a temp dir) that passes verification, None when there is none.

    Each newer one that fails is reported on one warning line and skipped; when every one fails, UserError."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if p.is_dir() and (STEP_DIR.match(p.name) or p.name == "final")]
    problems = []
    for path in sorted(found, key=_claimed_step, reverse=True):
        try:
            verified_step(path)
            return path
        except UserError as err:
            log.warning("skipping checkpoint %s: %s", path.name, err)
            problems.append(err)
    if problems:
        raise UserError(f"{root}: none of the {len(problems)} checkpoint(s) passes verification, the newest: "
                        f"{problems[0]}; repair or remove them, or pass --resume=fresh to start over")
    return None


def publish(tmp: Path, final: Path) -> None:
    """Write the manifest of a fully written temp checkpoint and rename it into place, replacing an older one of the
    same name."""
    give_new_modes(tmp)  # safetensors' save_file makes its files 0600 whatever the umask
    for f in _files(tmp):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    write_manifest(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prune(out_dir: str | Path, keep_last: int) -> None:
    root = checkpoints_dir(out_dir)
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clean_temp(out_dir: str | Path) -> None:
    """Remove what a killed writer left behind (never a published checkpoint)."""
    root = checkpoints_dir(out_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".old-") and not (root / p.name[5:]).exists():
                os.replace(p, root / p.name[5:])  # killed between the two renames of publish()
            elif p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
