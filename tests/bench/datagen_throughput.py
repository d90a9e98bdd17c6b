"""Throughput of `cot generate` against the scripted OpenAI-compatible server (tests/cot_server.py) on 127.0.0.1.

The server runs in its own process (as a remote server would: its work does not share the client's interpreter).

1. Live requests: the server answers every request after a fixed latency (default 200 ms); `generate` runs at a
   given concurrency (default 32) over enough distinct rows for several rounds. Throughput (`requests_per_s`,
   also in every run's summary) = replies stored / time from the first request sent to the last reply stored; the
   ideal is concurrency / latency (160 requests/s). `whole_run_per_s` divides by the whole run instead (input read
   to output written and fsynced, the openai package imported before, as it is once per process): it adds the
   fixed costs of one run. The live run is repeated (`--repeat`, new rows each time) and the median counts: on a
   shared machine one run can lose the CPU to others for a while; every run's ratio is in the figures, with the
   load average before and after. Passes at a median >= 0.9 x the ideal. For reference the same rows also go
   through a bare asyncio HTTP client (`floor`): the server's own ceiling on this machine, now.
2. Full-cache re-run: a cache holding the answers of N rows (default 20,000; written directly, as a finished run
   leaves it), then `generate` over those rows: it must send 0 requests and finish in under 5 s (cache load, prompt
   building and hashing, parsing, the output written).

    python tests/bench/datagen_throughput.py [--latency 0.2] [--concurrency 32] [--rows 960] [--repeat 3]
                                             [--cached 20000] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cot_server import stats  # noqa: E402

from app.errors import UserError  # noqa: E402
from app.tasks.nli_cot.datagen import pipeline  # noqa: E402
from app.tasks.nli_cot.datagen import prompts as P  # noqa: E402
from app.tasks.nli_cot.datagen.cache import ResponseCache  # noqa: E402
from app.tasks.nli_cot.datagen.client import ChatClient, import_openai  # noqa: E402
from app.tasks.nli_cot.datagen.config import load_datagen_config  # noqa: E402


def write_rows(path: Path, n: int, tag: str = "") -> list[dict]:
    rows = [{"premise": f"{tag}In the museum, person {i} is reading a book about topic {i % 97}.",
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
    ap.add_argument("--repeat", type=int, default=3, help="live runs (the median counts)")
    ap.add_argument("--cached", type=int, default=20000, help="rows of the full-cache re-run")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    try:
        import_openai()  # imported once per process, before any run: not part of a run's throughput
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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


def live_once(tmp: Path, cfg, args, n: int) -> dict:
    src = tmp / f"live{n}.csv"
    write_rows(src, args.rows, tag=f"[run {n}] ")  # rows no earlier run asked
    load = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    s = pipeline.generate(src, tmp / f"live{n}_out.csv", cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rps = s["requests_per_s"]
    return {"requests": s["requests"], "answered": s["answered"], "failed": s["failed"], "requests_per_s": rps,
            "ratio": round(rps / (args.concurrency / args.latency), 3), "wall_s": round(wall, 3),
            "whole_run_per_s": round(s["answered"] / wall, 1),
            "client_cpu_ms_per_request": round(1000 * cpu / max(s["requests"], 1), 2),
            "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}


def floor(base_url: str, args) -> float:
    """Requests/s of a bare asyncio client (one connection per slot, one write per request, nothing else) against
    the same server: what the server and this machine allow right now."""
    host, port = base_url.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "<premise>a</premise>"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    rounds = max(args.rows // args.concurrency, 1)

    async def slot():
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in range(rounds):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
            await reader.readexactly(length)
        writer.close()

    async def all_slots():
        t0 = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(args.concurrency)))
        return time.perf_counter() - t0

    return round(rounds * args.concurrency / asyncio.run(all_slots()), 2)


def run(tmp: Path, base_url: str, args) -> dict:
    results = {}
    cfg = load_datagen_config(None, [f"--base_url={base_url}", "--api_key_env=BENCH_KEY",
                                     f"--concurrency={args.concurrency}", "--progress=False"])
    ideal = args.concurrency / args.latency
    runs = [live_once(tmp, cfg, args, n) for n in range(args.repeat)]
    median = statistics.median(r["requests_per_s"] for r in runs)
    floor_rps = floor(base_url, args)
    results["live"] = {"rows": args.rows, "repeat": args.repeat, "ideal_per_s": ideal,
                       "requests_per_s": median, "ratio": round(median / ideal, 3),
                       "ratios": [r["ratio"] for r in runs], "floor_per_s": floor_rps,
                       "floor_ratio": round(floor_rps / ideal, 3), "cpu_cores": os.cpu_count(), "runs": runs,
                       "pass": median >= 0.9 * ideal and all(r["failed"] == 0 for r in runs)}

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
