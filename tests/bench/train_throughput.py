"""Training throughput: this engine against TRL's SFTTrainer (packing off and on) and a bare loop, on CPU.

    python tests/bench/train_throughput.py [--steps 60] [--repeats 3] [--skip 3]
                                           [--setups engine,engine_noshare,trl,trl_packed,bare]
                                           [--hidden 96] [--layers 2] [--vocab N] [--threads N] [--pack-batch N]
                                           [--trl-workers N] [--omp-passive] [--max-minutes 9] [--json OUT]

Every setup trains the same model: the embedded tiny Mistral-architecture model (`app.lm.tiny`; `--hidden`,
`--layers` and `--vocab` make a larger variant through `app.lm.tiny.build_model`, still one model for every setup),
fp32, SDPA attention, no gradient checkpointing, LoRA with the settings of `app.config.Config` (r, alpha, dropout,
target modules), AdamW, cosine schedule with the warmup and learning rate of configs/tiny.py, grad-norm clip, the
same number of optimizer steps and the same micro batch (16 examples, no accumulation) and max sequence length
(256) as configs/tiny.py.

Data: data/sample/train.csv encoded once by `NliCot().encode` (the default prompt template, the JSON target, EOS).
The engine encodes it itself; TRL gets the very same token ids, pre-tokenized (`input_ids` + `completion_mask`,
`completion_only_loss=True`), so both sides train on identical tokens with loss on the completion only (checked on
TRL's prepared dataset before every TRL run).

  engine      `app.train.train(cfg)` with configs/tiny.py and --finetuning=lora --dev_file=None (length-grouped
              batches from app.engine.batching.BatchPlan; the prompt prefix common to a micro batch, the template's
              instruction, computed once per micro batch: share_prompt_prefix)
  engine_noshare  the same with --share_prompt_prefix=False: every row computes its whole prompt
  trl         SFTTrainer, packing off, train_sampling_strategy='group_by_length' (its least-padding sampler),
              dataloader_num_workers=0 (2 cores: workers would only compete with the compute threads)
  trl_packed  SFTTrainer, packing on (packing_strategy='bfd', which turns padding_free on: each batch is flattened
              into one row with position_ids restarting per example and no attention_mask; on SDPA transformers
              turns those position_ids into a block-diagonal causal mask, checked below). Packs hold ~2 examples at
              max_length=256, so the per-device batch is set to the number of packs that holds the same ~16 examples
              per step (`--pack-batch` overrides it)
  trl_defaults (not in the default list) SFTTrainer, packing off, with SFTConfig's own defaults for bf16 (True:
              bf16 autocast on CPU), gradient_checkpointing (True) and the sampler (random): for reference only
  bare        a plain loop on random tokens: same LoRA model, shape [micro batch, mean example length], forward with
              full-vocabulary logits + backward + AdamW step; a reference ceiling, not a training run

Timing (the same rule on every side): a timestamp at the end of every optimizer.step() (a torch optimizer step
post-hook, registered from outside for the duration of the run; nothing in app/ or TRL is changed). tokens/s =
non-pad tokens of steps skip+1..N / (t[N] - t[skip]). Model loading, dataset preparation, the first `--skip` steps
(warm-up) and the final checkpoint are outside the window; everything a step does (collation, logging every 10
steps, the loss, backward, clipping, optimizer, scheduler) is inside. Non-pad tokens are counted from the data:
engine from its BatchPlan (as it trains), TRL from the batches it is handed (`training_step`). The padding fraction
is pad tokens / all tokens of the batches in the same window. tok/cpu-s divides the same tokens by the CPU time
of the process (all threads) over the window: on a shared machine it moves much less than wall time, especially
with `--threads 1`. Each setup runs `--repeats` times, interleaved; the table shows the best and the median run.
The load average is printed before every run: the machine may be shared.

Not collected by pytest (tests/bench is excluded in pyproject.toml). Needs the bench extra (trl).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.packages import missing  # noqa: E402

TRAIN_FILE = ROOT / "data" / "sample" / "train.csv"


# --- shared setup -------------------------------------------------------------------------------------------
def write_model(out: Path, hidden: int, layers: int, vocab: int | None = None) -> Path:
    from app.lm.tiny import build_model, build_tokenizer, write_tiny_model

    if (hidden, layers, vocab) == (96, 2, None):
        return write_tiny_model(out)
    tok = build_tokenizer()
    # vocab > the tokenizer's: extra embedding/LM-head rows no token uses (an LM head the size of a real model's)
    model = build_model(vocab_size=max(vocab or 0, len(tok)), hidden_size=hidden, layers=layers)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def engine_config(model_dir: Path, out_dir: Path, steps: int, extra: tuple[str, ...] = ()):
    from app.config import load_config

    return load_config(ROOT / "configs" / "tiny.py", [*extra,
        f"--model_name={model_dir}", f"--train_file={TRAIN_FILE}", "--dev_file=None", f"--out_dir={out_dir}",
        "--finetuning=lora", f"--max_steps={steps}", "--save_every=1000000", "--tensorboard=False",
        "--log_every=10", "--create_tiny_model=False", "--attn_implementation=sdpa"])


def encode_features(cfg):
    """The features exactly as the engine builds them (same tokenizer setup, same encode, same over-length rule)."""
    from app.data import read_rows
    from app.lm.modeling import load_tokenizer
    from app.tasks import get_task
    from app.engine.loop import encode_all

    task = get_task(cfg.task)
    tok = load_tokenizer(cfg)
    rows = task.validate(cfg.train_file, read_rows(cfg.train_file, task.required_columns), cfg)
    return tok, encode_all(task, rows, tok, cfg, cfg.train_file)


@contextlib.contextmanager
def step_clock():
    """Timestamps at the end of every optimizer.step() of any torch optimizer, while the block runs."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[tuple[float, float]] = []  # (wall, CPU time of this process, all threads)
    handle = register_optimizer_step_post_hook(
        lambda opt, a, k: stamps.append((time.perf_counter(), time.process_time())))
    try:
        yield stamps
    finally:
        handle.remove()


