"""Batched greedy generation: left padding, length-sorted batches, stop when the JSON object closes.

Used by evaluation during training and by `python -m app infer`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from app.extract import json_object_closed

log = logging.getLogger(__name__)


class _JsonClosed:
    """Per-row stop: a row is done once its generated text holds a complete JSON object.

    Decoding every row at every step would cost more than the step itself on small models, so a row is
    only decoded when its newest token can close a brace.
    """

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        vocab = tokenizer.get_vocab()
        closers = [i for tok, i in vocab.items() if "}" in tokenizer.convert_tokens_to_string([tok])]
        self.closers = torch.tensor(sorted(closers), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        maybe = torch.isin(input_ids[:, -1], self.closers.to(input_ids.device))
        for row in maybe.nonzero().flatten().tolist():
            text = self.tokenizer.decode(input_ids[row, self.prompt_width :], skip_special_tokens=True)
            done[row] = json_object_closed(text)
        return done


def _generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, device) -> list[str]:
    from transformers import StoppingCriteriaList

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    width = enc.input_ids.shape[1]
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_JsonClosed(tokenizer, width)]),
    )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def _generate_splitting_on_oom(model, tokenizer, prompts, max_new_tokens, device) -> list[str]:
    try:
        return _generate_batch(model, tokenizer, prompts, max_new_tokens, device)
    except torch.cuda.OutOfMemoryError:
        if len(prompts) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(prompts) // 2
        log.warning("out of memory on a batch of %d: splitting and retrying", len(prompts))
        return _generate_splitting_on_oom(model, tokenizer, prompts[:half], max_new_tokens, device) + (
            _generate_splitting_on_oom(model, tokenizer, prompts[half:], max_new_tokens, device)
        )


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so that each batch holds prompts of similar length (little left padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batches(
    model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int, device,
    skip: Callable[[list[int]], bool] | None = None,
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield (indices, generations) batch by batch, longest prompts first; callers restore input order."""
    lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
    model.eval()
    for batch in length_sorted_batches(lengths, batch_size):
        if skip is not None and skip(batch):
            continue
        with torch.no_grad():
            texts = _generate_splitting_on_oom(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, device)
        yield batch, texts


def generate(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int, device) -> list[str]:
    """Generations in input order."""
    result: list[str] = [""] * len(prompts)
    for batch, texts in generate_batches(model, tokenizer, prompts, batch_size, max_new_tokens, device):
        for i, text in zip(batch, texts):
            result[i] = text
    return result
