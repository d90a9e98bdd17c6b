"""The tokenization cache: a second run, or a resume, on the same inputs skips tokenization.

An entry is keyed by the sha256 of
  - the rows the task loaded (line and values of each, after its checks): the data's content, whatever its source;
  - the tokenizer (its serialized vocabulary, merges, normalizer and post-processor, special tokens, chat template,
    class), not where it was loaded from, so a resume that loads it from a checkpoint hits the same entry;
  - the encoding settings: every config field except those of optimisation, method, evaluation, run and inference
    (and the data paths themselves), so max_seq_length, overlength, the prompt template, the model, `seed` (mixes)
    and the task's own fields count;
  - the task name and the source code of the task package, the task protocol and the encode function.
Any change to one of them is a new key and re-tokenizes. An entry is `features.safetensors` (input ids, labels,
offsets, lines as integer arrays) and `meta.json` (counts, the per-example `extra` values as JSON, the warnings the
encoding logged, the key's parts); nothing is pickled. Entries are written to a temporary directory and renamed into
place. They live in `token_cache_dir`, or `out_dir/token_cache/` by default (there, an entry replaces the older
entries of the same split). Features whose `extra` does not survive JSON are not cached (tokenized each run).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from app.tasks.protocol import Feature

log = logging.getLogger("app.engine.token_cache")
FORMAT = 1
_NOT_ENCODING = ("token_cache", "token_cache_dir", "train_file", "dev_file")


def settings(cfg) -> dict:
    """The config fields that can change what encoding produces."""
    from app.config.core import EvalSection, InferSection, MethodSection, OptimSection, RunSection

    skip = {n for s in (OptimSection, MethodSection, EvalSection, RunSection, InferSection) for n in s.model_fields}
    skip = (skip - {"seed"}) | set(_NOT_ENCODING)
    return {k: v for k, v in cfg.model_dump().items() if k not in skip}


def tokenizer_identity(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    extra = {"special": getattr(tokenizer, "special_tokens_map", {}), "len": len(tokenizer),
             "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": getattr(tokenizer, "bos_token_id", None),
             "chat_template": getattr(tokenizer, "chat_template", None),
             "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None),
             "padding_side": getattr(tokenizer, "padding_side", None),
             "truncation_side": getattr(tokenizer, "truncation_side", None)}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def rows_identity(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.line, row.values], ensure_ascii=False, default=repr).encode())
        h.update(b"\n")
    return h.hexdigest()


def code_identity(task, encode) -> str:
    """The source of the task's package, the task protocol and the encode function."""
    import app.tasks.protocol as protocol

    h = hashlib.sha256()
    package = Path(inspect.getfile(type(task))).parent
    for p in sorted([*package.rglob("*.py"), Path(protocol.__file__)]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    try:
        h.update(inspect.getsource(encode).encode())
    except (OSError, TypeError):
        h.update(getattr(encode, "__qualname__", repr(encode)).encode())
    return h.hexdigest()


def cache_key(task, rows, tokenizer, cfg, encode) -> tuple[str, dict]:
    parts = {"format": FORMAT, "task": cfg.task, "rows": rows_identity(rows), "tokenizer": tokenizer_identity(tokenizer),
             "settings": hashlib.sha256(json.dumps(settings(cfg), sort_keys=True, default=repr).encode()).hexdigest(),
             "code": code_identity(task, encode)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def cache_root(cfg) -> Path:
    return Path(cfg.token_cache_dir) if cfg.token_cache_dir else cfg.out_path / "token_cache"


def save(directory: Path, features: list[Feature], meta: dict) -> bool:
    """Write an entry atomically; False (nothing written) when the features' extras do not survive JSON."""
    from safetensors.numpy import save_file

    extras = [f.extra for f in features]
    if any(extras):
        try:
            if json.loads(json.dumps(extras)) != extras:
                return False
        except (TypeError, ValueError):
            return False
    lengths = np.fromiter((len(f.input_ids) for f in features), dtype=np.int64, count=len(features))
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    def flat(name: str):
        try:  # int32 in the common case (no copy); ids beyond it take int64
            return np.fromiter((t for f in features for t in getattr(f, name)), dtype=np.int32, count=total)
        except OverflowError:
            return np.fromiter((t for f in features for t in getattr(f, name)), dtype=np.int64, count=total)

    tensors = {"input_ids": flat("input_ids"), "labels": flat("labels"), "offsets": offsets,
               "lines": np.array([f.line for f in features], dtype=np.int64)}
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "features.safetensors"))
        body = {**meta, "examples": len(features), "tokens": total,
                "extra": extras if any(extras) else None}
        (tmp / "meta.json").write_text(json.dumps(body), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def load(directory: Path) -> tuple[list[Feature], dict] | None:
    """The features of an entry, or None when it is missing or unreadable (then it is rebuilt)."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        t = load_file(str(directory / "features.safetensors"))
        offsets, lines = t["offsets"].tolist(), t["lines"].tolist()
        if not {"input_ids", "labels"} <= set(t) or len(lines) + 1 != len(offsets):
            raise ValueError("incomplete entry")
    except Exception as err:  # noqa: BLE001 - any unreadable entry (truncated, foreign) is rebuilt
        if directory.exists():
            log.warning("token cache %s unreadable (%s): tokenizing again", directory, err)
        return None
    extras = meta.get("extra") or [None] * len(lines)
    collecting = gc.isenabled()
    gc.disable()  # millions of new ints and lists: the collector's passes over them would cost more than the copy
    try:
        features = []
        for name in ("input_ids", "labels"):  # one list at a time, sliced per example (the slices share the ints)
            flat = t[name].tolist()
            for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
                if name == "input_ids":
                    features.append(Feature(flat[a:b], [], lines[i], dict(extras[i]) if extras[i] else {}))
                else:
                    features[i].labels = flat[a:b]
            del flat
    finally:
        if collecting:
            gc.enable()
    return features, meta


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def encode_cached(task, rows, tokenizer, cfg, path, split: str, encode) -> list[Feature]:
    """`encode(task, rows, tokenizer, cfg, path)` through the cache (cfg.token_cache), with the same result."""
    if not cfg.token_cache or not rows:
        return encode(task, rows, tokenizer, cfg, path)
    start = time.perf_counter()
    key, parts = cache_key(task, rows, tokenizer, cfg, encode)
    root = cache_root(cfg)
    directory = root / f"{split}-{key[:24]}"
    hit = load(directory)
    if hit is not None:
        features, meta = hit
        for message in meta.get("warnings", []):
            log.warning("%s", message)
        log.info("%s: %d tokenized examples from the cache %s (%.2f s)", path, len(features), directory,
                 time.perf_counter() - start)
        return features
    capture = _Capture()
    encode_log = logging.getLogger(getattr(encode, "__module__", "app.engine.loop") or "app.engine.loop")
    encode_log.addHandler(capture)
    try:
        features = encode(task, rows, tokenizer, cfg, path)
    finally:
        encode_log.removeHandler(capture)
    meta = {"key": key, "parts": parts, "source": str(path), "warnings": capture.messages}
    try:
        if directory.exists():  # unreadable: replaced
            shutil.rmtree(directory, ignore_errors=True)
        if save(directory, features, meta):
            if not cfg.token_cache_dir:  # the run's own cache: older entries of this split are stale
                for old in root.glob(f"{split}-*"):
                    if old != directory:
                        shutil.rmtree(old, ignore_errors=True)
            log.info("%s: tokenized data cached in %s", path, directory)
        else:
            log.info("%s: features hold values JSON does not keep; not cached", path)
    except OSError as err:
        log.warning("token cache not written to %s: %s", directory, err)
    return features
