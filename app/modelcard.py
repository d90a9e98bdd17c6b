"""The model card (README.md) of a final/ or best*/ checkpoint, in the Hugging Face model-card format.

YAML front matter: base_model, library_name (peft for an adapter, transformers for a full model), license (the
`license` config field), tags, datasets (the training files), pipeline_tag and a `model-index` holding the evaluation
metrics of that checkpoint (the `eval/*` line of metrics.jsonl at the checkpoint's step). Then the task, the prompt
format, the training data, the recipe (the resolved config's key fields), the metrics table, how to load it and its
limitations. Written by the training loop into the checkpoint's temporary directory before it is published (so the
manifest covers it), and uploaded with the Hub push. Validated by huggingface_hub's ModelCard parser in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

RECIPE_FIELDS = ("task", "model_name", "finetuning", "quantization", "lora_r", "lora_alpha", "lora_dropout",
                 "target_modules", "dtype", "max_seq_length", "batch_size", "micro_batch_size", "num_epochs",
                 "max_steps", "learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "optimizer",
                 "weight_decay", "max_grad_norm", "seed", "metric_for_best")
_GENERATIVE = {"nli_cot", "confidence_tokens"}
_TASK_TEXT = {
    "nli_cot": "Natural language inference with chain-of-thought: given a premise and a hypothesis, the model answers "
               'with `{"thought_process": "...", "predicted_label": 0|1}` (1: the premise entails the hypothesis).',
    "confidence_tokens": "Answers followed by a confidence token (`<C_...>` / `<U_...>`: the answer is correct or "
                         "not), calibrated per data set.",
    "confidence_head": "A score head on the hidden state of a `<CONFIDENCE>` token after each reasoning step: a "
                       "per-step score in [0, 1].",
    "ranking": "FinQA candidate ranking: a decoder backbone and a score head pick the best of 8 candidate answers.",
}


def checkpoint_metrics(out_dir: Path, step: int) -> dict:
    """The evaluation metrics logged at `step` (metrics.jsonl `eval/*`, prefix dropped; the last such line wins)."""
    path = Path(out_dir) / "metrics.jsonl"
    found: dict = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step") == step and any(k.startswith("eval/") for k in rec):
            found = {k[5:]: v for k, v in rec.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    return found


def card_metadata(cfg, metrics: dict, adapter: bool, name: str) -> dict:
    task = cfg.task
    datasets = [Path(str(f)).name for f in (getattr(cfg, "train_file", None),) if f]
    meta = {
        "base_model": str(cfg.model_name),
        "library_name": "peft" if adapter else "transformers",
        "license": cfg.license,
        "tags": sorted({"finetune-runner", task, *(["lora"] if adapter else []),
                        *(["qlora"] if cfg.quantization else [])}),
        "datasets": datasets,
        "pipeline_tag": "text-generation" if task in _GENERATIVE else "text-classification",
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


def render(cfg, metrics: dict, adapter: bool, checkpoint_name: str, step: int) -> str:
    name = f"{Path(str(cfg.out_dir)).name}-{checkpoint_name}"
    meta = card_metadata(cfg, metrics, adapter, name)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    dump = cfg.model_dump()
    prompts = {k: v for k, v in dump.items() if isinstance(v, str) and (k.endswith("_prompt") or k == "prompt_template")}
    lines = [f"---\n{front}---\n", f"# {name}\n",
             f"Checkpoint `{checkpoint_name}` at step {step} of a `{cfg.task}` run, fine-tuned from "
             f"`{cfg.model_name}` ({'LoRA adapter' if adapter else 'full model'}) with finetune-runner.\n",
             "## Task\n", _TASK_TEXT.get(cfg.task, f"Task `{cfg.task}`.") + "\n"]
    if prompts:
        lines.append("## Prompt format\n")
        for k, v in prompts.items():
            lines.append(f"`{k}`:\n\n```text\n{v}\n```\n")
    lines += ["## Training data\n", f"- train: `{dump.get('train_file')}`", f"- dev: `{dump.get('dev_file')}`\n",
              "## Recipe\n", "| field | value |", "| --- | --- |"]
    lines += [f"| `{k}` | `{dump[k]}` |" for k in RECIPE_FIELDS if k in dump]
    lines.append("\nThe full resolved config is `run_config.json` beside this card.\n")
    lines += ["## Metrics\n"]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *[f"| {k} | {v:.4f} |" for k, v in metrics.items()], ""]
    else:
        lines.append("No evaluation at this step (no dev set, or no evaluation due).\n")
    lines.append("## How to load\n")
    if adapter:
        lines.append(f"```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                     f"AutoTokenizer\n\ntokenizer = AutoTokenizer.from_pretrained(\"CHECKPOINT\")\nmodel = "
                     f"AutoModelForCausalLM.from_pretrained({str(cfg.model_name)!r})\n"
                     f"model.resize_token_embeddings(len(tokenizer))\nmodel = PeftModel.from_pretrained(model, "
                     f"\"CHECKPOINT\")\n```\n")
    else:
        lines.append("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\ntokenizer = "
                     "AutoTokenizer.from_pretrained(\"CHECKPOINT\")\nmodel = AutoModelForCausalLM.from_pretrained("
                     "\"CHECKPOINT\")\n```\n")
    lines.append("Or `python -m app infer INPUT --checkpoint CHECKPOINT`; `python -m app export CHECKPOINT --output DIR "
                 "--merge` writes a plain model and prints `vllm serve` / `transformers serve` commands.\n")
    lines += ["## Limitations\n",
              "- Evaluated only on the dev set named above; metrics on other data may differ.",
              "- Binary labels only (NLI: entailment or not); the reasoning text is generated and may be wrong even "
              "when the label is right." if cfg.task == "nli_cot" else
              "- Outputs are model generations or scores and can be wrong; check them before relying on them.",
              "- Inherits the biases and license terms of the base model.", ""]
    return "\n".join(lines)


def write_model_card(directory: Path, cfg, checkpoint_name: str, step: int) -> Path:
    """README.md in `directory` (a checkpoint being written) for checkpoint `checkpoint_name` at `step`."""
    directory = Path(directory)
    adapter = (directory / "adapter_config.json").is_file()
    text = render(cfg, checkpoint_metrics(cfg.out_path, step), adapter, checkpoint_name, step)
    path = directory / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def wants_card(name: str) -> bool:
    return name == "final" or name.startswith("best")
