"""The model card (README.md) of a final/ or best*/ checkpoint, in the Hugging Face model-card format.

YAML front matter: base_model (none for a model trained from scratch), library_name (peft for an adapter,
transformers for a full model), license (the `license` config field), tags, datasets (the training data), pipeline_tag
and a `model-index` holding the evaluation metrics of that checkpoint (the `eval/*` line of metrics.jsonl at the
checkpoint's step). Then the task, the prompt format, the training data, the recipe (the resolved config's key fields),
the metrics table, how to load it and its limitations. Written by the training loop into the checkpoint's temporary
directory before it is published (so the manifest covers it), and uploaded with the Hub push. Validated by
huggingface_hub's ModelCard parser in the tests.

What only the task knows (its pipeline tag, what it does, how its checkpoint loads, which fields make its recipe) it
says through `Task.model_card(cfg)`, a `CardText`; this module knows no task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from app.metrics.plots import read_metrics
from app.registry import get_task

RECIPE_FIELDS = ("task", "model_name", "finetuning", "quantization", "lora_r", "lora_alpha", "lora_dropout",
                 "target_modules", "dtype", "max_seq_length", "batch_size", "micro_batch_size", "num_epochs",
                 "max_steps", "learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "optimizer",
                 "weight_decay", "max_grad_norm", "seed", "metric_for_best")
GENERIC_LIMITATION = "Outputs are model generations or scores and can be wrong; check them before relying on them."


@dataclass(frozen=True)
class CardText:
    """What a task's model card says that only the task knows."""

    summary: str  # the "Task" section: what the model does
    pipeline_tag: str = "text-generation"
    from_scratch: str | None = None  # for a model trained from scratch, what it is; None: fine-tuned from model_name
    how_to_load: str | None = None  # markdown; None: the transformers (and peft) code and the infer/export commands
    recipe_fields: tuple[str, ...] = RECIPE_FIELDS
    data_fields: tuple[str, ...] = ("train_file", "dev_file")  # the first is what the model was trained on
    limitation: str = GENERIC_LIMITATION


