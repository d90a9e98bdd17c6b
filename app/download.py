"""`python -m app download model NAME | data ID | --for CONFIG.py`: prefetch into the Hugging Face cache.

For machines where training runs without internet (Slurm compute nodes, pods with a mounted volume): run this once
where there is a connection (a login node, the pod before HF_HUB_OFFLINE=1) with the same HF_HOME / HF_HUB_CACHE the
jobs use, then run the jobs with HF_HUB_OFFLINE=1. Models are fetched without `*.bin`/`*.pt`/`*.pth` weights (this
program loads safetensors only); data as the dataset repository's snapshot, or with `--split` only the files whose
names hold the split. Each fetch prints where it went (the snapshot directory) and how much it holds. Private and
gated repositories need HF_TOKEN.

A name that is neither a local directory nor a valid Hub repository id is a one-line error before any network access.
"""

from __future__ import annotations

from pathlib import Path

from app.errors import UserError
from app.sources import HubId, hub_cache_dir, is_hub_id, parse_hub_id, snapshot

MODEL_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite", "original/*"]
DATA_ALWAYS = ["*.md", "*.json", "*.yaml", "*.yml", "*.txt"]


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())  # stat follows the blob links


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _report(what: str, local: Path) -> dict:
    size = size_of(local)
    print(f"{what}: {local} ({human(size)}, revision {local.name})")
    return {"what": what, "path": str(local), "bytes": size, "revision": local.name}


def check_repo_id(repo: str, shown: str, neither: str = "not") -> None:
    """Refuse, without a request, what the Hub would refuse as a repository id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UserError(f"{shown}: {neither} a Hub repository id (OWNER/NAME: letters, digits, '-', '_', '.', "
                        "no '--' or '..', at most 96 characters)") from None


def check_model_name(name: str) -> None:
    """A local model directory or a valid Hub model id (OWNER/NAME); anything else is refused without a request."""
    if not name.strip():
        raise UserError("download model: the model name is empty (give OWNER/NAME or a local model directory)")
    if Path(name).is_dir():
        return
    if Path(name).exists():
        raise UserError(f"{name}: is a file; give a Hub model name (OWNER/NAME) or a local model directory")
    check_repo_id(name, name, neither="neither a local directory nor")


def download_model(name: str, revision: str | None = None) -> dict:
    check_model_name(name)
    if Path(name).is_dir():
        print(f"{name}: a local directory, nothing to fetch")
        return {"what": name, "path": str(Path(name).resolve()), "bytes": size_of(Path(name)), "revision": None}
    return _report(name, snapshot(name, "model", revision, ignore_patterns=MODEL_IGNORE))


def hub_data_id(source: str) -> HubId:
    """OWNER/NAME or hf:OWNER/NAME[@REV][:CONFIG][:SPLIT], checked without a request."""
    hub = parse_hub_id(source if is_hub_id(source) else f"hf:{source}")
    check_repo_id(hub.repo, f"hf:{hub.repo}")
    return hub


def download_data(source: str, split: str | None = None, revision: str | None = None) -> dict:
    hub = hub_data_id(source)
    revision = revision or hub.revision
    patterns = None if split is None else [f"*{split}*", f"*{split}*/**", *DATA_ALWAYS]
    local = snapshot(hub.repo, "dataset", revision, allow_patterns=patterns)
    if split is not None and not any(split in str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()):
        raise UserError(f"hf:{hub.repo}: no file of split {split!r} in the repository (fetch it whole without --split)")
    return _report(str(HubId(hub.repo, revision, hub.parts)), local)


def hub_names(cfg) -> tuple[list[str], list[str]]:
    """(models, Hub data ids) a config names: the base model and tokenizer when they are not local directories, and
    every `hf:` string among its fields."""
    models = [n for n in dict.fromkeys([cfg.model_name, cfg.tokenizer_name]) if n and not Path(n).exists()]
    data: list[str] = []

    def walk(value):
        if isinstance(value, str) and is_hub_id(value):
            data.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(cfg.model_dump())
    return models, list(dict.fromkeys(data))


def download_for(config_file: str, overrides=()) -> list[dict]:
    from app.config import load_config

    cfg = load_config(config_file, list(overrides))
    models, data = hub_names(cfg)
    if getattr(cfg, "create_tiny_model", False) and cfg.model_name in models:
        models.remove(cfg.model_name)  # written locally by the run
    for name in models:  # every name checked before the first fetch
        check_model_name(name)
    for source in data:
        hub_data_id(source)
    if not models and not data:
        print(f"{config_file}: names nothing on the Hub (local model and data)")
    out = [download_model(m) for m in models]
    for source in data:
        hub = parse_hub_id(source)
        out.append(download_data(source))
        from app.sources import load_hub

        load_hub(str(hub))  # the split loads from what was fetched (and datasets' own cache is warmed)
    print(f"cache: {hub_cache_dir()}; run the jobs with HF_HUB_OFFLINE=1 and the same HF_HOME / HF_HUB_CACHE")
    return out
