"""Inference throughput: the inference path (length-sorted batches) against one-at-a-time and input-order batches.

    python tests/bench/infer_throughput.py [--checkpoint DIR] [--rows 512] [--batch-size 32] [--max-new-tokens 48]
                                           [--data FILE] [--single-rows N] [--json OUT]

Rows: `--data`, else ../shared/fixtures/nli/dev_sample.csv, else data/sample/test.csv, repeated to `--rows`.
Checkpoint: `--checkpoint`, else the one `python -m app infer` would pick under checkpoints/, else the tiny model
trained for 100 steps into a temporary directory. Every mode uses the same prompts, model and max_new_tokens:

  sorted     `NliCot.predict_batches` as `python -m app infer` runs it: length-sorted batches, stop when the JSON
             object closes, label extraction and the forced-prefix fallback (timed as a whole)
  sorted_gen the same batches, generation only (`generate_batches`)
  input      fixed-size batches in input order, generation only (same stop rule)
  single     one row at a time, generation only (`--single-rows` of them; rows/s is what is compared)
  proposed   `proposed_generate_batches` below: the same sorted batches with a leaner decoding loop (a candidate
             change to app/generate.py; its generations are checked against the sorted path's)

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
    from app.infer import find_checkpoint

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


_CLOSERS: dict[int, set[int]] = {}


def closer_ids(tokenizer) -> set[int]:
    """Token ids whose text holds a `}` (computed once per tokenizer, not once per batch)."""
    key = id(tokenizer)
    if key not in _CLOSERS:
        vocab = tokenizer.get_vocab()
        _CLOSERS[key] = {i for tok, i in vocab.items() if "}" in tokenizer.convert_tokens_to_string([tok])}
    return _CLOSERS[key]


def proposed_generate_batches(model, tokenizer, prompts, batch_size, max_new_tokens, device, skip=None):
    """A candidate for app.generate.generate_batches: same batches, same outputs, less work per step.

    - prompts are tokenized once (the lengths for sorting and the batch inputs come from the same ids);
    - a plain greedy loop over the KV cache (no per-step logits-processor / stopping-criteria machinery);
    - rows that are done (EOS, or their JSON object closed) leave the batch: their cache rows are dropped, so the
      remaining steps run on the rows still generating.
    """
    import torch
    from transformers import DynamicCache

    from app.extract import json_object_closed
    from app.generate import length_sorted_batches

    ids = tokenizer(list(prompts)).input_ids
    closers, eos, pad = closer_ids(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
    for batch in length_sorted_batches([len(x) for x in ids], batch_size):
        if skip is not None and skip(batch):
            continue
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, i in enumerate(batch):
            input_ids[k, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[k, width - len(ids[i]):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        generated: list[list[int]] = [[] for _ in batch]
        alive = list(range(len(batch)))
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            last_pos = position[:, -1]
            for _ in range(max_new_tokens):
                tokens = out.logits[:, -1].argmax(-1)
                keep = []
                for k, (row, t) in enumerate(zip(alive, tokens.tolist())):
                    if t == eos:
                        continue
                    generated[row].append(t)
                    if t in closers and json_object_closed(tokenizer.decode(generated[row], skip_special_tokens=True)):
                        continue
                    if len(generated[row]) < max_new_tokens:
                        keep.append(k)
                if not keep:
                    break
                if len(keep) < len(alive):
                    sel = torch.tensor(keep, device=device)
                    cache.batch_select_indices(sel)
                    mask, tokens, last_pos = mask[sel], tokens[sel], last_pos[sel]
                    alive = [alive[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
                last_pos = last_pos + 1
                out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                            past_key_values=cache, use_cache=True)
        yield batch, [tokenizer.decode(g, skip_special_tokens=True) for g in generated]


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

    from app.extract import extract_label
    from app.generate import _generate_splitting_on_oom, generate_batches
    from app.infer import checkpoint_config, fit_prompts
    from app.modeling import load_for_inference
    from app.tasks.nli_cot import NliCot, build_prompt

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
    lengths = [len(ids) for ids in tok(prompts).input_ids]
    bs, mnt = args.batch_size, args.max_new_tokens
    modes = args.modes.split(",")
    print(f"checkpoint {ckpt}\ndata {data} x{args.rows} rows, batch {bs}, max_new_tokens {mnt}, device {device}, "
          f"torch threads {torch.get_num_threads()}, load average before {os.getloadavg()}\n"
          f"prompt tokens: mean {sum(lengths) / len(lengths):.0f}, min {min(lengths)}, max {max(lengths)}; "
          f"{cut} rows cut to max_seq_length - max_new_tokens", flush=True)

    with torch.no_grad():  # warm-up: the widest batch once
        longest = sorted(prompts, key=len)[-bs:]
        _generate_splitting_on_oom(model, tok, longest, 8, device)

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
        for batch, gens in generate_batches(model, tok, prompts, bs, mnt, device):
            for i, g in zip(batch, gens):
                out[i] = g
        return out

    def run_proposed():
        out = [""] * len(prompts)
        for batch, gens in proposed_generate_batches(model, tok, prompts, bs, mnt, device):
            for i, g in zip(batch, gens):
                out[i] = g
        return out

    def run_input():
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), bs):
                out += _generate_splitting_on_oom(model, tok, prompts[start:start + bs], mnt, device)
        return out

    n_single = args.single_rows or len(prompts)

    def run_single():
        with torch.no_grad():
            return [_generate_splitting_on_oom(model, tok, [q], mnt, device)[0] for q in prompts[:n_single]]

    for name in modes:  # in the order given; a mode given twice is timed twice and the faster run kept
        if name == "sorted":
            preds, sec, cpu = timed(run_sorted)
            gens, fails, n = [pr.generation for pr in preds], sum(not pr.parse_ok for pr in preds), len(prompts)
        elif name in ("sorted_gen", "input", "single", "proposed"):
            gens, sec, cpu = timed({"sorted_gen": run_sorted_gen, "input": run_input, "single": run_single,
                                    "proposed": run_proposed}[name])
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
        for name in ("sorted", "sorted_gen", "proposed"):
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