def rate(stamps: list[tuple[float, float]], tokens: list[int], padded: list[int], skip: int) -> dict:
    """tokens/s, tokens per CPU-second and padding over steps skip+1..N; stamps[i] is the end of step i+1."""
    if len(stamps) != len(tokens) or len(stamps) <= skip:
        raise RuntimeError(f"{len(stamps)} step times for {len(tokens)} steps (skip {skip})")
    seconds = stamps[-1][0] - stamps[skip - 1][0]
    cpu = stamps[-1][1] - stamps[skip - 1][1]
    n_tok, n_all = sum(tokens[skip:]), sum(padded[skip:])
    return {"tokens": n_tok, "seconds": seconds, "tokens_per_s": n_tok / seconds, "cpu_seconds": cpu,
            "tokens_per_cpu_s": n_tok / cpu, "padding": 1 - n_tok / n_all, "steps": len(stamps) - skip}


# --- this engine --------------------------------------------------------------------------------------------
def plan_tokens(cfg, features, steps: int) -> tuple[list[int], list[int]]:
    """Non-pad and padded tokens of each optimizer step, from the engine's own batch plan (one process)."""
    from app.engine.batching import BatchPlan

    lengths = tuple(len(f.input_ids) for f in features)
    plan = BatchPlan(lengths, cfg.micro_batch_size, 1, cfg.batch_size // cfg.micro_batch_size, cfg.seed,
                     cfg.group_by_length)
    tokens, padded = [], []
    for s in range(steps):
        epoch, k = plan.position(s)
        slots = plan.epoch_order(epoch)[k]
        tokens.append(sum(lengths[i] for mb in slots for i in mb))
        padded.append(sum(len(mb) * max(lengths[i] for i in mb) for mb in slots))
    return tokens, padded


def run_engine(model_dir: Path, tmp: Path, steps: int, skip: int, features, extra: tuple[str, ...] = ()) -> dict:
    import app.train as engine

    out_dir = Path(tempfile.mkdtemp(prefix="engine-", dir=tmp))
    cfg = engine_config(model_dir, out_dir, steps, extra)
    with step_clock() as stamps:
        t0 = time.perf_counter()
        rc = engine.train(cfg)
    total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"engine exited {rc}")

    tokens, padded = plan_tokens(cfg, features, steps)  # the batches it trained, from the same plan it uses
    res = rate(stamps, tokens, padded, skip)
    # the engine's own figure, for comparison: tokens_per_s of every log window after the first
    logged = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r][1:]
    res["engine_logged_tokens_per_s"] = statistics.median(windows) if windows else None
    res["call_seconds"] = total
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


# --- TRL SFTTrainer -----------------------------------------------------------------------------------------
def trl_dataset(features):
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [f.input_ids for f in features],
        "completion_mask": [[int(l != -100) for l in f.labels] for f in features],
    })


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")


def load_hf_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")


