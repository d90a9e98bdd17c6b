"""Throughput of `cot generate` against the scripted OpenAI-compatible server (tests/cot_server.py) on 127.0.0.1.

The server runs in its own process (as a remote server would: its work does not share the client's interpreter).

1. Live requests: the server answers every request after a fixed latency (default 200 ms); `generate` runs at a
   given concurrency (default 32) over enough distinct rows for several rounds. Throughput (`requests_per_s`,
   also in every run's summary) = replies stored / time from the first request sent to the last reply stored; the
   ideal is concurrency / latency (160 requests/s). Passes at >= 0.9 x the ideal. `whole_run_per_s` divides by the
   whole run instead (input read to output written and fsynced, the openai package imported before, as it is once
   per process): it adds the fixed costs of one run.
   Passes at >= 0.9 x the ideal.
2. Full-cache re-run: a cache holding the answers of N rows (default 20,000; written directly, as a finished run
   leaves it), then `generate` over those rows: it must send 0 requests and finish in under 5 s (cache load, prompt
   building and hashing, parsing, the output written).

    python tests/bench/datagen_throughput.py [--latency 0.2] [--concurrency 32] [--rows 960] [--cached 20000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import openai  # noqa: E402,F401 - imported once per process; not part of a run's throughput
from cot_server import stats  # noqa: E402

from app.tasks.nli_cot.datagen import pipeline  # noqa: E402
from app.tasks.nli_cot.datagen import prompts as P  # noqa: E402
from app.tasks.nli_cot.datagen.cache import ResponseCache  # noqa: E402
from app.tasks.nli_cot.datagen.client import ChatClient  # noqa: E402
from app.tasks.nli_cot.datagen.config import load_datagen_config  # noqa: E402


def write_rows(path: Path, n: int) -> list[dict]:
    rows = [{"premise": f"In the museum, person {i} is reading a book about topic {i % 97}.",
             "hypothesis": f"Person {i} is reading indoors.", "label": 1} for i in range(n)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["premise", "hypothesis", "label"])
        w.writeheader()
        w.writerows(rows)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rows", type=int, default=960, help="rows of the live run (30 rounds at 32)")
    ap.add_argument("--cached", type=int, default=20000, help="rows of the full-cache re-run")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    os.environ["BENCH_KEY"] = "bench"
    results = {}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cot_server.py"), "--latency", str(args.latency)],
                            stdout=subprocess.PIPE, text=True)
    base_url = proc.stdout.readline().strip()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(Path(tmp), base_url, args)
    finally:
        proc.kill()
        proc.wait()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r["pass"] for r in results.values()) else 1


def run(tmp: Path, base_url: str, args) -> dict:
    results = {}
    if True:
        cfg = load_datagen_config(None, [f"--base_url={base_url}", "--api_key_env=BENCH_KEY",
                                         f"--concurrency={args.concurrency}", "--progress=False"])
        src = tmp / "live.csv"
        write_rows(src, args.rows)
        load = os.getloadavg()[0]
        t0, cpu0 = time.perf_counter(), time.process_time()
        s = pipeline.generate(src, tmp / "live_out.csv", cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        ideal = args.concurrency / args.latency
        rps = s["requests_per_s"]
        results["live"] = {"rows": args.rows, "requests": s["requests"], "answered": s["answered"],
                           "requests_per_s": rps, "ideal_per_s": ideal, "ratio": round(rps / ideal, 3),
                           "wall_s": round(wall, 3), "whole_run_per_s": round(s["answered"] / wall, 1),
                           "client_cpu_ms_per_request": round(1000 * cpu / max(s["requests"], 1), 2),
                           "load_average_before": round(load, 2), "cpu_cores": os.cpu_count(),
                           "pass": rps >= 0.9 * ideal and s["failed"] == 0}

        src = tmp / "cached.csv"
        rows = write_rows(src, args.cached)
        out = tmp / "cached_out.csv"
        cache = ResponseCache(pipeline.cache_path(cfg, out))
        client = ChatClient(cfg, cache, "bench")
        prompts = P.prompt_set(cfg)
        for r in rows:  # the cache a finished run leaves (structured-output key, as auto mode asks first)
            key = client.key(cfg.model, P.generate_messages(prompts, r["premise"], r["hypothesis"]),
                             P.THOUGHT_SCHEMA)
            content = json.dumps({"thought_process": "Step 1: a museum. Step 2: indoors. Step 3: it follows.",
                                  "predicted_label": 1})
            cache.put(key, cfg.model, {"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": content}}], "usage": {"prompt_tokens": 250, "completion_tokens": 30}})
        cache.close()
        before = stats(base_url)["requests"]
        t0 = time.perf_counter()
        s = pipeline.generate(src, out, cfg)
        wall = time.perf_counter() - t0
        sent = stats(base_url)["requests"] - before
        results["full_cache"] = {"rows": args.cached, "requests_sent": sent, "cache_hits": s["cache_hits"],
                                 "wall_s": round(wall, 3), "pass": sent == 0 and wall < 5.0 and s["failed"] == 0}
    return results


if __name__ == "__main__":
    raise SystemExit(main())
