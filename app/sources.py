"""Data sources beyond CSV/JSONL/JSON: Parquet files, `Dataset.save_to_disk` directories and Hub datasets.

    hf:OWNER/NAME[@REVISION][:CONFIG][:SPLIT]     a Hugging Face Hub dataset (config and split optional)
    data/train.parquet                            a Parquet file (also .pq)
    data/train_ds/                                a directory written by `Dataset.save_to_disk`

`app.data.read_rows` sends these here (`read_records`); CSV, JSONL and JSON keep their own readers (errors naming
the file and line). Rows of these sources carry their record number (1-based) where a file's rows carry their line,
so a task's checks still point at the record: `hf:org/nli:train:3: label must be 0 or 1, found 7`.

Hub datasets are fetched with `huggingface_hub.snapshot_download` into the Hugging Face cache (`HF_HOME` /
`HF_HUB_CACHE`), honouring `HF_HUB_OFFLINE` (read at each call) and `HF_TOKEN`, and the snapshot is loaded with
`datasets`. With one part after the id, it is the split when the dataset has a split of that name, else the config;
`hf:org/nli::validation` names a split with the default config. Without a split: `train`, or the only split there is.
Offline with nothing cached is one line naming the id and the prefetch command (`python -m app download data ID`).

`describe(source)` gives what a run records in `data_sources.json`: kind, path or id, revision, fingerprint. The rows
carry that fingerprint too (app.data.Rows, with the datasets and pyarrow versions that typed the values): the token
cache names them by it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from app.errors import UserError
from app.packages import missing

PARQUET_SUFFIXES = (".parquet", ".pq")
_HUB = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^:]+))?(?P<rest>(?::[^:]*){0,2})$")


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None
    parts: tuple[str, ...] = ()  # what follows the id: (), (config or split,), (config, split)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.repo}{rev}" + "".join(f":{p}" for p in self.parts)


def is_hub_id(source) -> bool:
    return isinstance(source, str) and source.startswith("hf:")


def parse_hub_id(source: str) -> HubId:
    m = _HUB.match(source)
    if not m:
        raise UserError(f"{source}: not a Hub dataset id (expected hf:OWNER/NAME[@REVISION][:CONFIG][:SPLIT])")
    rest = m.group("rest")
    return HubId(m.group("repo"), m.group("rev"), tuple(rest[1:].split(":")) if rest else ())


def is_save_to_disk_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json", "dataset_info.json"))


def handles(source) -> bool:
    """Whether this module reads `source` (the rest is CSV/JSONL/JSON for app.data)."""
    if is_hub_id(str(source)):
        return True
    path = Path(source)
    return path.suffix.lower() in PARQUET_SUFFIXES or is_save_to_disk_dir(path)


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise missing("datasets", "reading Parquet, save_to_disk directories and Hub datasets") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
                                              else constants.HF_HUB_CACHE)


def snapshot(repo: str, repo_type: str, revision: str | None = None, **kwargs) -> Path:
    """The local snapshot of a Hub repository (downloaded unless offline); one-line errors."""
    # the Hub client (and its HTTP stack) only where a Hub id is read: `score` and `config` read local files
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    what = "data" if repo_type == "dataset" else "model"
    shown = f"hf:{repo}" if repo_type == "dataset" else repo
    fetch = f"python -m app download {what} {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, cache_dir=hub_cache_dir(),
                                      local_files_only=offline(), token=os.environ.get("HF_TOKEN") or None, **kwargs))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if offline():
            raise UserError(f"{shown}: not in the Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE=1; "
                            f"prefetch it where there is internet: {fetch}") from None
        raise UserError(f"{shown}: cannot reach the Hub and nothing is cached ({hub_cache_dir()}); "
                        f"prefetch it: {fetch}") from None
    except GatedRepoError:
        raise UserError(f"{shown}: gated repository; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{shown}: no such {repo_type} repository on the Hub, or no access (set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{shown}: revision {revision!r} not found") from None


_resolved: dict[str, dict] = {}  # source -> what describe() reports (filled when a source loads)


def _pick_split(source: str, splits, wanted: str | None) -> str:
    splits = list(splits)
    if wanted:
        if wanted not in splits:
            raise UserError(f"{source}: no split {wanted!r} (splits: {', '.join(splits)})")
        return wanted
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise UserError(f"{source}: several splits ({', '.join(splits)}); name one: {source}:SPLIT")


def load_hub(source: str):
    """The `datasets.Dataset` a Hub id names, and its description."""
    datasets = import_datasets()
    hub = parse_hub_id(source)
    local = snapshot(hub.repo, "dataset", hub.revision)
    config, split = (hub.parts + (None, None))[:2] if len(hub.parts) != 1 else (None, None)
    try:
        if len(hub.parts) == 1:  # a split of the default config, or a config
            whole = datasets.load_dataset(str(local))
            if hub.parts[0] in whole:
                split = hub.parts[0]
            else:
                config = hub.parts[0]
        loaded = datasets.load_dataset(str(local), name=config or None)
    except UserError:
        raise
    except Exception as err:  # datasets raises many kinds (bad config name, unreadable files)
        raise UserError(f"{source}: cannot load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                        ) from None
    split = _pick_split(source, loaded.keys(), split)
    info = {"kind": "hub", "id": hub.repo, "revision": local.name, "config": config or None, "split": split,
            "fingerprint": hashlib.sha256(f"{hub.repo}@{local.name}:{config}:{split}".encode()).hexdigest()}
    return loaded[split], info


def load_local(path: Path):
    datasets = import_datasets()
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                split = _pick_split(str(path), loaded.keys(), None)
                loaded = loaded[split]
            kind = "save_to_disk"
        else:
            loaded = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
            kind = "parquet"
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: cannot read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                        ) from None
    return loaded, {"kind": kind, "path": str(path), "fingerprint": fingerprint_path(path)}


def fingerprint_path(path: Path) -> str:
    """sha256 over the bytes of a file, or of every file in a directory (with their relative names)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_records(source, required: tuple[str, ...] = ()) -> tuple[list[dict], str, str]:
    """The records of a Parquet file, save_to_disk directory or Hub id (the `required` columns must exist), with the
    source's kind and identity: its fingerprint and the versions of the readers that typed the values. app.data
    makes them rows (line = record number) named by that identity."""
    name = str(source)
    dataset, info = load_hub(name) if is_hub_id(name) else load_local(Path(source))
    _resolved[name] = info
    columns = list(dataset.column_names)
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{name}: missing column(s) {', '.join(missing)} (columns found: {', '.join(columns) or 'none'})")
    if len(dataset) == 0:
        raise UserError(f"{name}: no data rows")
    # the values' Python types come from datasets and pyarrow: their versions are part of what the rows are
    versions = f"{info['fingerprint']} datasets {import_datasets().__version__} pyarrow {_pyarrow_version()}"
    return dataset.to_list(), info["kind"], versions


