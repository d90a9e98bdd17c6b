"""Batched greedy generation: left padding, length-sorted batches, rows leave the batch when done.

Used by evaluation during training and by `python -m app infer`. A row is done at EOS, after
`max_new_tokens`, or when its text satisfies `stop` (by default: the JSON object has closed). Done rows are
dropped from the batch and its KV cache, so the remaining steps only compute rows still generating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from app.extract import json_object_closed

log = logging.getLogger(__name__)

_TRIGGERS: dict[tuple[int, str], tuple[object, frozenset[int]]] = {}


def trigger_ids(tokenizer, chars: str) -> frozenset[int]:
    """Ids of tokens whose text holds one of `chars`: only after those can `stop` become true, so the
    (costly) decode-and-check runs on few steps. Computed once per tokenizer."""
    key = (id(tokenizer), chars)
    cached = _TRIGGERS.get(key)
    if cached is None or cached[0] is not tokenizer:
        ids = frozenset(i for tok, i in tokenizer.get_vocab().items()
                        if any(c in tokenizer.convert_tokens_to_string([tok]) for c in chars))
        cached = _TRIGGERS[key] = (tokenizer, ids)
    return cached[1]


def left_padded(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for k, row in enumerate(ids):
        input_ids[k, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[k, width - len(row):] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def _generate_batch(model, tokenizer, ids: list[list[int]], max_new_tokens: int, device,
                    stop: Callable[[str], bool] | None, triggers: frozenset[int]) -> list[str]:
    from transformers import DynamicCache

    eos = tokenizer.eos_token_id
    input_ids, mask = left_padded(ids, tokenizer.pad_token_id, device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    last_pos = position[:, -1]
    generated: list[list[int]] = [[] for _ in ids]
    alive = list(range(len(ids)))
    for _ in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        keep = []
        for k, (row, t) in enumerate(zip(alive, tokens.tolist())):
            if t == eos:
                continue
            generated[row].append(t)
            if stop is not None and t in triggers and stop(tokenizer.decode(generated[row], skip_special_tokens=True)):
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
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated]


def split_on_oom(run: Callable[[list], list], items: list) -> list:
    """run(items), and on a CUDA out-of-memory error the same on each half: a batch is split, never dropped."""
    try:
        return run(items)
    except torch.cuda.OutOfMemoryError:
        if len(items) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("out of memory on a batch of %d: splitting and retrying", len(items))
        return split_on_oom(run, items[:half]) + split_on_oom(run, items[half:])


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so that each batch holds prompts of similar length (little left padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batches(
    model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int, device,
    skip: Callable[[list[int]], bool] | None = None,
    stop: Callable[[str], bool] | None = json_object_closed, stop_chars: str = "}",
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield (indices, generations) batch by batch, longest prompts first; callers restore input order.

    `skip(indices)` lets a resumed caller pass over batches it already has. `stop(text)` ends a row early; it is
    only consulted after a token holding one of `stop_chars`.
    """
    ids = tokenizer(list(prompts)).input_ids  # tokenized once: for sorting and for the batches
    triggers = trigger_ids(tokenizer, stop_chars) if stop is not None else frozenset()
    model.eval()
    for batch in length_sorted_batches([len(x) for x in ids], batch_size):
        if skip is not None and skip(batch):
            continue
        texts = split_on_oom(lambda part: _generate_batch(model, tokenizer, part, max_new_tokens, device, stop, triggers),
                             [ids[i] for i in batch])
        yield batch, texts


def generate(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int, device,
             **kwargs) -> list[str]:
    """Generations in input order."""
    result: list[str] = [""] * len(prompts)
    for batch, texts in generate_batches(model, tokenizer, prompts, batch_size, max_new_tokens, device, **kwargs):
        for i, text in zip(batch, texts):
            result[i] = text
    return result
