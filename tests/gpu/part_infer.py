"""Part 3, inference: the project's generation path against transformers' `generate`, on the training part's model.

Rows: the real NLI rows (dev_sample) repeated to `infer_rows` (512 on CUDA), prompts cut to fit as `infer` cuts them
(`fit_prompts`, max_seq_length 1024 so no row is cut), greedy, `max_new_tokens` 48, the JSON stop rule on every side.

  path     `NliCot.predict_batches`, as `python -m app infer` runs it: length-sorted batches, the shared prompt
           prefix prefilled once, chunked prefill, one decode batch over a preallocated KV cache, label extraction
           and the forced-label fallback
  gen      the same batches, generation only (`app.lm.generate.generate_batches`)
  hf       transformers' `generate` on batches in input order (`tests/bench/infer_throughput.hf_generate`)

rows/s = rows / wall time (device synchronised). Correctness, on the first `eq_rows` rows:
  - next-token logits of the project's prefill (`next_token_logits`: shared prefix, chunks) against a plain
    left-padded forward, in fp32 (relative max error <= 1e-3) and, as a figure, in bf16
  - generations of the project's path equal transformers' in fp32 (TF32 off, SDPA); at least 95% of rows must be
    equal: a random-weight model has near-tied logits, and a one-ulp difference between two correct kernels can
    flip an argmax (a real bug, such as a wrong position or mask, changes nearly every row). In bf16 the agreement
    is a figure only: there such flips are common.
"""

from __future__ import annotations

from pathlib import Path

from kit import Context, UnitError, check, ensure_model, peak_gib, reset_peak, timed, use_repo_imports

LOGITS_TOL = 1e-3
EQUAL_MIN = 0.95


def run(ctx: Context) -> dict:
    model_dir = ensure_model(ctx, "train")
    try:
        res = ctx.unit("part_infer:infer_unit", model_dir=model_dir)
    except UnitError as err:
        return {"figures": {}, "checks": [check("inference runs", False, str(err))], "notes": []}
    fp32 = res["fp32"]
    checks = [
        check("prefill logits equal (fp32)", fp32["logits_rel_error"] <= LOGITS_TOL,
              f"relative max error {fp32['logits_rel_error']:.2e} (limit {LOGITS_TOL:g}) over {fp32['rows']} rows"),
        check("generations equal (fp32)", fp32["equal_fraction"] >= EQUAL_MIN,
              f"{fp32['equal_rows']}/{fp32['rows']} rows identical to transformers' generate (at least "
              f"{EQUAL_MIN:.0%})"),
    ]
    run = res["run_dtype"]
    notes = [f"{run['dtype']}: {run['equal_fraction']:.1%} of rows identical to transformers' generate (a figure: "
             "near-tied logits of a random model flip under bf16 rounding)"] if run["dtype"] != "float32" else []
    return {"figures": res, "checks": checks, "notes": notes}


