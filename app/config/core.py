"""The core config schema: the sections every run has, whatever its task.

Each section is a small pydantic model with a description per field; `CoreConfig` is all of them at once, and a
task's own section (app/tasks/<name>/config.py) is added beside them to make the run's config class
(`app.config.config_class`). The namespace stays flat: `cfg.lora_r`, `cfg.calib_beta`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# A path or name that must not be empty: an unset shell variable (`--out_dir=$RUN`) is an error, not the cwd.
NonEmpty = Annotated[str, Field(min_length=1, pattern=r"\S")]


class Section(BaseModel):
    """Base of every config section: strict types, unknown names rejected, checked on assignment too."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


class DataSection(Section):
    """Task and data"""

    task: str = Field("nli_cot", description="task package under app/tasks (python -m app config --list shows them)")
    train_file: NonEmpty = Field(
        "data/sample/train.csv", description="training data: CSV, JSONL, JSON, Parquet, a save_to_disk directory or "
        "a Hub dataset hf:OWNER/NAME[@REV][:CONFIG][:SPLIT]"
    )
    dev_file: NonEmpty | None = Field(
        "data/sample/dev.csv", description="dev data for evaluation (any train_file source); None to skip"
    )
    max_seq_length: int = Field(512, gt=0, description="prompt + response tokens per example")
    overlength: Literal["drop", "truncate", "error"] = Field(
        "truncate", description="what to do with examples longer than max_seq_length (truncate cuts the prompt)"
    )
    token_cache: bool = Field(
        True, description="reuse tokenized data when data, tokenizer, encoding settings and task code are unchanged"
    )
    token_cache_dir: NonEmpty | None = Field(
        None, description="where tokenized data is cached (shared by runs); None = out_dir/token_cache"
    )
    num_proc: int = Field(
        1, ge=1, description="processes that tokenize the data (contiguous chunks; the same features as 1); each "
        "training process starts its own"
    )


class ModelSection(Section):
    """Model"""

    model_name: NonEmpty | None = Field(
        "mistralai/Mistral-7B-v0.3", description="hub name or local directory of the base model (None: a task whose "
        "model is trained from scratch, which sets it)"
    )
    tokenizer_name: NonEmpty | None = Field(None, description="tokenizer hub name or directory; None = model_name")
    create_tiny_model: bool = Field(
        False, description="write the embedded tiny random-weight model to model_name first if it is missing"
    )
    trust_remote_code: bool = Field(
        False, description="allow model code from the hub or a model directory; off unless you trust it (never "
        "taken from a checkpoint's saved config)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight dtype; auto = bfloat16 on a GPU that supports it, else float32"
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="auto = flash_attention_2 when flash-attn is installed and on GPU, else sdpa"
    )
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    license: NonEmpty = Field(
        "apache-2.0", description="license of the trained weights, written into each final/best model card (an SPDX "
        "or Hub license id; check the base model's license allows it)"
    )


class MethodSection(Section):
    """Fine-tuning method"""

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


