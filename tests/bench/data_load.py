"""Data path benchmark: generated NLI-length rows -> rows -> tokenized features, as the engine does before step 1.

    python tests/bench/data_load.py                      # 200,000 rows; about 6-9 minutes on 2 shared cores
    python tests/bench/data_load.py --rows 20000 --json out.json

Rows: premise ~25 words, hypothesis ~8, thought_process ~45 (seeded), written once as CSV and as Parquet into a
temporary directory. Tokenizer: the Mistral tokenizer of ../shared/fixtures when present, else the embedded tiny
model's. Each mode runs in its own process, one after another (so each peak is its own):

  today        read_rows on the CSV + the task's checks + encode_all, no cache (the path before the cache)
  cold         the same through encode_cached with an empty cache (tokenizes, writes the entry)
  cached       the same again: the entry is hit (keyed by the CSV's bytes, features over the entry's arrays)
  cold2        cold with num_proc=2 (another empty cache): tokenization in 2 forked processes
  parquet      the rows only, from the Parquet file through `datasets` (its reader against the CSV reader's read_s)

Time: wall seconds from the start of reading the data to the features being ready (what stands between the start
of a run and its first step once the model has loaded), and to the engine's own pass over them before step 1 (the
batch plan's lengths and every example's loss items, as app/engine/loop.py computes them): `ready_s`. Peak memory of
the data path: the process's peak RSS (VmHWM, started over just before reading) minus its RSS then (tokenizer and
libraries loaded), beside the
size of the tokenized data as Python int lists (two per example: list objects plus 32 bytes per int outside the
small-int cache; how the engine held them before the cache) and as int32 arrays (the entry's size); `held` is what
the features returned actually hold (lists, or the arrays plus one Feature and two views per example). The read's
peak is printed beside the read time: the parsed rows, which the engine keeps for the whole run, are part of the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
WORDS = ("the a museum garden kitchen beach office library river station forest market bridge tower school "
         "is walking cooking reading waiting writing painting sleeping singing outdoors indoors because since "
         "quiet busy old new bright dark small large near far every some no person child teacher doctor").split()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Start the peak RSS over from the current RSS (Linux: clear_refs 5), so that loading the tokenizer and the
    libraries, whose transient peak can be higher than the data's, does not hide it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def generate(directory: Path, n: int) -> tuple[Path, Path]:
    import datasets

    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    rows = [{"premise": words(rng.randint(18, 32)), "hypothesis": words(rng.randint(5, 11)), "label": rng.randint(0, 1),
             "thought_process": words(rng.randint(35, 55))} for _ in range(n)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(directory / "train.csv"), index=False)
    ds.to_parquet(str(directory / "train.parquet"))
    return directory / "train.csv", directory / "train.parquet"


def tokenizer_dir(tmp: Path) -> str:
    shared = ROOT.parent / "shared" / "fixtures" / "tokenizer" / "mistral-7b-instruct-v0.2"
    if shared.is_dir():
        return str(shared)
    from app.lm.tiny import write_tiny_model

    return str(write_tiny_model(tmp / "tiny"))


def held_bytes(features) -> tuple[int, int, int]:
    """(as int lists, as int32, actually held) bytes of the features."""
    import numpy as np

    from app.engine import token_cache

    arrays = token_cache.pack(features)
    tokens = len(arrays["input_ids"])
    small = sum(int(((a >= -5) & (a <= 256)).sum()) for a in (arrays["input_ids"], arrays["labels"]))
    lists = 2 * (56 * len(features) + 8 * tokens) + 32 * (2 * tokens - small)
    if not isinstance(features, token_cache.Features):
        return lists, 8 * tokens, lists
    f = features[0]
    per = sys.getsizeof(f) + sys.getsizeof(f.__dict__) + 2 * sys.getsizeof(f.input_ids) + sys.getsizeof(f.extra)
    return lists, 8 * tokens, sum(int(np.asarray(a).nbytes) for a in arrays.values()) + per * len(features)


def worker(mode: str, source: str, tok: str, cache_dir: str) -> dict:
    import logging

    from app.config import make_config
    from app.engine import token_cache
    from app.engine.loop import encode_all, loss_counts
    from app.lm.modeling import load_tokenizer
    from app.tasks import get_task

    logging.disable(logging.WARNING)
    cfg = make_config(train_file=source, dev_file=None, model_name=tok, token_cache=mode != "today",
                      token_cache_dir=cache_dir, max_seq_length=1024, num_proc=2 if mode == "cold2" else 1)
    task = get_task("nli_cot")
    tokenizer = load_tokenizer(cfg)
    import datasets  # noqa: F401  (imported by every mode before the window: library, not data)

    base = rss()
    peak_reset = reset_peak()
    start = time.perf_counter()
    rows = task.load_rows(cfg, "train")
    read_s = time.perf_counter() - start
    read_peak = peak_rss() - base
    if mode == "parquet":  # the rows only: the datasets reader against today's CSV reader
        return {"mode": mode, "rows": len(rows), "read_s": read_s,
                "peak_bytes": peak_rss() - base, "peak_reset": peak_reset}
    if mode == "today":
        features = encode_all(task, rows, tokenizer, cfg, source)
    else:
        features = token_cache.encode_cached(task, rows, tokenizer, cfg, "train", encode_all)
    total_s = time.perf_counter() - start
    lengths = tuple(len(f.input_ids) for f in features)  # the engine's pass before step 1 (BatchPlan, loss items)
    items = [loss_counts(task, f) for f in features]
    ready_s = time.perf_counter() - start
    peak = peak_rss() - base
    as_lists, as_int32, held = held_bytes(features)
    return {"mode": mode, "rows": len(rows), "examples": len(features), "tokens": sum(lengths), "read_s": read_s,
            "to_features_s": total_s, "ready_s": ready_s, "peak_bytes": peak, "read_peak_bytes": read_peak,
            "features_bytes": as_lists,
            "int32_bytes": as_int32, "held_bytes": held, "loss_items": sum(sum(i.values()) for i in items),
            "worker_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # the largest one
            "peak_reset": peak_reset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv_path, parquet = generate(tmp, args.rows)
        tok = tokenizer_dir(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_CACHE": str(tmp / "ds"), "HF_HUB_OFFLINE": "1"}
        results = []
        modes = [("today", csv_path, "cache"), ("cold", csv_path, "cache"), ("cached", csv_path, "cache"),
                 ("cold2", csv_path, "cache2"), ("parquet", parquet, "cache")]
        for mode, source, cache in modes:
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(source), tok, str(tmp / cache)],
                                 env=env, capture_output=True, text=True, check=True)
            results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "load_before": load})
            r = results[-1]
            if mode == "parquet":
                print(f"{mode:<8} rows read through datasets in {r['read_s']:.2f} s, peak {r['peak_bytes'] / 2**20:.0f} MiB "
                      f"(load {load:.1f})")
                continue
            print(f"{mode:<8} {r['to_features_s']:7.2f} s to features, {r['ready_s']:7.2f} s to step 1 (read "
                  f"{r['read_s']:.2f} s, peak {r['read_peak_bytes'] / 2**20:.0f} MiB)  peak {r['peak_bytes'] / 2**20:6.0f} MiB = "
                  f"{r['peak_bytes'] / r['features_bytes']:.2f}x the int lists ({r['features_bytes'] / 2**20:.0f} MiB), "
                  f"{r['peak_bytes'] / r['int32_bytes']:.2f}x int32 ({r['int32_bytes'] / 2**20:.0f} MiB); holds "
                  f"{r['held_bytes'] / 2**20:.0f} MiB; {r['tokens']:,} tokens (load {load:.1f})"
                  + (f"; largest worker's peak RSS {r['worker_peak_bytes'] / 2**20:.0f} MiB" if mode == "cold2" else ""),
                  flush=True)
    by = {r["mode"]: r for r in results}
    assert len({(r["examples"], r["tokens"], r["loss_items"]) for r in results if "tokens" in r}) == 1, "modes differ"
    summary = {"rows": args.rows, "tokenizer": Path(tok).name, "results": results, "load_after": os.getloadavg()[0],
               "cold_over_cached": by["cold"]["to_features_s"] / by["cached"]["to_features_s"],
               "cold_over_cached_ready": by["cold"]["ready_s"] / by["cached"]["ready_s"],
               "today_over_cached": by["today"]["to_features_s"] / by["cached"]["to_features_s"],
               "cold_over_cold2": by["cold"]["to_features_s"] / by["cold2"]["to_features_s"]}
    print(f"cached re-run has its features {summary['cold_over_cached']:.1f}x sooner than the cold run "
          f"({summary['cold_over_cached_ready']:.1f}x to step 1; {summary['today_over_cached']:.1f}x sooner than "
          f"today's reader); num_proc=2 tokenizes {summary['cold_over_cold2']:.2f}x faster; load "
          f"{summary['load_after']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
