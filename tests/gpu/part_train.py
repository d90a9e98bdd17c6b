"""Part 2, training: the NLI recipe's training step on a Mistral-7B-architecture model (random weights).

Every setup trains the same model directory, on the same tokens (the real NLI rows with a three-step thought, encoded
by the NLI task as the engine encodes them), with the recipe's settings (configs/default.py: LoRA r=16, alpha 32,
dropout 0.05 on q,k,v,o; max_seq_length 512; micro batch 4 x 4 accumulation = 16 examples per optimizer step;
AdamW; bf16 weights and autocast on CUDA):

  engine_lora_ckpt / _nockpt     `app.train.train` (what `python -m app train` runs), bf16 base,
                                 activation checkpointing on / off
  engine_qlora_ckpt / _nockpt    the same over a 4-bit nf4 base (bitsandbytes; skipped without it)
  trl_lora_ckpt / _nockpt        TRL's SFTTrainer on the very same token ids (completion-only loss, packing off,
                                 group_by_length; skipped without trl)

Timing: an optimizer-step post hook synchronises the device and stamps the time at the end of every optimizer step
(registered from outside; nothing in app/ or TRL changes). tokens/s = non-pad tokens of steps skip+1..N / their wall
time (`tests/bench/train_throughput.rate`); step time = the median step. Peak GPU memory =
torch.cuda.max_memory_allocated over the timed steps (reset after the warm-up steps), and over loading + warm-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from kit import Context, UnitError, check, ensure_model, importable, peak_gib, allocated_gib, reset_peak, use_repo_imports

SETUPS = (  # name, runner, quantization, activation checkpointing; in order of importance (the budget may cut)
    ("engine_lora_ckpt", "engine", None, True),
    ("engine_lora_nockpt", "engine", None, False),
    ("trl_lora_ckpt", "trl", None, True),
    ("trl_lora_nockpt", "trl", None, False),
    ("engine_qlora_ckpt", "engine", "4bit", True),
    ("engine_qlora_nockpt", "engine", "4bit", False),
)


def run(ctx: Context) -> dict:
    figures, checks, notes, skipped = {}, [], [], {}
    model_dir = ensure_model(ctx, "train")
    for name, runner, quant, ckpt in SETUPS:
        need = "trl" if runner == "trl" else ("bitsandbytes" if quant else None)
        if need and not importable(need):
            skipped[name] = f"{need} not importable"
            continue
        if ctx.over_budget(runner):
            skipped[name] = "time budget"
            continue
        try:
            res = ctx.unit(f"part_train:{runner}_setup", model_dir=model_dir, quantization=quant, ckpt=ckpt)
        except UnitError as err:
            checks.append(check(f"{name} trains", False, str(err)))
            continue
        figures[name] = res
        finite = all(math.isfinite(x) for x in res["losses"])
        checks.append(check(f"{name} trains", finite and res["steps"] > 0,
                            f"{len(res['losses'])} losses, first {res['losses'][0]:.4f}, last {res['losses'][-1]:.4f}"))
    figures["ratios"] = ratios(figures)
    checks += same_first_loss(ctx, figures)
    for name, why in skipped.items():
        notes.append(f"{name} skipped: {why}")
    return {"figures": figures, "checks": checks, "notes": notes, "skipped": skipped}


def same_first_loss(ctx: Context, figures: dict) -> list[dict]:
    """Activation checkpointing must not change what is computed: the first step (LoRA B is still zero, so dropout
    does not matter yet; the same batches) gives the same loss with it on and off. With it off the engine also
    shares the prompt prefix, so this compares that path with the plain one too."""
    tol = 1e-2 if ctx.profile.cuda else 1e-5
    out = []
    for prefix in ("engine_lora", "engine_qlora"):
        on, off = figures.get(f"{prefix}_ckpt"), figures.get(f"{prefix}_nockpt")
        if on and off:
            a, b = on["losses"][0], off["losses"][0]
            rel = abs(a - b) / max(abs(b), 1e-12)
            out.append(check(f"{prefix}: same first loss with checkpointing on and off", rel <= tol,
                             f"{a:.5f} vs {b:.5f}, relative {rel:.1e} (limit {tol:g})"))
    return out


def ratios(figures: dict) -> dict:
    """engine / TRL tokens per second, and what activation checkpointing costs and saves."""
    tps = {k: v["tokens_per_s"] for k, v in figures.items() if isinstance(v, dict) and "tokens_per_s" in v}
    out = {}
    for ck in ("ckpt", "nockpt"):
        if f"engine_lora_{ck}" in tps and f"trl_lora_{ck}" in tps:
            out[f"engine_vs_trl_{ck}"] = round(tps[f"engine_lora_{ck}"] / tps[f"trl_lora_{ck}"], 3)
    for prefix in ("engine_lora", "engine_qlora", "trl_lora"):
        on, off = figures.get(f"{prefix}_ckpt"), figures.get(f"{prefix}_nockpt")
        if on and off:
            out[f"{prefix}_ckpt_speed"] = round(on["tokens_per_s"] / off["tokens_per_s"], 3)
            if on.get("peak_steps_gib") and off.get("peak_steps_gib"):
                out[f"{prefix}_ckpt_memory"] = round(on["peak_steps_gib"] / off["peak_steps_gib"], 3)
    return out


# --- timing ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def step_window(device: str, skip: int):
    """Stamps at the end of every optimizer step (device synchronised first); after step `skip`, the peak memory of
    loading + warm-up is recorded and the peak counter reset, so the final peak covers the timed steps only."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from train_throughput import step_clock

    memory: dict = {}

    def before_stamp(opt, args, kwargs):
        if device == "cuda":
            torch.cuda.synchronize()
        memory["steps"] = memory.get("steps", 0) + 1
        if memory["steps"] == skip:
            memory["peak_load_warmup_gib"] = peak_gib(device)
            memory["allocated_after_warmup_gib"] = allocated_gib(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

    # global optimizer hooks run in the order registered: the synchronisation comes before step_clock's stamp
    handle = register_optimizer_step_post_hook(before_stamp)
    try:
        with step_clock() as stamps:
            yield stamps, memory
        memory["peak_steps_gib"] = peak_gib(device)
    finally:
        handle.remove()


def summarise(stamps, tokens, padded, skip: int, memory: dict, total_s: float) -> dict:
    from train_throughput import rate

    res = rate(stamps, tokens, padded, skip)
    steps = [b[0] - a[0] for a, b in zip(stamps[skip - 1:], stamps[skip:])]
    res.update(step_s=statistics.median(steps), tokens_per_step=sum(tokens[skip:]) / len(steps),
               call_seconds=round(total_s, 2), **memory)
    for key in ("seconds", "tokens_per_s", "cpu_seconds", "tokens_per_cpu_s", "step_s"):
        res[key] = round(res[key], 4)
    return res


def setup_config(ctx: Context, model_dir: str, name: str, quantization, ckpt: bool):
    from kit import recipe_config

    out = ctx.work_path / "train" / name
    shutil.rmtree(out, ignore_errors=True)  # a kept --work folder: an earlier run's final checkpoint would end it
    # one token cache for every setup: the same rows, tokenizer and encoding settings, tokenized once
    return recipe_config(ctx, model_dir, str(out), quantization=quantization, gradient_checkpointing=ckpt,
                         max_steps=ctx.profile.train_steps, token_cache_dir=str(ctx.work_path / "token_cache"),
                         **ctx.profile.train_batch)


def data_figures(features) -> dict:
    lengths = [len(f.input_ids) for f in features]
    return {"examples": len(features), "tokens_min": min(lengths), "tokens_mean": round(statistics.mean(lengths), 1),
            "tokens_max": max(lengths)}


# --- units ----------------------------------------------------------------------------------------------------
def engine_setup(ctx: Context, model_dir: str, quantization, ckpt: bool) -> dict:
    """One engine run of `train_steps` optimizer steps, timed from outside."""
    use_repo_imports()
    import app.train as engine
    from app.lm.modeling import resolve_attn_implementation
    from train_throughput import encode_features, fresh_accelerate_state

    name = f"engine_{'qlora' if quantization else 'lora'}_{'ckpt' if ckpt else 'nockpt'}"
    cfg = setup_config(ctx, model_dir, name, quantization, ckpt)
    _, features = encode_features(cfg)
    fresh_accelerate_state()
    reset_peak(ctx.device)
    skip = ctx.profile.train_skip
    with step_window(ctx.device, skip) as (stamps, memory):
        t0 = time.perf_counter()
        rc = engine.train(cfg)
        total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"engine exited {rc}")
    from train_throughput import plan_tokens

    tokens, padded = plan_tokens(cfg, features, cfg.max_steps)
    res = summarise(stamps, tokens, padded, skip, memory, total)
    metrics = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    import torch

    res.update(losses=[m["loss"] for m in metrics if "loss" in m], data=data_figures(features),
               attention=resolve_attn_implementation(cfg, torch.device(ctx.device)), quantization=quantization,
               activation_checkpointing=ckpt, micro_batch=cfg.micro_batch_size, batch=cfg.batch_size,
               max_seq_length=cfg.max_seq_length)
    return res


