"""Batched greedy generation: left padding, length-sorted batches, rows leave the batch when done.

Used by evaluation during training, by `python -m app infer` and by the confidence-token task (validation and
`python -m app tag`). When a row is done and what it may generate is a `StopRule`: EOS, a set of stop token ids
(kept as the row's last token), `max_new_tokens`, or a predicate on the decoded text that the caller passes (a task's
"the answer is complete"); ids suppressed at every step or only at the first. Done rows are dropped from the batch and its
KV cache, so the remaining steps only compute rows still generating.

Entry points: `generate_batches` / `generate` (text prompts, decoded generations) and `generate_id_batches` /
`generate_ids` (token-id prompts, generated ids); all share one batch loop (`_generate_batch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from app.lm.fsdp import is_sharded
from app.lm.forward import broadcast_prefix, plain_kv_cache, shared_prefix_length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopRule:
    """When a generated row is done, and which ids it may not generate.

    A row stops at EOS when `eos` (EOS is not kept), at any of `stop_ids` (kept as the row's last token: callers
    look at which one ended the row), after `max_new_tokens`, or when `text(decoded generation)` is true; `text` is
    only consulted after a token whose text holds one of `text_triggers`. `never` ids are not generated at all,
    `not_first` ids not as the first new token. Lists are accepted and stored as frozenset / tuples.
    """

    eos: bool = True
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    text: Callable[[str], bool] | None = None
    text_triggers: str = "}"
    never: tuple[int, ...] = ()
    not_first: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", frozenset(self.stop_ids))
        object.__setattr__(self, "never", tuple(dict.fromkeys(self.never)))
        object.__setattr__(self, "not_first", tuple(dict.fromkeys(self.not_first)))


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


class SlotLayer(DynamicLayer):
    """A KV-cache layer stored in a buffer sized for the whole generation.

    transformers' DynamicLayer appends a token with torch.cat, copying the whole cache every step (a
    third of a decode step on CPU at batch 128); this one writes one slot per step and hands out views.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.kbuf, self.vbuf, self.length = keys, values, length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._views()

    def _views(self):
        self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.kbuf.shape[-2]:  # past the planned size: grow by doubling (not reached in generation)
            grow = max(end, 2 * self.kbuf.shape[-2]) - self.kbuf.shape[-2]
            pad = lambda b: torch.cat([b, b.new_zeros(*b.shape[:2], grow, b.shape[3])], dim=2)
            self.kbuf, self.vbuf = pad(self.kbuf), pad(self.vbuf)
        self.kbuf[:, :, self.length : end] = key_states
        self.vbuf[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
        self._views()


def _slot_layer(keys: torch.Tensor, values: torch.Tensor, length: int):
    """A cache layer over preallocated buffers [batch, heads, slots, head_dim], the first `length` slots filled."""
    return SlotLayer(keys, values, length)


def prefill_chunks(lengths: Sequence[int], budget: int) -> list[range]:
    """Consecutive rows of a length-sorted (longest first) batch, each chunk at most `budget` padded tokens.

    One prefill over a wide batch runs its element-wise work (norms, rotary, MLP activations) on tensors far
    bigger than the CPU caches and pays for every row's left padding up to the longest prompt; chunks of a few
    thousand tokens keep both small. The chunks' caches are merged for decoding, which stays one batch.
    """
    chunks, start = [], 0
    while start < len(lengths):
        end, width = start + 1, lengths[start]
        while end < len(lengths) and (end + 1 - start) * max(width, lengths[end]) <= budget:
            width = max(width, lengths[end])
            end += 1
        chunks.append(range(start, end))
        start = end
    return chunks


def _prefill(model, ids: list[list[int]], pad: int, device, max_new_tokens: int, budget: int, merge: bool = True):
    """Prefill; returns (last-token logits, attention mask, cache ready for decoding); with merge=False only
    the logits (mask and cache None).

    The tokens every prompt of the batch starts with (a template's instruction) run once and their keys and
    values are shared; the rest is prefilled in chunks of at most `budget` padded tokens. The merged cache is
    laid out [shared prefix | left padding | prompt rest] per row, the padding masked out.
    """
    if plain_kv_cache(model.config) is None:
        # sliding-window or other special layers: one plain prefill into transformers' own cache
        input_ids, mask = left_padded(ids, pad, device)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], mask, cache
    shared = shared_prefix_length(ids)
    prefix_kv = []
    if shared:
        cache = plain_kv_cache(model.config)
        model(input_ids=torch.tensor([ids[0][:shared]], device=device), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
    rests = [x[shared:] for x in ids]
    logits, kv = [], []
    for rows in prefill_chunks([len(x) for x in rests], budget):
        input_ids, mask = left_padded([rests[r] for r in rows], pad, device)
        cache = broadcast_prefix(plain_kv_cache(model.config), prefix_kv, len(rows))
        if prefix_kv:
            mask = torch.cat([mask.new_ones((len(rows), shared)), mask], dim=1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, shared:].clamp(min=0),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1])
        kv.append(cache)
    if not merge:
        return torch.cat(logits), None, None
    rest_mask = left_padded(rests, pad, device)[1]
    mask = torch.cat([rest_mask.new_ones((len(ids), shared)), rest_mask], dim=1)
    end = mask.shape[1]
    layers = []
    for i, first in enumerate(kv[0].layers):
        shape = (len(ids), first.keys.shape[1], end + max_new_tokens, first.keys.shape[3])
        kbuf, vbuf = first.keys.new_zeros(shape), first.values.new_zeros(shape)
        row = 0
        for cache in kv:  # each chunk's rest is left-padded to its own width: right-align it in the merged buffer
            k, v = cache.layers[i].keys, cache.layers[i].values
            rows, width = len(k), k.shape[2] - shared
            kbuf[row : row + rows, :, :shared], vbuf[row : row + rows, :, :shared] = k[:, :, :shared], v[:, :, :shared]
            kbuf[row : row + rows, :, end - width : end] = k[:, :, shared:]
            vbuf[row : row + rows, :, end - width : end] = v[:, :, shared:]
            row += rows
        layers.append(_slot_layer(kbuf, vbuf, end))
    merged = DynamicCache()
    merged.layers = layers
    return torch.cat(logits), mask, merged


