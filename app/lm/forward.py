"""Causal-LM pieces shared by tasks: the decoder/head split and losses that never build full logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unwrap_peft(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model) -> tuple[nn.Module, nn.Module]:
    """The transformer body (hidden states out) and the LM head, also through a peft wrapper."""
    lm = unwrap_peft(model)
    return lm.get_decoder(), lm.get_output_embeddings()


def last_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    decoder, _ = decoder_and_head(model)
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


MIN_SHARED_PREFIX = 16  # below this, the extra forward call costs more than the rows it saves


def shared_prefix_length(input_ids: list[list[int]], labels: list[list[int]] | None = None) -> int:
    """Leading tokens every row of a batch has in common (the instruction part of a prompt template); 0 when
    too short to be worth sharing. Every row keeps at least its last token outside, and with `labels` every
    position whose hidden state carries a loss stays outside too.
    Computed on the host while collating, so the forward pass needs no device-to-host sync to use it."""
    if len(input_ids) < 2:
        return 0
    limit = min(len(x) for x in input_ids) - 1
    if labels is not None:
        limit = min(limit, *(next((i for i, t in enumerate(lab) if t != -100), len(lab)) - 1 for lab in labels))
    first, n = input_ids[0], 0
    while n < limit and all(x[n] == first[n] for x in input_ids):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def plain_kv_cache(config):
    """A fresh DynamicCache for `config` when every layer is a plain one (full attention); None otherwise
    (sliding-window and other special layers): only plain layers can have keys/values broadcast or spliced."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    return cache if all(type(layer) is DynamicLayer for layer in cache.layers) else None


def broadcast_prefix(cache, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int):
    """Fill a fresh plain cache with a prefix's keys/values (batch 1) broadcast to `rows` rows, without a copy:
    the next update concatenates behind them (and autograd sums the rows' gradients back into the prefix)."""
    for layer, (k, v) in zip(cache.layers, prefix_kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
    return cache


def last_hidden_states_shared_prefix(model, input_ids, attention_mask, prefix: int) -> torch.Tensor | None:
    """Hidden states of positions prefix.. for a right-padded batch whose rows share their first `prefix`
    tokens: the prefix runs once (batch 1) and its keys/values are broadcast to every row, so its forward
    and backward cost is paid once per batch instead of once per row. Gradients flow back through the
    broadcast (summed over rows). Equal to the full forward up to float rounding, except that LoRA dropout
    draws one mask for the shared tokens of the batch. None when the model's cache cannot be shared
    (sliding-window or other special layers; gradient checkpointing, which drops caches)."""
    lm = unwrap_peft(model)
    name = "is_activation_checkpointing" if hasattr(type(lm), "is_activation_checkpointing") else "is_gradient_checkpointing"
    prefix_cache = None if getattr(lm, name, False) else plain_kv_cache(lm.config)
    if prefix_cache is None:
        return None
    decoder, _ = decoder_and_head(model)
    decoder(input_ids=input_ids[:1, :prefix], past_key_values=prefix_cache, use_cache=True)
    rows = input_ids.shape[0]
    cache = broadcast_prefix(plain_kv_cache(lm.config), [(la.keys, la.values) for la in prefix_cache.layers], rows)
    positions = torch.arange(prefix, input_ids.shape[1], device=input_ids.device).expand(rows, -1)
    return decoder(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, position_ids=positions,
                   past_key_values=cache, use_cache=True).last_hidden_state


class CompletionLoss(nn.Module):
    """Summed next-token cross-entropy on the positions whose label is not -100.

    Only the hidden states that carry a loss go through the LM head: with 32k-150k vocabularies the
    full [batch, seq, vocab] logits would dominate memory and time. With `share_prefix`, a prompt prefix
    common to the whole batch (`shared_prefix` tokens, from the collator) is computed once.
    """

    def __init__(self, model, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix

    def forward(self, input_ids, attention_mask, labels, shared_prefix: int = 0):
        hidden = None
        if self.share_prefix and shared_prefix:
            hidden = last_hidden_states_shared_prefix(self.model, input_ids, attention_mask, shared_prefix)
            if hidden is not None:
                labels = labels[:, shared_prefix:]  # the label at `shared_prefix` is a prompt token (-100)
        if hidden is None:
            hidden = last_hidden_states(self.model, input_ids, attention_mask)
        _, head = decoder_and_head(self.model)
        targets = labels[:, 1:]
        keep = targets != -100
        logits = head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")
