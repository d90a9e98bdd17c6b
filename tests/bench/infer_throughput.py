"""Inference throughput: the inference path (length-sorted batches) against one-at-a-time and input-order batches.

    python tests/bench/infer_throughput.py [--checkpoint DIR] [--rows 512] [--batch-size 32] [--max-new-tokens 48]
                                           [--data FILE] [--single-rows N] [--json OUT]

Rows: `--data`, else ../shared/fixtures/nli/dev_sample.csv, else data/sample/test.csv, repeated to `--rows`.
Checkpoint: `--checkpoint`, else the one `python -m app infer` would pick under checkpoints/, else the tiny model
trained for 100 steps into a temporary directory. Every mode uses the same prompts, model and max_new_tokens:

  sorted     `NliCot.predict_batches` as `python -m app infer` runs it: length-sorted batches, the prompt prefix
             common to a batch prefilled once, the rest prefilled in chunks of `prefill_tokens`, one decode
             batch over a preallocated KV cache, stop when the JSON object closes, label extraction and the
             forced-prefix fallback (timed as a whole)
  sorted_gen the same batches, generation only (`generate_batches`)
  input      baseline: transformers' `generate` on fixed-size batches in input order (same stop rule)
  single     baseline: transformers' `generate` one row at a time (`--single-rows` of them; rows/s is compared)

Prints rows/s, the ratios, the parse-failure rate, how often the modes' generations agree, and the load average
(the machine may be shared). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def load_rows(path: Path, n: int) -> list[dict]:
    from app.data import read_rows

    base = [r.values for r in read_rows(path, ("premise", "hypothesis"))]
    return [dict(base[i % len(base)]) for i in range(n)]


def pick_checkpoint(arg: str | None, tmp: Path) -> Path:
    from app.errors import UserError
    from app.runs import find_checkpoint

    if arg:
        return Path(arg)
    try:
        return find_checkpoint(ROOT / "checkpoints")
    except UserError:
        pass
    from app.config import load_config
    from app.train import train

    out = tmp / "run"
    cfg = load_config(ROOT / "configs" / "tiny.py", [
        f"--model_name={tmp / 'model'}", f"--train_file={ROOT / 'data/sample/train.csv'}", "--dev_file=None",
        f"--out_dir={out}", "--max_steps=100", "--save_every=1000", "--tensorboard=False"])
    train(cfg)
    return out / "checkpoints" / "final"


def hf_generate(model, tok, prompts, max_new_tokens, device):
    """Baseline: transformers' `generate` on a batch as given (left padding, greedy), stopping each row when its
    JSON object closes (a StoppingCriteria) or at EOS: what a user would write without this project."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from app.tasks.nli_cot.extract import json_object_closed

    enc = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    width = enc.input_ids.shape[1]

    class JsonClosed(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([json_object_closed(t) for t in texts], device=input_ids.device)

    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, stopping_criteria=StoppingCriteriaList([JsonClosed()]))
    return tok.batch_decode(out[:, width:], skip_special_tokens=True)


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--data")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-seq-length", type=int, default=1024,
                   help="prompt + generation budget (default 1024: no dev row is cut, so prompt lengths vary as in the data)")
    p.add_argument("--single-rows", type=int, default=None, help="rows for the one-at-a-time mode (default: all)")
    p.add_argument("--modes", default="input,sorted_gen,sorted,single,input,sorted_gen",
                   help="comma-separated, run in this order; a repeated mode keeps its faster run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from app.tasks.nli_cot.extract import extract_label
    from app.lm.generate import generate, generate_batches
    from app.runs import checkpoint_config
    from app.tasks.nli_cot.backends import JSON_CLOSED
    from app.tasks.nli_cot.predict import fit_prompts
    from app.lm.modeling import load_for_inference
    from app.tasks.nli_cot.prompts import build_prompt
    from app.tasks.nli_cot.task import NliCot

    shared = ROOT.parent / "shared" / "fixtures" / "nli" / "dev_sample.csv"
    data = Path(args.data) if args.data else (shared if shared.is_file() else ROOT / "data" / "sample" / "test.csv")
    rows = load_rows(data, args.rows)
    tmp = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    ckpt = pick_checkpoint(args.checkpoint, tmp)
    cfg = checkpoint_config(ckpt, [f"--max_new_tokens={args.max_new_tokens}", f"--infer_batch_size={args.batch_size}",
                                   f"--max_seq_length={args.max_seq_length}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_for_inference(ckpt, cfg, device)
    cut = sum(fit_prompts(rows, tok, cfg))
    prompts = [build_prompt(r, cfg) for r in rows]
    from app.lm.forward import shared_prefix_length

    prompt_ids = tok(prompts).input_ids
    lengths = [len(ids) for ids in prompt_ids]
    common = shared_prefix_length(prompt_ids)
    bs, mnt = args.batch_size, args.max_new_tokens
    modes = args.modes.split(",")
    print(f"checkpoint {ckpt}\ndata {data} x{args.rows} rows, batch {bs}, max_new_tokens {mnt}, device {device}, "
          f"torch threads {torch.get_num_threads()}, load average before {os.getloadavg()}\n"
          f"prompt tokens: mean {sum(lengths) / len(lengths):.0f}, min {min(lengths)}, max {max(lengths)}; "
          f"{cut} rows cut to max_seq_length - max_new_tokens; {common} leading tokens common to every prompt "
          f"(prefilled once per batch); prefill_tokens {cfg.prefill_tokens}", flush=True)

    with torch.no_grad():  # warm-up: the widest batch once
        longest = sorted(prompts, key=len)[-bs:]
        generate(model, tok, longest, bs, 8, device, rule=JSON_CLOSED)

    results: dict[str, dict] = {}
    texts: dict[str, list[str]] = {}

    def report(name: str, n: int, seconds: float, cpu: float, gens: list[str], failures: int | None = None):
        if failures is None:
            failures = sum(not extract_label(g).ok for g in gens)
        results[name] = {"rows": n, "seconds": round(seconds, 2), "rows_per_s": round(n / seconds, 2),
                         "cpu_seconds": round(cpu, 2), "rows_per_cpu_s": round(n / cpu, 2),
                         "parse_failure_rate": round(failures / n, 4)}
        print(f"{name:<11} {n:>5} rows {seconds:8.2f} s {n / seconds:9.2f} rows/s  cpu {cpu:8.2f} s "
              f"{n / cpu:9.2f} rows/cpu-s  parse failures {results[name]['parse_failure_rate']}", flush=True)

    def run_sorted():
        preds = [None] * len(prompts)
        for batch, out in NliCot().predict_batches(model, tok, cfg, rows, device, bs):
            for i, pr in zip(batch, out):
                preds[i] = pr
        return preds

    def run_sorted_gen():
        out = [""] * len(prompts)
        for batch, gens in generate_batches(model, tok, prompts, bs, mnt, device, rule=JSON_CLOSED):
            for i, g in zip(batch, gens):
                out[i] = g
        return out

    def run_input():
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), bs):
                out += hf_generate(model, tok, prompts[start:start + bs], mnt, device)
        return out

    n_single = args.single_rows or len(prompts)

    def run_single():
        with torch.no_grad():
            return [hf_generate(model, tok, [q], mnt, device)[0] for q in prompts[:n_single]]

    for name in modes:  # in the order given; a mode given twice is timed twice and the faster run kept
        if name == "sorted":
            preds, sec, cpu = timed(run_sorted)
            gens, fails, n = [pr.generation for pr in preds], sum(not pr.parse_ok for pr in preds), len(prompts)
        elif name in ("sorted_gen", "input", "single"):
            gens, sec, cpu = timed({"sorted_gen": run_sorted_gen, "input": run_input, "single": run_single}[name])
            fails, n = None, len(gens)
        else:
            raise SystemExit(f"unknown mode {name!r}")
        if name in results and results[name]["seconds"] <= sec:
            print(f"{name:<11} {n:>5} rows {sec:8.2f} s  cpu {cpu:8.2f} s (repeat; slower, not kept)", flush=True)
            continue
        texts[name] = gens
        report(name, n, sec, cpu, gens, fails)

    ratios = {}
    for base in ("single", "input"):
        for name in ("sorted", "sorted_gen"):
            if base in results and name in results:
                ratios[f"{name}/{base}"] = round(results[name]["rows_per_s"] / results[base]["rows_per_s"], 2)
                ratios[f"{name}/{base} (cpu)"] = round(
                    results[name]["rows_per_cpu_s"] / results[base]["rows_per_cpu_s"], 2)
    agree = {}
    ref = texts.get("sorted_gen") or texts.get("sorted")
    for name, gens in texts.items():
        if ref is not None and gens is not ref:
            agree[name] = round(sum(a == b for a, b in zip(ref, gens)) / len(gens), 4)
    summary = {"checkpoint": str(ckpt), "data": str(data), "rows": len(prompts), "batch_size": bs,
               "max_seq_length": args.max_seq_length, "prompt_tokens_mean": sum(lengths) / len(lengths),
               "shared_prefix_tokens": common, "prefill_tokens": cfg.prefill_tokens,
               "max_new_tokens": mnt, "device": str(device), "threads": torch.get_num_threads(),
               "load_average_after": os.getloadavg(), "results": results, "ratios": ratios,
               "generations_equal_to_sorted": agree}
    print("ratios " + "  ".join(f"{k} {v}x" for k, v in ratios.items()))
    print(f"generations equal to the sorted path's: {agree}; load average after {os.getloadavg()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
