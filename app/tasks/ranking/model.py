"""The ranking model: a decoder backbone, last-real-token pooling, a 2-layer MLP score head, and the listwise losses.

Batch layout (from `collate_ranking`): per question its prefix (question + context) `prefix_ids` [B, P] right-padded
with `prefix_mask`, and its candidates `cand_ids` [B, K, S] right-padded with `cand_mask`; `cand_valid` [B, K] marks
real candidate slots, `rewards` [B, K] their rewards.

Two forwards give the same scores (to float rounding):

  shared prefix  the B prefixes run once (batch B) with a key/value cache; each candidate row then runs only its own
                 tokens, attending to its question's cached keys/values (gathered per row; autograd sums the rows'
                 gradients back into the prefix). Candidate rows can go in chunks (`candidate_chunk`).
  flattened      every candidate as its own sequence prefix + candidate (B x K rows), padded left or right, position
                 ids from the attention mask (so the side of the padding does not matter).

Either way the score of a candidate is the head on the hidden state of its last real token (the EOS after it), and
depends on nothing else in the batch. The LM head is never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.lm.forward import decoder_and_head, plain_kv_cache, unwrap_peft

HEAD_FILE = "score_head.safetensors"


class ScoreHead(nn.Module):
    """Linear(hidden -> width) + GELU + Dropout, Linear(width -> 1)."""

    def __init__(self, hidden_size: int, width: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def _activation_checkpointing(model) -> bool:
    lm = unwrap_peft(model)
    name = "is_activation_checkpointing" if hasattr(type(lm), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(lm, name, False))


def flat_sequences(prefix_ids, prefix_mask, cand_ids, cand_mask, rows_q, rows_k, pad_id: int, side: str = "right"):
    """(ids, mask) of the flattened rows: prefix + candidate of each (question, slot) pair, padded on `side`."""
    seqs = []
    plen, clen = prefix_mask.sum(1).tolist(), cand_mask.sum(2)
    for q, k in zip(rows_q.tolist(), rows_k.tolist()):
        seqs.append(torch.cat([prefix_ids[q, : plen[q]], cand_ids[q, k, : int(clen[q, k])]]))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=prefix_ids.device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=prefix_ids.device)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
        else:
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where mask is 1, for left or right padding."""
    width = mask.shape[1]
    return width - 1 - mask.long().flip(1).argmax(1)