def _pyarrow_version() -> str:
    import pyarrow

    return pyarrow.__version__


def describe(source) -> dict:
    """What a run records about one data source: kind, path or Hub id + revision, fingerprint."""
    name = str(source)
    if name in _resolved:
        return {"source": name, **_resolved[name]}
    if is_hub_id(name):
        try:
            _, info = load_hub(name)  # resolves the revision (from the cache when offline)
        except UserError as err:
            return {"source": name, "kind": "hub", "error": str(err)}
        return {"source": name, **info}
    path = Path(name)
    if not path.exists():
        return {"source": name, "kind": "missing"}
    kind = "parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "save_to_disk" if path.is_dir() else (
        "json" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv")
    return {"source": name, "kind": kind, "path": str(path.resolve()), "fingerprint": fingerprint_path(path)}


def run_sources(cfg) -> list[dict]:
    """Every data source a config names (train_file, dev_file, and the task's *_files fields), described."""
    names: list[tuple[str, str]] = []
    for field, value in cfg.model_dump().items():
        if field in ("train_file", "dev_file") or field.endswith("_files"):
            values = value if isinstance(value, (list, dict)) else [value]
            values = values.values() if field == "validation_files" and isinstance(value, dict) else values
            names += [(field, str(v)) for v in values if isinstance(v, str) and v]
    seen, out = set(), []
    for field, name in names:
        if name not in seen:
            seen.add(name)
            out.append({"field": field, **describe(name)})
    return out
