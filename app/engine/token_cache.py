"""The tokenization cache: a second run, or a resume, on the same inputs skips tokenization.

An entry is keyed by the sha256 of
  - the rows the task loaded: for the list `read_rows` returned (app.data.Rows, checked in place by the task), the
    fingerprint of its source (the file's bytes, or the Hub revision, with the reader's code) and the row count, so
    no row is hashed; for any other list (a slice, a mix of files), the line and values of every row;
  - the tokenizer (its serialized vocabulary, merges, normalizer and post-processor, special tokens, chat template,
    class), not where it was loaded from, so a resume that loads it from a checkpoint hits the same entry;
  - the encoding settings: every config field except those of optimisation, method, evaluation, run and inference
    (and the data paths, the cache's own fields and `num_proc`), so max_seq_length, overlength, the prompt template,
    the model, `seed` (mixes) and the task's own fields count;
  - the task name and the source code of the task package, the task protocol and the encode function.
Any change to one of them is a new key and re-tokenizes. An entry is `features.safetensors` (input ids, labels,
offsets, lines as integer arrays) and `meta.json` (counts, the per-example `extra` values as JSON, the warnings the
encoding logged, the key's parts); nothing is pickled. Entries are written to a temporary directory and renamed into
place. They live in `token_cache_dir`, or `out_dir/token_cache/` by default (there, an entry replaces the older
entries of the same split). Features whose `extra` does not survive JSON are not cached (tokenized each run).

Features read from an entry, or just written to one, stay over its flat arrays: each example's ids and labels are
`Tokens` views that read like the lists they stand for (the engine's batch plan, loss counts and the tasks' collate
functions take them as they are, with the same tensors), so a hit builds no Python int and the features take 8 bytes
a token instead of about 80. `num_proc` > 1 tokenizes contiguous chunks of the rows in forked processes and joins them
in order: the same features and warnings as one process.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from app.atomic import give_new_modes
from app.config.core import EvalSection, InferSection, MethodSection, OptimSection, RunSection
from app.data import Feature

log = logging.getLogger("app.engine.token_cache")
FORMAT = 1
_NOT_ENCODING = ("token_cache", "token_cache_dir", "num_proc", "train_file", "dev_file")


def settings(cfg) -> dict:
    """The config fields that can change what encoding produces."""
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
    """The rows as read (app.data.Rows) are named by their source's fingerprint and their count; any other list
    (a slice, a task's mix) by hashing every row."""
    fingerprint = getattr(rows, "fingerprint", None)
    if fingerprint:
        return hashlib.sha256(f"source {fingerprint} {len(rows)}".encode()).hexdigest()
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.line, row.values], ensure_ascii=False, default=repr).encode())
        h.update(b"\n")
    return h.hexdigest()


def code_identity(task, encode) -> str:
    """The source of the task's package, of the modules defining the task's base classes (the task protocol) and
    of the encode function."""
    h = hashlib.sha256()
    package = Path(inspect.getfile(type(task))).parent
    bases = {Path(inspect.getfile(c)) for c in type(task).__mro__[1:] if c is not object}
    for p in sorted({*package.rglob("*.py"), *bases}):
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


# --- features over flat arrays ------------------------------------------------------------------------------
class Tokens(Sequence):
    """A read-only list of token ids over a slice of one flat integer array: what cached features hand out in place
    of a Python list (8 bytes a token for ids and labels together, built in no time). It reads like the list it
    stands for: len, indexing and slicing, iteration (Python ints), equality with lists, `+`, and `torch.tensor`
    (through DLPack, as int64 like a list's tensor); a copy or a pickle of it is a plain list."""

    __slots__ = ("_flat", "_a", "_b")

    def __init__(self, flat: np.ndarray, a: int, b: int):
        self._flat, self._a, self._b = flat, a, b

    def __len__(self) -> int:
        return self._b - self._a

    def __getitem__(self, i):
        n = self._b - self._a
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step == 1:
                return Tokens(self._flat, self._a + start, self._a + max(start, stop))
            return self.tolist()[i]
        if i < 0:
            i += n
        if not 0 <= i < n:  # torch and the sequence protocol walk until IndexError
            raise IndexError("token index out of range")
        return int(self._flat[self._a + i])

    def array(self) -> np.ndarray:
        return self._flat[self._a : self._b]

    def tolist(self) -> list[int]:
        return self.array().tolist()

    def __iter__(self):
        return iter(self.tolist())  # one C conversion, then Python ints as fast as a list's

    def __contains__(self, value) -> bool:
        return value in self.tolist()

    def __eq__(self, other):
        if isinstance(other, Tokens):
            return bool(np.array_equal(self.array(), other.array()))
        if isinstance(other, list):
            return self.tolist() == other
        return NotImplemented

    __hash__ = None  # like a list

    def __add__(self, other):
        return self.tolist() + list(other) if isinstance(other, (list, Tokens)) else NotImplemented

    def __radd__(self, other):
        return other + self.tolist() if isinstance(other, list) else NotImplemented

    def __repr__(self) -> str:
        return repr(self.tolist())

    def __reduce__(self):
        return list, (self.tolist(),)

    def __array__(self, dtype=None, copy=None):
        return self.array().astype(dtype or np.int64)

    def __dlpack__(self, *args, **kwargs):
        return self.array().astype(np.int64).__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._flat.__dlpack_device__()