class RankingObjective(nn.Module):
    """Backbone + score head. `forward` is the summed listwise loss of a batch; `scores` the [B, K] scores."""

    def __init__(self, model, head: ScoreHead, loss: str = "ce", tau: float = 0.1, share_prefix: bool = True,
                 chunk: int | None = None, pad_id: int = 0):
        super().__init__()
        self.model, self.head = model, head
        self.loss, self.tau, self.share_prefix, self.chunk, self.pad_id = loss, tau, share_prefix, chunk, pad_id
        self.padding_side = "right"  # of the flattened forward

    # -- pooled hidden states of the candidate rows -------------------------------------------------------------
    def _pooled_flat(self, prefix_ids, prefix_mask, cand_ids, cand_mask, rows_q, rows_k):
        decoder, _ = decoder_and_head(self.model)
        out = []
        step = self.chunk or len(rows_q)
        for s in range(0, len(rows_q), step):
            ids, mask = flat_sequences(prefix_ids, prefix_mask, cand_ids, cand_mask, rows_q[s : s + step],
                                       rows_k[s : s + step], self.pad_id, self.padding_side)
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                             use_cache=False).last_hidden_state
            out.append(hidden[torch.arange(len(ids), device=ids.device), last_real(mask)])
        return torch.cat(out)

    def _pooled_shared(self, prefix_ids, prefix_mask, cand_ids, cand_mask, rows_q, rows_k):
        lm = unwrap_peft(self.model)
        prefix_cache = plain_kv_cache(lm.config)
        if prefix_cache is None or _activation_checkpointing(self.model):
            return None
        decoder, _ = decoder_and_head(self.model)
        # right-padded prefixes: every query row sees at least the first token, so nothing is fully masked
        decoder(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions_from_mask(prefix_mask),
                past_key_values=prefix_cache, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        plen = prefix_mask.sum(1)
        out = []
        step = self.chunk or len(rows_q)
        for s in range(0, len(rows_q), step):
            q, k = rows_q[s : s + step], rows_k[s : s + step]
            cache = plain_kv_cache(lm.config)
            for layer, (keys, values) in zip(cache.layers, kv):
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys.index_select(0, q), values.index_select(0, q)
            ids, cmask = cand_ids[q, k], cand_mask[q, k]
            mask = torch.cat([prefix_mask.index_select(0, q), cmask], dim=1)
            positions = plen.index_select(0, q)[:, None] + torch.arange(ids.shape[1], device=ids.device)[None]
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True).last_hidden_state
            out.append(hidden[torch.arange(len(ids), device=ids.device), cmask.sum(1) - 1])
        return torch.cat(out)

    def candidate_scores(self, prefix_ids, prefix_mask, cand_ids, cand_mask, cand_valid, shared: bool | None = None):
        """[B, K] float scores, -inf in padded candidate slots."""
        if self.head.training != self.model.training:  # the engine switches the backbone; the head follows
            self.head.train(self.model.training)
        rows_q, rows_k = cand_valid.nonzero(as_tuple=True)
        use_shared = self.share_prefix if shared is None else shared
        pooled = None
        if use_shared:
            pooled = self._pooled_shared(prefix_ids, prefix_mask, cand_ids, cand_mask, rows_q, rows_k)
        if pooled is None:
            pooled = self._pooled_flat(prefix_ids, prefix_mask, cand_ids, cand_mask, rows_q, rows_k)
        weight = self.head.net[0].weight
        values = self.head(pooled.to(weight.dtype)).float()
        scores = torch.full(cand_valid.shape, float("-inf"), device=values.device, dtype=values.dtype)
        return scores.index_put((rows_q, rows_k), values)

    @torch.no_grad()
    def scores(self, prefix_ids, prefix_mask, cand_ids, cand_mask, cand_valid, **_):
        return self.candidate_scores(prefix_ids, prefix_mask, cand_ids, cand_mask, cand_valid)

    def forward(self, prefix_ids, prefix_mask, cand_ids, cand_mask, cand_valid, rewards):
        scores = self.candidate_scores(prefix_ids, prefix_mask, cand_ids, cand_mask, cand_valid)
        return listwise_loss(scores, rewards, cand_valid, self.loss, self.tau)


def listwise_loss(scores, rewards, valid, kind: str = "ce", tau: float = 0.1) -> torch.Tensor:
    """Summed over questions: ce (cross-entropy to the first best-reward candidate), multi_positive (-log of the
    probability mass on all candidates tied at the best reward) or listnet (cross-entropy to softmax(reward / tau))."""
    neg = float("-inf")
    rewards = rewards.float().masked_fill(~valid, neg)
    log_p = torch.log_softmax(scores, dim=1)
    if kind == "ce":
        return F.nll_loss(log_p, rewards.argmax(1), reduction="sum")
    if kind == "multi_positive":
        best = valid & (rewards >= rewards.max(1, keepdim=True).values - 1e-9)
        return -torch.logsumexp(log_p.masked_fill(~best, neg), dim=1).sum()
    target = torch.softmax(rewards / tau, dim=1)
    return -torch.where(valid, target * log_p, torch.zeros_like(log_p)).sum()


def hidden_size_of(model) -> int:
    return int(unwrap_peft(model).get_input_embeddings().weight.shape[1])


def build_objective(model, cfg, pad_id: int) -> RankingObjective:
    lm = unwrap_peft(model)
    out_emb, in_emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if out_emb is not None and out_emb.weight is not in_emb.weight:
        out_emb.weight.requires_grad_(False)  # never computed: nothing to train there
    head = ScoreHead(hidden_size_of(model), cfg.rank_head_hidden, cfg.rank_head_dropout)
    head.to(in_emb.weight.device)
    return RankingObjective(model, head, cfg.rank_loss, cfg.listnet_tau, cfg.share_question_prefix,
                            cfg.candidate_chunk, pad_id)


def save_head(head: nn.Module, directory, cfg=None):
    import json
    from pathlib import Path

    from app.lm.heads import save_head_file

    meta = {} if cfg is None else {"rank_head_hidden": json.dumps(cfg.rank_head_hidden)}
    return save_head_file(head, Path(directory) / HEAD_FILE, meta)


def load_head(head: nn.Module, directory) -> None:
    """Load score_head.safetensors into `head`: keys and shapes must be exactly the head's."""
    from pathlib import Path

    from app.lm.heads import load_head_file

    load_head_file(head, Path(directory) / HEAD_FILE, "ranking", "rank_head_hidden")
