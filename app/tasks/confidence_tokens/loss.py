"""The confidence-token loss: cross-entropy of the token after the answer, projected through the LM head on gathered rows only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# --- LM head on gathered rows ----------------------------------------------------------------------------------------
def _head_parts(head):
    """(plain Linear, [(token indices, replacement rows)]) of an LM head, or (None, []) if it is something else.

    A peft TrainableTokensWrapper holds the base Linear and replacement rows for the trainable tokens; calling it
    would copy the whole [vocab, hidden] matrix on every call, so the rows are applied to the gathered logits instead.
    """
    layer = getattr(head, "token_adapter", None)
    if layer is not None and hasattr(layer, "trainable_tokens_delta"):
        base = layer.base_layer
        if not isinstance(base, nn.Linear) or not base.weight.is_floating_point():
            return None, []
        if layer.disable_adapters or layer.merged:
            return base, []
        parts = []
        for name in layer.active_adapters:
            if name in layer.trainable_tokens_delta:
                parts.append((layer.token_indices[name], layer.trainable_tokens_delta[name]))
        return base, parts
    if isinstance(head, nn.Linear) and head.weight.is_floating_point() and type(head) is nn.Linear:
        return head, []
    return None, []


def project(head, hidden: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of `hidden` [N, d]: over the whole vocabulary [N, V], or only `columns` [N, k] -> [N, k]."""
    base, parts = _head_parts(head)
    if base is None:
        logits = head(hidden)
        return logits if columns is None else logits.gather(1, columns)
    if columns is None:
        logits = F.linear(hidden, base.weight, base.bias)
        for indices, rows in parts:
            idx = torch.as_tensor(indices, device=hidden.device)
            bias = None if base.bias is None else base.bias[idx]
            sub = F.linear(hidden, rows.to(hidden.dtype), bias)
            logits = logits.index_copy(1, idx, sub.to(logits.dtype))
        return logits
    rows = base.weight[columns]  # [N, k, d]
    for indices, replacement in parts:
        idx = torch.as_tensor(indices, device=hidden.device)
        match = columns.unsqueeze(-1) == idx  # [N, k, t]
        hit = match.any(-1, keepdim=True)
        rows = torch.where(hit, replacement[match.float().argmax(-1)].to(rows.dtype), rows)
    logits = torch.einsum("nd,nkd->nk", hidden.float(), rows.float())
    if base.bias is not None:
        logits = logits + base.bias[columns].float()
    return logits


class ConfidenceTokenLoss(nn.Module):
    """Summed cross-entropy of the confidence token of each example, from the hidden state just before it.

    Batch: input_ids, attention_mask (right padded), labels (the target is read at conf_index only; every other
    label is ignored), conf_index [B] (position of the token), pair [B, 2] (the domain's C and U ids).
    """

    def __init__(self, model, mode: str = "full_vocab"):
        super().__init__()
        if mode not in ("full_vocab", "pair"):
            raise ValueError(f"confidence_loss must be 'full_vocab' or 'pair', found {mode!r}")
        self.model = model
        self.mode = mode

    def forward(self, input_ids, attention_mask, labels, conf_index, pair):
        from app.lm.forward import decoder_and_head, last_hidden_states

        width = int(conf_index.max())  # positions after the last token predict nothing
        hidden = last_hidden_states(self.model, input_ids[:, :width], attention_mask[:, :width])
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        gathered = hidden[rows, conf_index - 1]
        target = labels[rows, conf_index]
        _, head = decoder_and_head(self.model)
        if self.mode == "pair":
            logits = project(head, gathered, pair)
            return F.cross_entropy(logits.float(), (target == pair[:, 1]).long(), reduction="sum")
        return F.cross_entropy(project(head, gathered).float(), target, reduction="sum")