def checkpoint_metrics(out_dir: Path, step: int) -> dict:
    """The evaluation metrics logged at `step` (metrics.jsonl `eval/*`, prefix dropped; the last such line wins)."""
    path = Path(out_dir) / "metrics.jsonl"
    found: dict = {}
    if not path.is_file():
        return found
    for rec in read_metrics(path):
        if rec["step"] == step and any(k.startswith("eval/") for k in rec):
            found = {k[5:]: v for k, v in rec.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    return found


def card_metadata(cfg, metrics: dict, adapter: bool, name: str, card: CardText) -> dict:
    task = cfg.task
    trained_on = getattr(cfg, card.data_fields[0], None) if card.data_fields else None
    meta = {
        **({} if card.from_scratch else {"base_model": str(cfg.model_name)}),
        **({} if card.from_scratch else {"library_name": "peft" if adapter else "transformers"}),
        "license": cfg.license,
        "tags": sorted({"finetune-runner", task, *(["lora"] if adapter else []),
                        *(["qlora"] if cfg.quantization else []), *(["from-scratch"] if card.from_scratch else [])}),
        "datasets": [Path(str(trained_on)).name] if trained_on else [],
        "pipeline_tag": card.pipeline_tag,
    }
    if metrics:
        meta["model-index"] = [{
            "name": name,
            "results": [{
                "task": {"type": meta["pipeline_tag"], "name": task},
                "dataset": {"name": Path(str(cfg.dev_file)).name if cfg.dev_file else "dev", "type": "custom",
                            "split": "dev"},
                "metrics": [{"type": k, "value": float(v), "name": k} for k, v in metrics.items()],
            }],
        }]
    return meta


def _origin(cfg, adapter: bool, card: CardText) -> str:
    if card.from_scratch:
        return f"{card.from_scratch}, trained from scratch with finetune-runner."
    return f"fine-tuned from `{cfg.model_name}` ({'LoRA adapter' if adapter else 'full model'}) with finetune-runner."


def _how_to_load(cfg, adapter: bool) -> list[str]:
    """The transformers (and peft) code that loads a fine-tuned causal LM checkpoint, and the commands that run it."""
    if adapter:
        code = (f"```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                f"AutoTokenizer\n\ntokenizer = AutoTokenizer.from_pretrained(\"CHECKPOINT\")\nmodel = "
                f"AutoModelForCausalLM.from_pretrained({str(cfg.model_name)!r})\n"
                f"model.resize_token_embeddings(len(tokenizer))\nmodel = PeftModel.from_pretrained(model, "
                f"\"CHECKPOINT\")\n```\n")
    else:
        code = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\ntokenizer = "
                "AutoTokenizer.from_pretrained(\"CHECKPOINT\")\nmodel = AutoModelForCausalLM.from_pretrained("
                "\"CHECKPOINT\")\n```\n")
    return [code, "Or `python -m app infer INPUT --checkpoint CHECKPOINT`; `python -m app export CHECKPOINT --output DIR "
                  "--merge` writes a plain model and prints `vllm serve` / `transformers serve` commands.\n"]


def render(cfg, metrics: dict, adapter: bool, checkpoint_name: str, step: int, card: CardText) -> str:
    name = f"{Path(str(cfg.out_dir)).name}-{checkpoint_name}"
    front = yaml.safe_dump(card_metadata(cfg, metrics, adapter, name, card), sort_keys=False, allow_unicode=True)
    dump = cfg.model_dump()
    prompts = {k: v for k, v in dump.items() if isinstance(v, str) and (k.endswith("_prompt") or k == "prompt_template")}
    lines = [f"---\n{front}---\n", f"# {name}\n",
             f"Checkpoint `{checkpoint_name}` at step {step} of a `{cfg.task}` run, {_origin(cfg, adapter, card)}\n",
             "## Task\n", card.summary + "\n"]
    if prompts:
        lines.append("## Prompt format\n")
        for k, v in prompts.items():
            lines.append(f"`{k}`:\n\n```text\n{v}\n```\n")
    data = [f"- {field.removesuffix('_file')}: `{dump.get(field)}`" for field in card.data_fields]
    lines += ["## Training data\n", *data[:-1], data[-1] + "\n", "## Recipe\n", "| field | value |", "| --- | --- |"]
    lines += [f"| `{k}` | `{dump[k]}` |" for k in card.recipe_fields if k in dump]
    lines.append("\nThe full resolved config is `run_config.json` beside this card.\n")
    lines += ["## Metrics\n"]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *[f"| {k} | {v:.4f} |" for k, v in metrics.items()], ""]
    else:
        lines.append("No evaluation at this step (no dev set, or no evaluation due).\n")
    lines.append("## How to load\n")
    lines += [card.how_to_load] if card.how_to_load else _how_to_load(cfg, adapter)
    lines += ["## Limitations\n",
              "- Evaluated only on the dev set named above; metrics on other data may differ.",
              f"- {card.limitation}",
              "- Inherits the biases and license terms of the base model." if not card.from_scratch else
              "- Trained only on the data named above; it knows nothing else.", ""]
    return "\n".join(lines)


def write_model_card(directory: Path, cfg, checkpoint_name: str, step: int, card: CardText | None = None) -> Path:
    """README.md in `directory` (a checkpoint being written) for checkpoint `checkpoint_name` at `step`; `card` is
    what the task says (default: the config's task's `model_card`)."""
    directory = Path(directory)
    adapter = (directory / "adapter_config.json").is_file()
    card = card or get_task(cfg.task).model_card(cfg)
    text = render(cfg, checkpoint_metrics(cfg.out_path, step), adapter, checkpoint_name, step, card)
    path = directory / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