def hf_last_logits(model, tok, prompts: list[str], device, batch: int):
    """Next-token logits of a plain left-padded forward, positions counted from each row's first real token (as
    `generate` does)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            enc = tok(prompts[start:start + batch], return_tensors="pt", padding=True, padding_side="left").to(device)
            pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
            out.append(model(**enc, position_ids=pos, logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)


def logits_error(model, tok, prompts, device, cfg, batch: int) -> float:
    from app.lm.generate import next_token_logits

    ids = tok(prompts).input_ids
    ours = next_token_logits(model, ids, tok.pad_token_id, device, cfg.prefill_tokens).float()
    ref = hf_last_logits(model, tok, prompts, device, batch)
    return float((ours - ref).abs().max() / ref.abs().max())


def input_order(model, tok, prompts, batch: int, max_new_tokens: int, device) -> list[str]:
    import torch

    from infer_throughput import hf_generate

    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            out += hf_generate(model, tok, prompts[start:start + batch], max_new_tokens, device)
    return out


def infer_unit(ctx: Context, model_dir: str) -> dict:
    use_repo_imports()
    import torch

    from app.lm.generate import generate, generate_batches
    from app.lm.modeling import load_base_model, load_tokenizer, resolve_attn_implementation
    from app.tasks.nli_cot.backends import JSON_CLOSED
    from app.tasks.nli_cot.predict import fit_prompts
    from app.tasks.nli_cot.prompts import build_prompt
    from app.tasks.nli_cot.task import NliCot
    from infer_throughput import load_rows
    from kit import recipe_config

    p = ctx.profile
    bs, mnt = p.infer_batch, p.max_new_tokens
    cfg = recipe_config(ctx, model_dir, str(ctx.work_path / "infer"), quantization=None, max_new_tokens=mnt,
                        infer_batch_size=bs, max_seq_length=1024)
    device = torch.device(ctx.device)
    reset_peak(ctx.device)
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg, device).to(device).eval()
    attn = resolve_attn_implementation(cfg, device)
    rows = load_rows(Path(ctx.fixtures.nli[0]), p.infer_rows)
    cut = sum(fit_prompts(rows, tok, cfg))
    prompts = [build_prompt(r, cfg) for r in rows]
    lengths = [len(x) for x in tok(prompts).input_ids]

    with torch.no_grad():  # warm-up: kernels chosen, caches allocated, on the widest batch
        generate(model, tok, sorted(prompts, key=len)[-bs:], bs, 4, device, rule=JSON_CLOSED)
        input_order(model, tok, prompts[:bs], bs, 4, device)

    def run_path():
        preds = [None] * len(rows)
        for batch, out in NliCot().predict_batches(model, tok, cfg, rows, device, bs):
            for i, pr in zip(batch, out):
                preds[i] = pr
        return preds

    def run_gen():
        out = [""] * len(prompts)
        for batch, gens in generate_batches(model, tok, prompts, bs, mnt, device, rule=JSON_CLOSED,
                                            prefill_tokens=cfg.prefill_tokens):
            for i, g in zip(batch, gens):
                out[i] = g
        return out

    hf, hf_s = timed(ctx.device, lambda: input_order(model, tok, prompts, bs, mnt, device))
    gen, gen_s = timed(ctx.device, run_gen)
    preds, path_s = timed(ctx.device, run_path)
    n = len(prompts)
    eq = prompts[: p.eq_rows]
    run_logits = logits_error(model, tok, eq, device, cfg, bs)
    res = {
        "rows": n, "batch": bs, "max_new_tokens": mnt, "attention": attn,
        "prompt_tokens_mean": round(sum(lengths) / n, 1), "prompt_tokens_max": max(lengths), "rows_cut": cut,
        "rows_per_s": {"path": round(n / path_s, 2), "gen": round(n / gen_s, 2), "hf": round(n / hf_s, 2)},
        "seconds": {"path": round(path_s, 2), "gen": round(gen_s, 2), "hf": round(hf_s, 2)},
        "peak_gib": peak_gib(ctx.device),
        "run_dtype": {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                      "equal_fraction": sum(a == b for a, b in zip(gen, hf)) / n, "logits_rel_error": run_logits},
        "path_equals_gen": sum(pr.generation == g for pr, g in zip(preds, gen)) / n,
        "forced_label_rows": sum(not pr.parse_ok for pr in preds),
    }
    res["ratios"] = {"path_vs_hf": round(hf_s / path_s, 3), "gen_vs_hf": round(hf_s / gen_s, 3)}
    res["fp32"] = fp32_equality(model, tok, eq, device, cfg, bs, mnt, attn)
    return res


def fp32_equality(model, tok, prompts, device, cfg, bs: int, mnt: int, attn: str) -> dict:
    """The same model in true fp32 (TF32 off, SDPA: flash attention has no fp32): prefill logits and generations of
    the project's path against transformers'."""
    import torch

    from app.lm.generate import generate
    from app.tasks.nli_cot.backends import JSON_CLOSED

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model.float()
    if attn != "sdpa":
        model.set_attn_implementation("sdpa")
    err = logits_error(model, tok, prompts, device, cfg, bs)
    with torch.no_grad():
        ours = generate(model, tok, prompts, bs, mnt, device, rule=JSON_CLOSED, prefill_tokens=cfg.prefill_tokens)
    theirs = input_order(model, tok, prompts, bs, mnt, device)
    equal = sum(a == b for a, b in zip(ours, theirs))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return {"rows": len(prompts), "logits_rel_error": err, "equal_rows": equal, "equal_fraction": equal / len(prompts),
            "first_difference": None if first is None else {"row": first, "ours": ours[first], "hf": theirs[first]}}