class OptimSection(Section):
    """Optimisation"""

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
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp copies the model to each; fsdp (FSDP2) shards parameters, gradients "
        "and optimizer state over them per transformer block (full fine-tuning beyond one GPU's memory)"
    )
    fsdp_cpu_offload: bool = Field(
        False, description="with parallelism='fsdp': keep the sharded parameters, gradients and optimizer state in CPU "
        "memory (slower steps, far less GPU memory)"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length to cut padding")
    share_prompt_prefix: bool = Field(
        True,
        description="compute the prompt prefix common to a micro batch once (>= 16 tokens; LoRA dropout then "
        "draws one mask for those tokens); off: every row computes it",
    )
    seed: int = Field(1234, description="seed for weights init, data order and dropout")

    @field_validator("fsdp_cpu_offload")
    @classmethod
    def _offload_needs_fsdp(cls, offload: bool, info: ValidationInfo) -> bool:
        # parallelism is declared first, so it is validated by now (absent only when it is itself invalid)
        parallelism = info.data.get("parallelism", "fsdp")
        if offload and parallelism != "fsdp":
            raise ValueError(f"needs parallelism='fsdp' (parallelism={parallelism!r} keeps no sharded state to "
                             "offload); set parallelism='fsdp' or drop fsdp_cpu_offload")
        return offload


class EvalSection(Section):
    """Evaluation"""

    eval_every: int = Field(200, gt=0, description="evaluate every N optimizer steps (and at the end)")
    eval_rows: int | None = Field(200, gt=0, description="dev rows used for generation metrics; None = all")
    eval_batch_size: int = Field(16, gt=0, description="rows per generation batch")
    max_new_tokens: int = Field(256, gt=0, description="generation budget for the answer")
    metric_for_best: str | None = Field(
        None, description="the metric that picks best/ (one the task declares: config --list --task NAME); "
        "None = the task's default"
    )


class RunSection(Section):
    """Run directory, logging and checkpoints"""

    log_every: int = Field(10, gt=0, description="log loss, lr and tokens/s every N steps")
    save_every: int = Field(200, gt=0, description="write a checkpoint every N optimizer steps")
    keep_last: int = Field(2, ge=1, description="step checkpoints to keep (best/ and final/ are kept apart)")
    out_dir: NonEmpty = Field("checkpoints/default", description="run directory: checkpoints, logs, resolved config")
    resume: Literal["auto", "fresh"] = Field(
        "auto", description="auto resumes from the latest checkpoint in out_dir; fresh moves old checkpoints aside"
    )
    stop_after_steps: int | None = Field(
        None, gt=0, description="checkpoint and exit after this many steps of this invocation (time-boxed jobs)"
    )
    tensorboard: bool = Field(True, description="write TensorBoard event files to out_dir/tensorboard")
    wandb: bool = Field(False, description="log to Weights & Biases (needs `pip install wandb`, WANDB_API_KEY)")
    wandb_project: str = Field("finetune-runner", description="W&B project name")


class InferSection(Section):
    """Inference"""

    infer_batch_size: int = Field(32, gt=0, description="rows per generation batch at inference")
    prefill_tokens: int = Field(
        2048, gt=0, description="padded prompt tokens per prefill chunk; a generation batch then decodes as one"
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="inference backend; vllm needs a GPU and `pip install 'finetune-runner[vllm]'`")


SECTIONS: tuple[type[Section], ...] = (
    DataSection, ModelSection, MethodSection, OptimSection, EvalSection, RunSection, InferSection,
)

# Settings that widen what a run trusts: taken only from the user's own config or command line, never from a
# checkpoint's saved run_config.json.
TRUST_FIELDS = ("trust_remote_code",)


class ScratchModelSection(Section):
    """Model trained from scratch

    A GPT of this shape: no base model (model_name is None), and max_seq_length, unless set, derived from
    context_length."""

    # core fields the section sets from its own (name -> why); a config that sets one is refused, and an older
    # run_config.json's value (a sentinel such as model_name="from-scratch") is dropped
    DERIVED: ClassVar[dict[str, str]] = {"model_name": "no base model: the model is trained from scratch"}

    context_length: int = Field(128, gt=0, description="L: input tokens per training sequence (max_seq_length, "
                                "when unset, is derived from it)")
    n_layer: int = Field(4, gt=0, description="transformer blocks")
    n_head: int = Field(4, gt=0, description="attention heads (d_model must divide by it)")
    d_model: int = Field(128, gt=0, description="residual width")
    mlp_ratio: int = Field(4, gt=0, description="MLP width = mlp_ratio x d_model (a task may widen one model's to "
                                                "match another's parameter count)")

    @classmethod
    def sequence_length(cls, context_length: int, data: dict) -> int:
        """max_seq_length when the config does not set it: the L inputs and the next token."""
        return context_length + 1

    @classmethod
    def derived(cls, data: dict) -> dict:
        """The values of the DERIVED fields (and of max_seq_length when unset), from the config's values."""
        out: dict = {"model_name": None}
        context = data.get("context_length", cls.model_fields["context_length"].default)
        if "max_seq_length" not in data and type(context) is int:  # a wrong type is reported by the field itself
            out["max_seq_length"] = cls.sequence_length(context, data)
        return out

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data):
        return {**data, **cls.derived(data)} if isinstance(data, dict) else data


class CoreConfig(*reversed(SECTIONS)):
    """Every core field. A run's config is this plus its task's section (see app.config.config_class)."""

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True)
