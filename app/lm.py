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


class CompletionLoss(nn.Module):
    """Summed next-token cross-entropy on the positions whose label is not -100.

    Only the hidden states that carry a loss go through the LM head: with 32k-150k vocabularies the
    full [batch, seq, vocab] logits would dominate memory and time.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        hidden = last_hidden_states(self.model, input_ids, attention_mask)
        _, head = decoder_and_head(self.model)
        targets = labels[:, 1:]
        keep = targets != -100
        logits = head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prefixes: list[str], continuations: list[str], device) -> torch.Tensor:
    """log p(continuation | prefix) for each pair, summed over the continuation's tokens (one batch)."""
    pad = tokenizer.pad_token_id
    seqs, starts = [], []
    for prefix, cont in zip(prefixes, continuations):
        p = tokenizer(prefix).input_ids
        c = tokenizer(prefix + cont).input_ids
        # the joint tokenization may merge across the boundary; score from the first differing token
        start = next((i for i, (a, b) in enumerate(zip(p, c)) if a != b), len(p))
        seqs.append(c)
        starts.append(max(start, 1))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    hidden = last_hidden_states(model, ids, mask)
    _, head = decoder_and_head(model)
    out = torch.zeros(len(seqs), device=device)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        logp = torch.log_softmax(head(hidden[i, start - 1 : len(s) - 1]).float(), dim=-1)
        out[i] = logp.gather(1, ids[i, start : len(s)].unsqueeze(1)).sum()
    return out