def trl_setup(ctx: Context, model_dir: str, quantization, ckpt: bool) -> dict:
    """The same step through TRL's SFTTrainer: the engine's token ids, micro batch, accumulation, LoRA and
    optimizer settings, bf16 on CUDA."""
    use_repo_imports()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from app.lm.modeling import resolve_attn_implementation
    from train_throughput import check_same_tokens, encode_features, fresh_accelerate_state, lora_config, trl_dataset

    name = f"trl_lora_{'ckpt' if ckpt else 'nockpt'}"
    cfg = setup_config(ctx, model_dir, name, None, ckpt)
    tok, features = encode_features(cfg)
    accumulation = cfg.batch_size // cfg.micro_batch_size
    counts: list[tuple[int, int]] = []

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int((ids != tok.pad_token_id).sum())
            counts.append((real, ids.numel()))
            return super().training_step(model, inputs, *a, **k)

    cuda = ctx.profile.cuda
    args = SFTConfig(
        output_dir=str(ctx.work_path / "train" / name), max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps or 0,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        optim="adamw_torch_fused" if cuda else "adamw_torch", use_cpu=not cuda, bf16=cuda, fp16=False,
        gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=cfg.max_seq_length, packing=False, completion_only_loss=True,
        train_sampling_strategy="group_by_length", dataloader_num_workers=0, dataloader_pin_memory=cuda,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
    )
    attn = resolve_attn_implementation(cfg, torch.device(ctx.device))
    fresh_accelerate_state()
    reset_peak(ctx.device)
    skip = ctx.profile.train_skip
    with step_window(ctx.device, skip) as (stamps, memory):
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                     attn_implementation=attn)
        torch.manual_seed(cfg.seed)
        trainer = CountingSFTTrainer(model=model, args=args, train_dataset=trl_dataset(features),
                                     processing_class=tok, peft_config=lora_config(cfg))
        check_same_tokens(trainer.train_dataset, features, packing=False)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        total = time.perf_counter() - t0
    if len(counts) != accumulation * len(stamps):
        raise RuntimeError(f"{len(counts)} micro batches for {len(stamps)} optimizer steps x {accumulation}")
    tokens = [sum(c[0] for c in counts[i:i + accumulation]) for i in range(0, len(counts), accumulation)]
    padded = [sum(c[1] for c in counts[i:i + accumulation]) for i in range(0, len(counts), accumulation)]
    res = summarise(stamps, tokens, padded, skip, memory, total)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res.update(losses=losses, data=data_figures(features), attention=attn, quantization=None,
               activation_checkpointing=ckpt, micro_batch=cfg.micro_batch_size, batch=cfg.batch_size,
               max_seq_length=cfg.max_seq_length)
    return res
