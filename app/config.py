"""Experiment configs: Python modules of plain assignments, validated by one pydantic schema.

A config file is executed as Python; every top-level name that does not start with `_` is a config field.
To start from another config, assign its path (relative to the file) to `base_config`:

    base_config = "default.py"
    lora_r = 32

Command-line overrides `--name=value` are applied last; the value is parsed as a Python literal
(`--lora_r=64`, `--quantization=None`, `--target_modules=['q_proj','v_proj']`) and kept as a string otherwise.
"""

from __future__ import annotations

import ast
import difflib
import json
import sys
import types
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import UserError

# The fixed instruction comes first: a prefix common to every prompt is computed once per batch in training
# (share_prompt_prefix) and once per generation batch at inference.
DEFAULT_PROMPT = (
    "Does the premise entail the hypothesis? Think step by step, then answer with a JSON object "
    'holding "thought_process" and "predicted_label" (1 = entailed, 0 = not).\n'
    "Premise: {premise}\n"
    "Hypothesis: {hypothesis}\n"
    "Answer: "
)


class Config(BaseModel):
    """Every field of every run. Defaults are the CPU-safe choice; recipes in configs/ set the rest."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)

    # --- task and data -------------------------------------------------------------------------------
    task: str = Field("nli_cot", description="task module under app/tasks (nli_cot)")
    train_file: str = Field("data/sample/train.csv", description="training data, CSV or JSONL")
    dev_file: str | None = Field("data/sample/dev.csv", description="dev data for evaluation; None to skip")
    prompt_template: str = Field(DEFAULT_PROMPT, description="prompt; {premise} and {hypothesis} are filled in")
    max_seq_length: int = Field(512, gt=0, description="prompt + response tokens per example")
    overlength: Literal["drop", "truncate", "error"] = Field(
        "truncate", description="what to do with examples longer than max_seq_length (truncate cuts the prompt)"
    )

    # --- model ---------------------------------------------------------------------------------------
    model_name: str = Field("mistralai/Mistral-7B-v0.3", description="hub name or local directory")
    tokenizer_name: str | None = Field(None, description="tokenizer hub name or directory; None = model_name")
    create_tiny_model: bool = Field(
        False, description="write the embedded tiny random-weight model to model_name first if it is missing"
    )
    trust_remote_code: bool = Field(False, description="allow model code from the hub; off unless you trust it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight dtype; auto = bfloat16 on a GPU that supports it, else float32"
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="auto = flash_attention_2 when flash-attn is installed and on GPU, else sdpa"
    )
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")

    # --- fine-tuning method --------------------------------------------------------------------------
    finetuning: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="bitsandbytes base quantization (QLoRA)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    bnb_4bit_use_double_quant: bool = Field(True, description="quantize the quantization constants too")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="matmul dtype of 4-bit layers"
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="module names that get LoRA adapters"
    )

    # --- optimisation --------------------------------------------------------------------------------
    batch_size: int = Field(16, gt=0, description="effective (global) batch: micro_batch_size x accumulation x processes")
    micro_batch_size: int = Field(4, gt=0, description="examples per forward pass on one process")
    num_epochs: float = Field(2, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides num_epochs when set")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch) or a bitsandbytes variant"
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_steps: int | None = Field(None, ge=0, description="warmup optimizer steps (preferred over warmup_ratio)")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warmup as a fraction of all steps, if warmup_steps is None")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient-norm clip; None to disable")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="autocast; auto = bf16 on a GPU that supports it, else no"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length to cut padding")
    share_prompt_prefix: bool = Field(
        True,
        description="compute the prompt prefix common to a micro batch once (>= 16 tokens; LoRA dropout then "
        "draws one mask for those tokens); off: every row computes it",
    )
    seed: int = Field(1234, description="seed for weights init, data order and dropout")

    # --- evaluation, logging, checkpoints ------------------------------------------------------------
    eval_every: int = Field(200, gt=0, description="evaluate every N optimizer steps (and at the end)")
    eval_rows: int | None = Field(200, gt=0, description="dev rows used for generation metrics; None = all")
    eval_batch_size: int = Field(16, gt=0, description="rows per generation batch")
    max_new_tokens: int = Field(256, gt=0, description="generation budget for the JSON answer")
    metric_for_best: Literal["accuracy", "macro_f1", "dev_loss"] = Field("macro_f1", description="picks best/")
    log_every: int = Field(10, gt=0, description="log loss, lr and tokens/s every N steps")
    save_every: int = Field(200, gt=0, description="write a checkpoint every N optimizer steps")
    keep_last: int = Field(2, ge=1, description="step checkpoints to keep (best/ and final/ are kept apart)")
    out_dir: str = Field("checkpoints/default", description="run directory: checkpoints, logs, resolved config")
    resume: Literal["auto", "fresh"] = Field(
        "auto", description="auto resumes from the latest checkpoint in out_dir; fresh moves old checkpoints aside"
    )
    stop_after_steps: int | None = Field(
        None, gt=0, description="checkpoint and exit after this many steps of this invocation (time-boxed jobs)"
    )
    tensorboard: bool = Field(True, description="write TensorBoard event files to out_dir/tensorboard")
    wandb: bool = Field(False, description="log to Weights & Biases (needs `pip install wandb`, WANDB_API_KEY)")
    wandb_project: str = Field("finetune-runner", description="W&B project name")

    # --- inference -----------------------------------------------------------------------------------
    infer_batch_size: int = Field(32, gt=0, description="rows per generation batch at inference")
    prefill_tokens: int = Field(
        2048, gt=0, description="padded prompt tokens per prefill chunk; a generation batch then decodes as one"
    )
    backend: Literal["hf", "vllm"] = Field("hf", description="inference backend; vllm needs a GPU and `pip install vllm`")

    # --- task "confidence_tokens" (app/tasks/confidence_tokens.py) -----------------------------------
    confidence_tokens: dict[str, list[str]] = Field(
        {"boolq": ["<C_READ>", "<U_READ>"], "medqa": ["<C_MED>", "<U_MED>"]},
        description="confidence_tokens: dataset -> [confident token, unconfident token], added as special tokens",
    )
    confidence_loss: Literal["full_vocab", "pair"] = Field(
        "full_vocab", description="confidence_tokens: cross-entropy over the full vocabulary or the domain's two tokens"
    )
    validation_files: dict[str, str] = Field(
        {}, description="confidence_tokens: dataset -> raw QA file for validation; empty = dev_file (dataset column)"
    )
    confidence_prompt: str = Field(
        "{question}\nAnswer:", description="confidence_tokens: prompt around the question text ({question})"
    )
    confidence_chat_template: bool = Field(
        False, description="confidence_tokens: put the question in the tokenizer's chat template (instruct models)"
    )
    calib_beta: int | None = Field(
        50, gt=0, description="equal-mass calibration bins of this many samples (Kumar et al.); None = reference binning"
    )
    n_bins: int = Field(10, gt=0, description="equal-width bins of the ECE and the reliability diagram")
    calibration_metric: Literal[
        "ce_l2_debiased", "ce_l2_plugin", "ce_l1_plugin", "ce_max_plugin", "ece_l1", "ece_l2", "ece_max", "brier"
    ] = Field("ce_l2_debiased", description="confidence_tokens: the calibration_error that picks best_calibration/")
    hub_repo: str | None = Field(
        None, description="confidence_tokens: push final/ adapter + tokenizer to this Hub repo (HF_TOKEN from env)"
    )

    # --- task "confidence_head" (app/tasks/confidence_head.py) ---------------------------------------
    step_marker: str = Field(
        "<CONFIDENCE>", description="confidence_head: special token after each step; the head reads its hidden state"
    )
    step_train_files: dict[str, float] = Field(
        {}, description="confidence_head: training files -> sampling weight (weighted mix); empty = train_file alone"
    )
    step_dev_files: list[str] = Field([], description="confidence_head: dev files, concatenated; empty = dev_file")
    step_formats: dict[str, Literal["auto", "generic", "prm800k", "reveal", "eqasc"]] = Field(
        {}, description="confidence_head: file -> data format; unlisted files are detected from their first record"
    )
    step_mix_size: int | None = Field(
        None, gt=0, description="confidence_head: rows drawn from the weighted mix; None = all files' rows together"
    )
    head_hidden_sizes: list[int] = Field(
        [1024, 256], description="confidence_head: hidden widths of the MLP head (Linear + GELU + Dropout each)"
    )
    head_dropout: float = Field(0.1, ge=0, lt=1, description="confidence_head: dropout after each hidden layer of the head")
    head_loss: Literal["mse", "huber"] = Field("mse", description="confidence_head: regression loss on labelled steps")
    head_huber_delta: float = Field(1.0, gt=0, description="confidence_head: delta of the Huber loss (head_loss='huber')")
    head_metric_for_best: Literal["dev_loss", "mse", "mae", "pearson", "spearman", "auroc", "ece"] = Field(
        "dev_loss", description="confidence_head: picks best/ (lower is better for dev_loss, mse, mae, ece)"
    )

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True)


FIELDS = tuple(Config.model_fields)


# --- loading ---------------------------------------------------------------------------------------------
def _exec_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, tuple[object, str]]:
    """Values of one config file (after its base), each with the place that set it."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise UserError(f"{path}: base_config cycle ({chain})")
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    source = path.read_text(encoding="utf-8")
    namespace: dict = {"__file__": str(path), "__name__": "__config__"}
    try:
        exec(compile(source, str(path), "exec"), namespace)
    except SyntaxError as err:
        raise UserError(f"{path}:{err.lineno}: syntax error: {err.msg}") from None
    except Exception as err:  # a config is user code: report where it failed, in one line
        tb = err.__traceback__
        line = "?"
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        raise UserError(f"{path}:{line}: {type(err).__name__}: {err}") from None

    lines = _assignment_lines(source)
    values: dict[str, tuple[object, str]] = {}
    base = namespace.get("base_config")
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}:{lines.get('base_config', '?')}: base_config must be a path string")
        values.update(_exec_config_file((path.parent / base), (*seen, path)))
    for name, value in namespace.items():
        if name.startswith("_") or name == "base_config":
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue  # imports and helpers a config may use
        values[name] = (value, f"{path}:{lines.get(name, '?')}")
    return values