class Features(list):
    """Features over flat arrays, and `arrays`: those arrays (input_ids, labels, offsets, lines), ready to save."""

    def __init__(self, features, arrays: dict):
        super().__init__(features)
        self.arrays = arrays


def _flat(features, name: str) -> np.ndarray:
    total = sum(len(getattr(f, name)) for f in features)
    seqs = lambda: itertools.chain.from_iterable(getattr(f, name) for f in features)  # noqa: E731
    try:  # int32 in the common case; ids beyond it take int64
        return np.fromiter(seqs(), dtype=np.int32, count=total)
    except OverflowError:
        return np.fromiter(seqs(), dtype=np.int64, count=total)


def pack(features) -> dict:
    """The flat arrays of a list of features (those it was built from when it is `Features`)."""
    if isinstance(features, Features):
        return features.arrays
    lengths = np.fromiter((len(f.input_ids) for f in features), dtype=np.int64, count=len(features))
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {"input_ids": _flat(features, "input_ids"), "labels": _flat(features, "labels"), "offsets": offsets,
            "lines": np.array([f.line for f in features], dtype=np.int64)}


def unpack(arrays: dict, extras: list) -> Features:
    """Features whose ids and labels are `Tokens` over the arrays (made read-only: every view shares them)."""
    for a in arrays.values():
        a.setflags(write=False)
    ids, labels, offsets, lines = arrays["input_ids"], arrays["labels"], arrays["offsets"].tolist(), arrays["lines"].tolist()
    if len(lines) + 1 != len(offsets) or len(ids) != len(labels) or offsets[-1] != len(ids) or len(extras) != len(lines):
        raise ValueError("inconsistent feature arrays")
    collecting = gc.isenabled()
    gc.disable()  # hundreds of thousands of small objects that hold no cycles: the collector's passes would cost more
    try:
        features = [Feature(Tokens(ids, a, b), Tokens(labels, a, b), line, dict(extra) if extra else {})
                    for a, b, line, extra in zip(offsets, offsets[1:], lines, extras)]
    finally:
        if collecting:
            gc.enable()
    return Features(features, arrays)


def json_extras(features) -> list | None:
    """The per-example extras when JSON keeps them as they are (None when it does not)."""
    extras = [f.extra for f in features]
    if any(extras):
        try:
            if json.loads(json.dumps(extras)) != extras:
                return None
        except (TypeError, ValueError):
            return None
    return extras