def run_trl(model_dir: Path, tmp: Path, steps: int, skip: int, features, tok, cfg, packing: bool,
            pack_batch: int | None, workers: int, defaults: bool = False) -> dict:
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tokens: list[int] = []
    padded: list[int] = []

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:
                real = int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row, padded only by pad_to_multiple_of (None here)
                real = int((ids != tok.pad_token_id).sum())
            tokens.append(real)
            padded.append(ids.numel())
            return super().training_step(model, inputs, *a, **k)

    batch = cfg.micro_batch_size
    if packing:
        batch = pack_batch or pack_batch_for(features, cfg)
    out_dir = Path(tempfile.mkdtemp(prefix="trl-", dir=tmp))
    # best CPU settings; `defaults` keeps SFTConfig's own (bf16=True, gradient_checkpointing=True, random sampler)
    best = {} if defaults else {"bf16": False, "fp16": False, "gradient_checkpointing": False,
                                "train_sampling_strategy": "random" if packing else "group_by_length"}
    args = SFTConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch", seed=cfg.seed,
        use_cpu=True, max_length=cfg.max_seq_length, packing=packing, packing_strategy="bfd", completion_only_loss=True,
        dataloader_num_workers=workers, dataloader_pin_memory=False, dataloader_persistent_workers=workers > 0,
        logging_steps=cfg.log_every, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        **best,
    )
    torch.manual_seed(cfg.seed)
    trainer = CountingSFTTrainer(model=load_hf_model(model_dir), args=args, train_dataset=trl_dataset(features),
                                 processing_class=tok, peft_config=lora_config(cfg))
    check_same_tokens(trainer.train_dataset, features, packing)
    trainer.remove_callback(PrinterCallback)  # the per-log-step dicts (disable_tqdm=True swaps the bar for them)
    with step_clock() as stamps:
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    res = rate(stamps, tokens, padded, skip)
    res["call_seconds"] = total
    res["per_device_train_batch_size"] = batch
    res["padding_free"] = bool(trainer.padding_free)
    res["bf16"], res["gradient_checkpointing"] = bool(args.bf16), bool(args.gradient_checkpointing)
    del trainer
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


def check_same_tokens(prepared, features, packing: bool) -> None:
    """TRL's prepared dataset holds the engine's tokens and loss positions (raises if not)."""
    ids, labels = prepared["input_ids"], prepared["labels"]
    if packing:  # packs: same multiset of tokens, same number of loss positions
        same = (sorted(t for row in ids for t in row) == sorted(t for f in features for t in f.input_ids)
                and sum(l != -100 for row in labels for l in row) == sum(l != -100 for f in features for l in f.labels))
    else:
        same = ids == [f.input_ids for f in features] and labels == [f.labels for f in features]
    if not same:
        raise RuntimeError(f"SFTTrainer's prepared data differs from the engine's features (packing={packing})")


def pack_batch_for(features, cfg) -> int:
    """Packs per batch that hold as many examples as one micro batch (bfd packing, max_length = max_seq_length)."""
    from trl.data_utils import pack_dataset

    packed = pack_dataset(trl_dataset(features).rename_column("completion_mask", "labels"), cfg.max_seq_length, "bfd")
    return max(1, round(cfg.micro_batch_size * len(packed) / len(features)))


