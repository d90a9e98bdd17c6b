"""NLI predictions, one rule on both backends: greedy generation that stops when the JSON object closes, the label
parsed from it (app.tasks.nli_cot.extract), and where no label parses, the likelier of "0" and "1" after a forced
`"predicted_label": ` prefix (the forced-prefix fallback).

transformers runs it for evaluation during training and `infer --backend=hf` (`hf_batches`, one forward pass per
fallback row up to the token where the two labelled texts part); vLLM for `infer --backend=vllm` (`vllm_batches`,
one generated token restricted to the two label tokens).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from app.lm.generate import StopRule, generate_batches, next_token_logits
from app.lm.modeling import is_adapter_dir
from app.packages import missing
from app.tasks.nli_cot.extract import extract_label, json_object_closed
from app.tasks.nli_cot.prompts import build_prompt

JSON_CLOSED = StopRule(text=json_object_closed, text_triggers="}")  # EOS, or the JSON object has closed
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 512)


@dataclass
class Prediction:
    label: int
    thought: str
    parse_ok: bool  # False: the label came from the forced-prefix fallback
    how: str
    generation: str


def forced_prefix(prompt: str, thought: str | None) -> str:
    """The prompt, the JSON object so far (the generation's thought, when it had one) and `"predicted_label": `."""
    head = '{"thought_process": ' + json.dumps(thought, ensure_ascii=False) + ", " if thought else "{"
    return prompt + head + '"predicted_label": '


def parse_or_force(prompts: list[str], texts: list[str],
                   forced_labels: Callable[[list[str]], list[int]]) -> list[Prediction]:
    """The prediction of each generation: its parsed label, or where none parses, the one `forced_labels` picks for
    the row's forced prefix (those rows are marked parse_ok=False, how="forced_prefix")."""
    found = [extract_label(t) for t in texts]
    preds = [Prediction(e.label, e.thought, e.ok, e.how, t) for e, t in zip(found, texts)]
    missing_rows = [k for k, p in enumerate(preds) if p.label is None]
    if missing_rows:
        labels = forced_labels([forced_prefix(prompts[k], preds[k].thought) for k in missing_rows])
        for k, label in zip(missing_rows, labels):
            preds[k].label, preds[k].parse_ok, preds[k].how = label, False, "forced_prefix"
    return preds


# --- transformers ----------------------------------------------------------------------------------------------------
def hf_batches(model, tokenizer, cfg, rows: list[dict], device, batch_size: int,
               skip=None) -> Iterator[tuple[list[int], list[Prediction]]]:
    """(indices, predictions) batch by batch, longest prompts first."""
    prompts = [build_prompt(r, cfg) for r in rows]
    fallback = lambda prefixes: forced_labels(model, tokenizer, prefixes, device, cfg.prefill_tokens)  # noqa: E731
    for batch, texts in generate_batches(model, tokenizer, prompts, batch_size, cfg.max_new_tokens, device, skip,
                                          rule=JSON_CLOSED, prefill_tokens=cfg.prefill_tokens):
        yield batch, parse_or_force([prompts[i] for i in batch], texts, fallback)


def forced_labels(model, tokenizer, prefixes: list[str], device, prefill_tokens: int) -> list[int]:
    """Pick 0 or 1 by which label token the model ranks higher after each forced prefix (one forward pass per
    row, up to the token where the two labelled texts part)."""
    ids, zero, one = [], [], []
    for prefix in prefixes:
        c0, c1 = tokenizer(prefix + "0").input_ids, tokenizer(prefix + "1").input_ids
        # the joint tokenization may merge the label with what precedes it: score where the two part
        k = next(i for i, (a, b) in enumerate(zip(c0, c1)) if a != b)
        ids.append(c0[:k])
        zero.append(c0[k])
        one.append(c1[k])
    logits = next_token_logits(model, ids, tokenizer.pad_token_id, device, prefill_tokens)
    rows = torch.arange(len(ids), device=logits.device)
    return (logits[rows, torch.tensor(one, device=logits.device)]
            > logits[rows, torch.tensor(zero, device=logits.device)]).long().tolist()


# --- vLLM ------------------------------------------------------------------------------------------------------------
def no_vllm():
    return missing("vllm", "backend='vllm' (a GPU)", "use --backend=hf")


def vllm_batches(cfg, checkpoint: Path, tokenizer, values: list[dict], skip):
    """Greedy generation with vLLM in chunks of input order (for resume); a LoRA checkpoint is served as an adapter."""
    try:  # vllm is an optional extra (a GPU)
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise no_vllm() from None
    adapter = is_adapter_dir(checkpoint)
    llm = LLM(
        model=cfg.model_name if adapter else str(checkpoint),
        tokenizer=str(checkpoint),
        dtype="auto" if cfg.dtype == "auto" else cfg.dtype,
        max_model_len=cfg.max_seq_length,
        enable_lora=adapter,
        max_lora_rank=next((r for r in _VLLM_RANKS if r >= cfg.lora_r), cfg.lora_r),
        seed=cfg.seed,
        trust_remote_code=cfg.trust_remote_code,
    )
    lora = LoRARequest("checkpoint", 1, str(checkpoint.resolve())) if adapter else None
    greedy = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens)
    # the fallback: the likelier of the first tokens of "0" and "1" after the forced prefix
    head = tokenizer('"predicted_label": ', add_special_tokens=False).input_ids
    label_ids = []
    for digit in "01":
        full = tokenizer('"predicted_label": ' + digit, add_special_tokens=False).input_ids
        label_ids.append(full[next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), len(head))])
    forced = SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=label_ids)

    def fallback(prefixes: list[str]) -> list[int]:
        outs = llm.generate(prefixes, forced, lora_request=lora, use_tqdm=False)
        return [int(o.outputs[0].token_ids[0] == label_ids[1]) for o in outs]

    prompts = [build_prompt(v, cfg) for v in values]
    chunk = max(cfg.infer_batch_size, 256)
    for start in range(0, len(prompts), chunk):
        batch = list(range(start, min(start + chunk, len(prompts))))
        if skip(batch):
            continue
        outs = llm.generate([prompts[i] for i in batch], greedy, lora_request=lora, use_tqdm=False)
        yield batch, parse_or_force([prompts[i] for i in batch], [o.outputs[0].text for o in outs], fallback)
