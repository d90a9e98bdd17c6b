"""Checkpoints: written to a temp directory and renamed into place, so a kill never leaves a half checkpoint.

Layout of out_dir/checkpoints/<name>/ (name = step_000120, best, final):
  adapter_model.safetensors + adapter_config.json (LoRA) or model.safetensors + config.json (full)
  tokenizer files
  optimizer.safetensors + optimizer.json   tensors and the rest of the optimizer state (no pickle)
  scheduler.json                           learning-rate scheduler state
  rng_rank{R}.json + rng_rank{R}.safetensors   python/numpy/torch RNG of every process
  trainer_state.json                       step, data position, best metric
  run_config.json                          the resolved config
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d+)$")


def write_json(path: Path, value) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """Optimizer state as safetensors (tensors, also nested ones such as bitsandbytes' quant state) + JSON."""
    sd = optimizer.state_dict()
    tensors: dict = {}
    plain = {str(pid): _split_tensors(state, str(pid), tensors) for pid, state in sd["state"].items()}
    save_file(tensors, str(directory / "optimizer.safetensors"))
    write_json(directory / "optimizer.json", {"param_groups": sd["param_groups"], "state": plain})


def load_optimizer(optimizer, directory: Path) -> None:
    meta = read_json(directory / "optimizer.json")
    state = meta["state"]
    for name, tensor in load_file(str(directory / "optimizer.safetensors")).items():
        *parents, key = name.split("/")
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = tensor
    optimizer.load_state_dict({"state": {int(pid): v for pid, v in state.items()}, "param_groups": meta["param_groups"]})


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


# --- directories ------------------------------------------------------------------------------------------
def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def temp_dir(out_dir: str | Path, name: str) -> Path:
    return checkpoints_dir(out_dir) / f".tmp-{name}"


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def latest(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step among step_* and final (a temp dir never counts)."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if (STEP_DIR.match(p.name) or p.name == "final") and is_complete(p)]
    return max(found, key=lambda p: read_json(p / "trainer_state.json")["step"], default=None)


def publish(tmp: Path, final: Path) -> None:
    """Rename a fully written temp checkpoint into place, replacing an older one of the same name."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
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
