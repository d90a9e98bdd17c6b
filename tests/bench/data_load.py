"""Data path benchmark: generated NLI-length rows -> rows -> tokenized features, as the engine does before step 1.

    python tests/bench/data_load.py                      # 200,000 rows; about 5-8 minutes on 2 shared cores
    python tests/bench/data_load.py --rows 20000 --json out.json

Rows: premise ~25 words, hypothesis ~8, thought_process ~45 (seeded), written once as CSV and as Parquet into a
temporary directory. Tokenizer: the Mistral tokenizer of ../shared/fixtures when present, else the embedded tiny
model's. Each mode runs in its own process, one after another (so each peak is its own):

  today        read_rows on the CSV + the task's checks + encode_all, no cache (the path before the cache)
  cold         the same through encode_cached with an empty cache (tokenizes, writes the entry)
  cached       the same again: the entry is hit
  parquet      the rows only, from the Parquet file through `datasets` (its reader against the CSV reader's read_s)

Time: wall seconds from the start of reading the data to the features being ready (what stands between the start
of a run and its first step once the model has loaded). Peak memory of the data path: the process's peak RSS minus
its RSS just before reading (tokenizer and libraries loaded). Tokenized data size: the features as the engine holds
them (two Python int lists per example: list objects plus 32 bytes per int outside the small-int cache); beside it
the same tokens as int32 arrays (the cache entry's size).
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


def worker(mode: str, source: str, tok: str, cache_dir: str) -> dict:
    import logging

    from app.config import make_config
    from app.engine import token_cache
    from app.engine.loop import encode_all
    from app.lm.modeling import load_tokenizer
    from app.tasks import get_task

    logging.disable(logging.WARNING)
    cfg = make_config(train_file=source, dev_file=None, model_name=tok, token_cache=mode != "today",
                      token_cache_dir=cache_dir, max_seq_length=1024)
    task = get_task("nli_cot")
    tokenizer = load_tokenizer(cfg)
    import datasets  # noqa: F401  (imported by every mode before the window: library, not data)

    base = rss()
    start = time.perf_counter()
    rows = task.load_rows(cfg, "train")
    read_s = time.perf_counter() - start
    if mode == "parquet":  # the rows only: the datasets reader against today's CSV reader
        return {"mode": mode, "rows": len(rows), "read_s": read_s,
                "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}
    if mode == "today":
        features = encode_all(task, rows, tokenizer, cfg, source)
    else:
        features = token_cache.encode_cached(task, rows, tokenizer, cfg, source, "train", encode_all)
    total_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    tokens = sum(len(f.input_ids) for f in features)
    small = sum(1 for f in features for seq in (f.input_ids, f.labels) for t in seq if -5 <= t <= 256)
    lists = sum(sys.getsizeof(f.input_ids) + sys.getsizeof(f.labels) for f in features)
    held = lists + 32 * (2 * tokens - small)
    return {"mode": mode, "rows": len(rows), "examples": len(features), "tokens": tokens, "read_s": read_s,
            "to_features_s": total_s, "peak_bytes": peak, "features_bytes": held, "int32_bytes": 8 * tokens}


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
        for mode, source in [("today", csv_path), ("cold", csv_path), ("cached", csv_path), ("parquet", parquet)]:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(source), tok, str(tmp / "cache")],
                                 env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            if mode == "parquet":
                print(f"{mode:<11} rows read through datasets in {r['read_s']:.2f} s, peak {r['peak_bytes'] / 2**20:.0f} MiB")
                continue
            print(f"{mode:<11} {r['to_features_s']:8.2f} s to features (read {r['read_s']:.2f} s)  peak "
                  f"{r['peak_bytes'] / 2**20:7.0f} MiB  = {r['peak_bytes'] / r['features_bytes']:.2f}x features "
                  f"({r['features_bytes'] / 2**20:.0f} MiB; {r['tokens']:,} tokens, {r['int32_bytes'] / 2**20:.0f} MiB "
                  "as int32)", flush=True)
    by = {r["mode"]: r for r in results}
    summary = {"rows": args.rows, "tokenizer": Path(tok).name, "results": results,
               "cold_over_cached": by["cold"]["to_features_s"] / by["cached"]["to_features_s"],
               "today_over_cached": by["today"]["to_features_s"] / by["cached"]["to_features_s"]}
    print(f"cached re-run reaches its first step {summary['cold_over_cached']:.1f}x sooner than the cold run "
          f"({summary['today_over_cached']:.1f}x sooner than today's reader); load {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