@torch.no_grad()
def next_token_logits(model, ids: list[list[int]], pad: int, device, prefill_tokens: int) -> torch.Tensor:
    """Logits of the token after each prompt, in the given order, prefilled as generation does (the common
    prefix once, the rest in length-sorted chunks)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    logits = _prefill(model, [ids[i] for i in order], pad, device, 0, prefill_tokens, merge=False)[0]
    out = torch.empty_like(logits)
    out[torch.tensor(order, device=logits.device)] = logits
    return out


def _suppression(rule: StopRule, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ids masked at the first step, ids masked at later steps) as index tensors; None where nothing is."""
    first, later = list(dict.fromkeys(rule.never + rule.not_first)), list(rule.never)
    index = lambda ids: torch.tensor(ids, dtype=torch.long, device=device) if ids else None  # noqa: E731
    return index(first), index(later)


@torch.no_grad()
def _generate_batch(model, tokenizer, ids: list[list[int]], max_new_tokens: int, device, rule: StopRule,
                    triggers: frozenset[int], prefill_tokens: int) -> list[list[int]]:
    """Generated ids of one batch (in its order): the loop every entry point shares."""
    eos = tokenizer.eos_token_id if rule.eos else None
    stops, text = rule.stop_ids, rule.text
    logits, mask, cache = _prefill(model, ids, tokenizer.pad_token_id, device, max_new_tokens, prefill_tokens)
    suppress, suppress_later = _suppression(rule, logits.device)
    synced = is_sharded(model)
    last_pos = mask.sum(-1) - 1
    generated: list[list[int]] = [[] for _ in ids]
    alive = list(range(len(ids)))
    for _ in range(max_new_tokens):
        if suppress is not None:  # a masked fill on this step's logits, before the argmax
            logits.index_fill_(1, suppress, float("-inf"))
        suppress = suppress_later
        tokens = logits.argmax(-1)
        if synced:  # each process of a sharded model must make the same forward calls: rank 0's tokens are all's
            torch.distributed.broadcast(tokens, src=0)
        keep = []
        for k, (row, t) in enumerate(zip(alive, tokens.tolist())):
            if t in stops:
                generated[row].append(t)
                continue
            if t == eos:
                continue
            generated[row].append(t)
            if text is not None and t in triggers and text(tokenizer.decode(generated[row], skip_special_tokens=True)):
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
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return generated


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


def generate_id_batches(
    model, tokenizer, prompt_ids: Sequence[list[int]], batch_size: int, max_new_tokens: int, device,
    rule: StopRule = StopRule(), skip: Callable[[list[int]], bool] | None = None, prefill_tokens: int = 2048,
) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Yield (indices, generated ids) batch by batch, longest prompts first; callers restore input order.

    Prompts are token ids (already truncated). `skip(indices)` lets a resumed caller pass over batches it already
    has. Prompts are prefilled `prefill_tokens` padded tokens at a time (at least one row), then decoded as one
    batch; a batch that runs out of GPU memory is split in halves.
    """
    triggers = trigger_ids(tokenizer, rule.text_triggers) if rule.text is not None else frozenset()
    model.eval()
    for batch in length_sorted_batches([len(x) for x in prompt_ids], batch_size):
        if skip is not None and skip(batch):
            continue
        run = lambda part: _generate_batch(  # noqa: E731
            model, tokenizer, part, max_new_tokens, device, rule, triggers, prefill_tokens)
        yield batch, split_on_oom(run, [prompt_ids[i] for i in batch])


def generate_ids(model, tokenizer, prompt_ids: Sequence[list[int]], batch_size: int, max_new_tokens: int, device,
                 rule: StopRule = StopRule(), prefill_tokens: int = 2048) -> list[list[int]]:
    """Generated ids in input order (a stop id, when one ended the row, is its last id; EOS is not kept)."""
    result: list[list[int]] = [[] for _ in prompt_ids]
    for batch, outs in generate_id_batches(model, tokenizer, prompt_ids, batch_size, max_new_tokens, device, rule,
                                           prefill_tokens=prefill_tokens):
        for i, out in zip(batch, outs):
            result[i] = out
    return result


def generate_batches(
    model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int, device,
    skip: Callable[[list[int]], bool] | None = None, rule: StopRule = StopRule(), prefill_tokens: int = 2048,
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield (indices, generations) batch by batch, longest prompts first; callers restore input order.

    Text prompts are tokenized once and run through `generate_id_batches`; generations are decoded without special
    tokens. `rule` says when a row is done (default: at EOS or after `max_new_tokens`).
    """
    ids = tokenizer(list(prompts)).input_ids
    for batch, outs in generate_id_batches(model, tokenizer, ids, batch_size, max_new_tokens, device, rule, skip,
                                           prefill_tokens):
        yield batch, [tokenizer.decode(g, skip_special_tokens=True) for g in outs]


def generate(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int, device,
             **kwargs) -> list[str]:
    """Generations in input order (keyword arguments as `generate_batches`)."""
    result: list[str] = [""] * len(prompts)
    for batch, texts in generate_batches(model, tokenizer, prompts, batch_size, max_new_tokens, device, **kwargs):
        for i, text in zip(batch, texts):
            result[i] = text
    return result