def _assignment_lines(source: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                lines[target.id] = node.lineno
    return lines


def parse_override(arg: str) -> tuple[str, object]:
    if not arg.startswith("--") or "=" not in arg:
        raise UserError(f"override {arg!r} must look like --name=value")
    name, raw = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.replace("-", "_"), value


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe_type(name: str) -> str:
    ann = Config.model_fields[name].annotation
    return str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Merge file (and its bases) with overrides, validate, and report every problem at once."""
    values = _exec_config_file(Path(path)) if path is not None else {}
    problems: list[str] = []
    for arg in overrides:
        try:
            name, value = parse_override(arg)
        except UserError as err:
            problems.append(str(err))
            continue
        values[name] = (value, "command line")

    for name, (_, where) in values.items():
        if name not in Config.model_fields:
            problems.append(f"{where}: unknown config key {name!r}{_suggest(name)}")
    known = {k: v for k, (v, _) in values.items() if k in Config.model_fields}
    # ints are fine for float fields (lr=1 is 1.0); strict mode would reject them otherwise
    for k, v in known.items():
        if Config.model_fields[k].annotation in (float, float | None) and type(v) is int:
            known[k] = float(v)
    try:
        cfg = Config(**known)
    except ValidationError as err:
        for e in err.errors():
            key = str(e["loc"][0]) if e["loc"] else "?"
            where = values[key][1] if key in values else "config"
            problems.append(
                f"{where}: {key}={e.get('input')!r}: {e['msg'].lower()} (expected {_describe_type(key)})"
            )
        cfg = None
    if problems:
        raise UserError("invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])
    return cfg


def describe_fields() -> str:
    """One line per field: name, default, meaning (`python -m app config --list`)."""
    rows = []
    for name, field in Config.model_fields.items():
        rows.append(f"{name:<28} {field.default!r:<32.32} {field.description}")
    return "\n".join(rows)


def cli(argv: list[str]) -> int:
    if argv and argv[0] == "--list":
        print(describe_fields())
        return 0
    if not argv or argv[0].startswith("--"):
        raise UserError("usage: python -m app config CONFIG.py [--key=value ...]  (or: config --list)")
    cfg = load_config(argv[0], argv[1:])
    sys.stdout.write(cfg.to_json() + "\n")
    return 0