def check_packed_attention(model_dir: Path, features, tok, cfg) -> dict:
    """Do TRL's padding-free batches attend across examples on SDPA? Compare packed vs one-by-one hidden states."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = load_hf_model(model_dir).eval()
    sample = [{"input_ids": f.input_ids, "labels": f.input_ids} for f in features[:4]]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(sample)
    with torch.no_grad():
        keys = ("input_ids", "position_ids")  # what reaches the attention mask on SDPA (no attention_mask)
        # use_cache=False as SFTTrainer.compute_loss sets it: with a cache, transformers skips packed-sequence detection
        packed = model.model(**{k: batch[k] for k in keys}, use_cache=False).last_hidden_state[0]
        alone = torch.cat([model.model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).last_hidden_state[0]
                           for s in sample])
        # one plain causal sequence over the same row (positions restarting, no block mask), for contrast
        naive = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).last_hidden_state[0]
    return {"examples": len(sample), "tokens": int(batch["input_ids"].numel()),
            "has_attention_mask": "attention_mask" in batch,
            "max_abs_diff_packed_vs_separate": float((packed - alone).abs().max()),
            "max_abs_diff_plain_causal_vs_separate": float((naive - alone).abs().max())}


# --- bare loop ----------------------------------------------------------------------------------------------
def run_bare(model_dir: Path, steps: int, skip: int, features, cfg) -> dict:
    import torch
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    model = get_peft_model(load_hf_model(model_dir), lora_config(cfg))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    length = round(statistics.mean(len(f.input_ids) for f in features))
    vocab = model.config.vocab_size
    data = [torch.randint(4, vocab, (cfg.micro_batch_size, length)) for _ in range(8)]
    with step_clock() as stamps:
        for s in range(steps):
            x = data[s % len(data)]
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    n = cfg.micro_batch_size * length
    return rate(stamps, [n] * steps, [n] * steps, skip)


def fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --- main ---------------------------------------------------------------------------------------------------
LABELS = {"engine": "this engine", "engine_noshare": "engine, no prefix sharing", "trl": "SFTTrainer, packing off", "trl_packed": "SFTTrainer, packing on",
          "bare": "bare loop (random tokens)", "trl_defaults": "SFTTrainer, its defaults"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing window (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setup, interleaved (default 3)")
    p.add_argument("--setups", default="engine,engine_noshare,trl,trl_packed,bare",
                   help="comma-separated subset, run in this order")
    p.add_argument("--hidden", type=int, default=96, help="model hidden size (96 = the embedded tiny model)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (2 = the embedded tiny model)")
    p.add_argument("--vocab", type=int, default=None, help="LM-head rows (default: the tokenizer's 532; e.g. 32768 "
                   "for Mistral-7B's head size; the extra rows are never a target)")
    p.add_argument("--pack-batch", type=int, default=None, help="packs per batch with packing on (default: as many "
                   "as hold one micro batch of examples)")
    p.add_argument("--trl-workers", type=int, default=0, help="dataloader_num_workers for SFTTrainer (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE: idle torch threads sleep "
                   "instead of spinning (steadier on a shared machine, sometimes slower on idle cores)")
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="start no further round of runs that would end after this (default 9)")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    if not 1 <= args.skip < args.steps:
        p.error("--skip must be at least 1 and below --steps")

    os.environ.setdefault("TQDM_DISABLE", "1")  # the engine's progress bar (read when tqdm is first imported)
    if args.omp_passive:
        if "torch" in sys.modules:
            p.error("--omp-passive must be set before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("app", "transformers", "trl", "accelerate", "peft", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import transformers

    try:
        import trl
    except ImportError:
        if any(s.startswith("trl") for s in args.setups.split(",")):
            sys.exit(f"error: {missing('trl', 'the trl setups (the SFTTrainer reference)', '--setups engine,bare')}")
        trl = None

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in LABELS]
    if unknown:
        p.error(f"unknown setup(s) {unknown}; choose from {list(LABELS)}")
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    try:
        model_dir = write_model(tmp / "model", args.hidden, args.layers, args.vocab)
        cfg = engine_config(model_dir, tmp / "unused", args.steps)
        tok, features = encode_features(cfg)
        lengths = [len(f.input_ids) for f in features]
        hf_model = load_hf_model(model_dir)
        n_params, vocab = sum(p.numel() for p in hf_model.parameters()), hf_model.config.vocab_size
        del hf_model
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}), transformers "
              f"{transformers.__version__}, trl {trl.__version__ if trl else 'not installed'}")
        print(f"model: Mistral architecture, hidden {args.hidden}, {args.layers} layers, vocab {vocab} (tokenizer "
              f"{len(tok)}), {n_params / 1e6:.2f}M parameters, fp32, sdpa; LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} "
              f"dropout={cfg.lora_dropout} on {cfg.target_modules}")
        loss_tokens = sum(sum(lab != -100 for lab in f.labels) for f in features)
        print(f"data: {TRAIN_FILE.relative_to(ROOT)}, {len(features)} examples, {min(lengths)}-{max(lengths)} tokens "
              f"(mean {statistics.mean(lengths):.1f}), loss on {loss_tokens} completion tokens; micro batch "
              f"{cfg.micro_batch_size}, max_seq_length {cfg.max_seq_length}, {args.steps} steps, timing window steps {args.skip + 1}..{args.steps}")
        if "trl_packed" in setups:
            check = check_packed_attention(model_dir, features, tok, cfg)
            print(f"packing check (TRL padding-free batch of {check['examples']} examples, {check['tokens']} tokens, "
                  f"attention_mask sent: {check['has_attention_mask']}): max |packed - separate| = "
                  f"{check['max_abs_diff_packed_vs_separate']:.2e} (a plain causal pass over the same row: "
                  f"{check['max_abs_diff_plain_causal_vs_separate']:.2e})")
        print(f"load average before: {os.getloadavg()}", flush=True)
        if os.getloadavg()[0] > 1.5 and torch.get_num_threads() > 1:
            print(f"note: the machine is busy; {torch.get_num_threads()} torch threads may stall each other "
                  "(see the note under the table)", flush=True)

        runs: dict[str, list[dict]] = {s: [] for s in setups}
        began = time.perf_counter()
        for r in range(args.repeats):
            round_start = time.perf_counter()
            for s in setups:
                load = os.getloadavg()[0]
                fresh_accelerate_state()  # every setup starts from a clean accelerate singleton
                if s == "engine":
                    res = run_engine(model_dir, tmp, args.steps, args.skip, features)
                elif s == "engine_noshare":
                    res = run_engine(model_dir, tmp, args.steps, args.skip, features, ("--share_prompt_prefix=False",))
                elif s == "trl":
                    res = run_trl(model_dir, tmp, args.steps, args.skip, features, tok, cfg, False, None,
                                  args.trl_workers)
                elif s == "trl_packed":
                    res = run_trl(model_dir, tmp, args.steps, args.skip, features, tok, cfg, True, args.pack_batch,
                                  args.trl_workers)
                elif s == "trl_defaults":
                    res = run_trl(model_dir, tmp, args.steps, args.skip, features, tok, cfg, False, None,
                                  args.trl_workers, defaults=True)
                else:
                    res = run_bare(model_dir, args.steps, args.skip, features, cfg)
                res["load_1min_before"] = load
                runs[s].append(res)
                extra = ""
                if res.get("engine_logged_tokens_per_s"):
                    extra = f"  (engine's own log: {res['engine_logged_tokens_per_s']:,.0f} tok/s)"
                if "per_device_train_batch_size" in res:
                    extra = (f"  (batch {res['per_device_train_batch_size']}, padding_free {res['padding_free']}, "
                             f"bf16 {res['bf16']}, gradient_checkpointing {res['gradient_checkpointing']})")
                print(f"  run {r + 1} {LABELS[s]:<27} {res['tokens_per_s']:>8,.0f} tok/s "
                      f"{res['tokens_per_cpu_s']:>8,.0f} tok/cpu-s  {res['seconds']:6.2f} s "
                      f"({res['cpu_seconds'] / res['seconds']:.2f} cpus busy) for {res['tokens']:,} tokens  padding {res['padding']:.3f}  load {load:.2f}{extra}", flush=True)
            spent, last_round = time.perf_counter() - began, time.perf_counter() - round_start
            if r + 1 < args.repeats and spent + last_round > args.max_minutes * 60:
                print(f"  stopping after {r + 1} round(s): another would pass --max-minutes={args.max_minutes}")
                break

        best = {s: max(v, key=lambda x: x["tokens_per_s"]) for s, v in runs.items()}
        median = {s: statistics.median(x["tokens_per_s"] for x in v) for s, v in runs.items()}
        best_cpu = {s: max(x["tokens_per_cpu_s"] for x in v) for s, v in runs.items()}
        print(f"\nload average after: {os.getloadavg()}; {len(next(iter(runs.values())))} run(s) per setup, "
              f"torch threads {torch.get_num_threads()}")
        refs = [s for s in ("trl", "trl_packed") if s in setups]
        head = f"{'setup':<27} {'best tok/s':>10} {'median':>8} {'tok/cpu-s':>10} {'padding':>8}"
        head += "".join(f" {'vs ' + ('SFT off' if s == 'trl' else 'SFT packed'):>11}" for s in refs)
        print(head)
        print("-" * len(head))
        for s in setups:
            line = (f"{LABELS[s]:<27} {best[s]['tokens_per_s']:>10,.0f} {median[s]:>8,.0f} {best_cpu[s]:>10,.0f} "
                    f"{best[s]['padding']:>8.3f}")
            line += "".join(f" {best[s]['tokens_per_s'] / best[ref]['tokens_per_s']:>10.2f}x" for ref in refs)
            print(line)
        print("tokens/s = non-pad tokens of the timed steps / their wall time (best run; ratios from the best runs);\n"
              "tok/cpu-s = the same tokens / CPU time of the process (all threads) in that window, best run.")
        if "engine" in setups and refs:
            wall = {k: v["tokens_per_s"] for k, v in best.items()}
            for name, table in (("tokens/s", wall), ("tok/cpu-s", best_cpu)):
                ratio = table["engine"] / max(table[r] for r in refs)
                print(f"engine vs the faster SFTTrainer setup, by {name}: {ratio:.2f}x (target >= 2.0x): "
                      f"{'met' if ratio >= 2.0 else 'NOT met'}")
        if max(x["load_1min_before"] for v in runs.values() for x in v) > 1.5 and torch.get_num_threads() > 1:
            print("note: other work was running (load average above 1.5). With several torch threads on a busy machine "
                  "the threads wait on each other and wall-clock figures can collapse (10x and more); compare the "
                  "tok/cpu-s column, or run with --threads 1.")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