# --- entries ------------------------------------------------------------------------------------------------
def save(directory: Path, arrays: dict, extras: list, meta: dict) -> None:
    """Write an entry atomically (a concurrent writer of the same entry wins: its entry is the same)."""
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir(parents=True)
    try:
        save_file(arrays, str(tmp / "features.safetensors"))
        body = {**meta, "examples": len(extras), "tokens": len(arrays["input_ids"]),
                "extra": extras if any(extras) else None}
        (tmp / "meta.json").write_text(json.dumps(body), encoding="utf-8")
        give_new_modes(tmp)  # safetensors' save_file makes its files 0600 whatever the umask
        if directory.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(directory: Path) -> tuple[Features, dict] | None:
    """The features of an entry, or None when it is missing or unreadable (then it is rebuilt)."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        arrays = load_file(str(directory / "features.safetensors"))
        if set(arrays) != {"input_ids", "labels", "offsets", "lines"}:
            raise ValueError("incomplete entry")
        features = unpack(arrays, meta.get("extra") or [None] * len(arrays["lines"]))
    except Exception as err:  # noqa: BLE001 - any unreadable entry (truncated, foreign) is rebuilt
        if directory.exists():
            log.warning("token cache %s unreadable (%s): tokenizing again", directory, err)
        return None
    return features, meta


# --- tokenizing in several processes --------------------------------------------------------------------------
class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _encode_logger(encode) -> logging.Logger:
    return logging.getLogger(getattr(encode, "__module__", "app.engine.loop") or "app.engine.loop")


_JOB: tuple | None = None  # (task, rows, tokenizer, cfg, path, encode): what forked workers inherit, never pickled


def _encode_chunk(bounds: tuple[int, int]):
    """In a worker: encode rows[a:b]; its features as arrays, their extras and the warnings it logged."""
    task, rows, tokenizer, cfg, path, encode = _JOB
    capture = _Capture()
    logger = _encode_logger(encode)
    logger.handlers, logger.propagate = [capture], False  # the parent logs them once, merged
    features = encode(task, rows[bounds[0] : bounds[1]], tokenizer, cfg, path)
    return pack(features), [f.extra for f in features], capture.messages


_COUNTED = re.compile(r"^(?P<head>.*?): (?P<k>\d+) of (?P<n>\d+) (?P<tail>.+)$")


def merge_warnings(chunks: list[list[str]]) -> list[str]:
    """The warnings of the chunks as one encoding of all rows logs them: the others in order, then each
    'PATH: K of N examples ...' summary once, its counts summed over the chunks."""
    plain, counted = [], {}
    for messages in chunks:
        for message in messages:
            m = _COUNTED.match(message)
            if m is None:
                plain.append(message)
                continue
            k, n = counted.get((m["head"], m["tail"]), (0, 0))
            counted[(m["head"], m["tail"])] = (k + int(m["k"]), n + int(m["n"]))
    return plain + [f"{head}: {k} of {n} {tail}" for (head, tail), (k, n) in counted.items()]


def _join(parts: list[dict]) -> dict:
    lengths = np.concatenate([np.diff(p["offsets"]) for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {"input_ids": np.concatenate([p["input_ids"] for p in parts]),
            "labels": np.concatenate([p["labels"] for p in parts]), "offsets": offsets,
            "lines": np.concatenate([p["lines"] for p in parts])}


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    edges = [n * i // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def tokenize(task, rows, tokenizer, cfg, path, encode):
    """`encode` over the rows, in `cfg.num_proc` processes when it is above 1: contiguous chunks encoded in forked
    workers and joined in order, so the features (array-backed, `Features`) and the warnings are those of one
    process. The first error in row order is raised, as one process would raise it."""
    global _JOB
    procs = min(getattr(cfg, "num_proc", 1), len(rows))
    if procs <= 1 or "fork" not in mp.get_all_start_methods():  # workers inherit the tokenizer and rows by fork
        return encode(task, rows, tokenizer, cfg, path)
    start = time.perf_counter()
    _JOB = (task, rows, tokenizer, cfg, path, encode)
    # a few chunks per process even out uneven rows; each chunk's features come back as arrays (cheap to pickle)
    bounds = chunk_bounds(len(rows), procs * 4)
    try:
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("fork")) as pool:
            try:
                results = list(pool.map(_encode_chunk, bounds))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        _JOB = None
    logger = _encode_logger(encode)
    for message in merge_warnings([messages for _, _, messages in results]):
        logger.warning("%s", message)
    features = unpack(_join([arrays for arrays, _, _ in results]), [e for _, extras, _ in results for e in extras])
    log.info("%s: %d rows tokenized in %d processes (%.1f s)", path, len(rows), procs, time.perf_counter() - start)
    return features


# --- the cache ----------------------------------------------------------------------------------------------
def encode_cached(task, rows, tokenizer, cfg, split: str, encode) -> list[Feature]:
    """`encode(task, rows, tokenizer, cfg, path)` of the rows of `split` ("train": from cfg.train_file, "dev": from
    cfg.dev_file) through the cache (cfg.token_cache), with the same result. Features written to or read from the
    cache come over flat arrays (`Tokens`); without the cache they are what `encode` returns (array-backed too when
    `num_proc` > 1)."""
    path = cfg.train_file if split == "train" else cfg.dev_file
    if not rows:
        return encode(task, rows, tokenizer, cfg, path)
    if not cfg.token_cache:
        return tokenize(task, rows, tokenizer, cfg, path, encode)
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
    encode_log = _encode_logger(encode)
    encode_log.addHandler(capture)
    try:
        features = tokenize(task, rows, tokenizer, cfg, path, encode)
    finally:
        encode_log.removeHandler(capture)
    extras = json_extras(features)
    if extras is None:
        log.info("%s: features hold values JSON does not keep; not cached", path)
        return features
    arrays = pack(features)
    meta = {"key": key, "parts": parts, "source": str(path), "warnings": capture.messages}
    try:
        if directory.exists():  # unreadable: replaced
            shutil.rmtree(directory, ignore_errors=True)
        save(directory, arrays, extras, meta)
        if not cfg.token_cache_dir:  # the run's own cache: older entries of this split are stale
            for old in root.glob(f"{split}-*"):
                if old != directory:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("%s: tokenized data cached in %s", path, directory)
    except OSError as err:
        log.warning("token cache not written to %s: %s", directory, err)
        return features
    # the same features as the entry hands out on the next run: arrays, not millions of Python ints, from here on
    return features if isinstance(features, Features) else unpack(arrays, extras)
