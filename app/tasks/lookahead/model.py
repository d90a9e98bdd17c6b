"""MiniGPT and ConfidenceAwareGPT: small decoders trained from scratch, with a key/value cache for appended tokens.

MiniGPT: token + position embeddings, blocks of LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP ->
residual, a final LayerNorm and an LM head tied to the token embedding (the head is `F.linear` on the embedding
matrix, so the state dict holds no shared tensors and saves as safetensors as it is).

ConfidenceAwareGPT: the same, with each block's two LayerNorms replaced by `AdaptiveNorm`: LayerNorm without affine
parameters, then `x * (1 + scale) + shift` with (scale, shift) = Linear(1, 2 * d_model) of the position's confidence
scalar. That Linear starts at zero, so the model starts as a standard transformer (LayerNorm weight 1, bias 0), and
with zero confidence it always equals a MiniGPT whose LayerNorm weight is 1 + bias_scale and bias is bias_shift
(`plain_state_dict`). A `confidence_predictor` head (Linear(d_model, 1), bias `confidence_init_bias`) reads the final
normed hidden state and predicts, per position, the loss the model will have one step further on (its gradient
reaches the trunk as in the seed's definition, unless `detach_confidence` is set: then it trains the head only).

Initialisation (GPT-2's, as nanoGPT): weights N(0, 0.02), biases zero, and the two projections that write into the
residual stream (attention `proj`, MLP `out`) N(0, 0.02 / sqrt(2 * n_layer)), so the residual's variance does not
grow with depth. `decay_groups` gives weight decay to matrices only (embeddings and Linear weights), not to biases and
LayerNorms.

`extend` runs only appended tokens on top of cached keys/values of a sequence the model already ran, each appended
token at its own position and with its own attention mask over the cache: the cheap pass 2 of the lookahead step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTShape:
    vocab_size: int
    block_size: int  # positions (pass 2 needs context_length + 1)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512
    confidence: bool = False
    confidence_init_bias: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)


class AdaptiveNorm(nn.Module):
    """LayerNorm without affine parameters, scaled and shifted by a Linear(1, 2 * dim) of a per-position scalar."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(1, 2 * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(c.unsqueeze(-1).to(x.dtype)).chunk(2, dim=-1)
        return F.layer_norm(x, (self.dim,)) * (1 + scale) + shift


class PlainNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        norm = AdaptiveNorm if s.confidence else PlainNorm
        self.n_head = s.n_head
        self.ln1, self.ln2 = norm(s.d_model), norm(s.d_model)
        self.qkv = nn.Linear(s.d_model, 3 * s.d_model)
        self.proj = nn.Linear(s.d_model, s.d_model)
        self.fc = nn.Linear(s.d_model, s.d_mlp)
        self.out = nn.Linear(s.d_mlp, s.d_model)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.n_head, d // self.n_head).transpose(1, 2)

    def forward(self, x, c, cache=None, mask=None):
        """x (B, T, D); c (B, T) or None; cache: (k, v) of earlier positions (B, H, S, d) for appended tokens, with
        `mask` (T, S + T) bool (True = attend). Returns (x, (k, v)) with this call's own keys/values."""
        q, k, v = self.qkv(self.ln1(x, c)).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2),
                                               attn_mask=mask)
        b, h, n, d = a.shape
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, h * d))
        x = x + self.out(F.gelu(self.fc(self.ln2(x, c))))
        return x, (k, v)


class GPT(nn.Module):
    """MiniGPT (shape.confidence False) or ConfidenceAwareGPT (True)."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.shape = shape
        s = shape
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.d_model)
        self.apply(self._init)
        for b in self.blocks:
            for residual in (b.proj, b.out):
                nn.init.normal_(residual.weight, std=residual_init_std(s.n_layer))
        self.confidence_predictor = None
        self.detach_confidence = False  # set by the task (confidence_trunk_grad=False); holds no weights
        if s.confidence:
            for b in self.blocks:  # _init touched the adaptive projections: back to zero
                for norm in (b.ln1, b.ln2):
                    nn.init.zeros_(norm.proj.weight)
                    nn.init.zeros_(norm.proj.bias)
            self.confidence_predictor = nn.Linear(s.d_model, 1)
            nn.init.normal_(self.confidence_predictor.weight, std=0.02)
            nn.init.constant_(self.confidence_predictor.bias, s.confidence_init_bias)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def _conf(self, idx, confidence_scalars):
        if not self.shape.confidence:
            return None
        if confidence_scalars is None:
            return torch.zeros(idx.shape, device=idx.device)
        return confidence_scalars

    def _head(self, x, last_logits_only: bool = False):
        h = self.ln_f(x)
        logits = F.linear(h[:, -1:] if last_logits_only else h, self.tok_emb.weight)
        conf = None
        if self.confidence_predictor is not None:  # detach_confidence: the MSE trains the head only, not the trunk
            conf = self.confidence_predictor(h.detach() if self.detach_confidence else h).squeeze(-1)
        return logits, conf

    def forward(self, idx, confidence_scalars=None, return_cache: bool = False, last_logits_only: bool = False):
        """idx (B, T) -> (logits (B, T, V), confidence_pred (B, T) or None[, cache: one (k, v) per block]);
        `last_logits_only`: logits (B, 1, V) of the last position only (confidence_pred stays per position)."""
        c = self._conf(idx, confidence_scalars)
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        cache = []
        for block in self.blocks:
            x, kv = block(x, c)
            cache.append(kv)
        logits, conf = self._head(x, last_logits_only)
        return (logits, conf, cache) if return_cache else (logits, conf)

    def extend(self, idx, positions, cache, mask, confidence_scalars=None):
        """Appended tokens idx (B, M) at `positions` (M,), attending to the cached keys/values (S positions) and to
        themselves as `mask` (M, S + M) says. Returns (logits (B, M, V), confidence_pred (B, M) or None)."""
        c = self._conf(idx, confidence_scalars)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block, kv in zip(self.blocks, cache):
            x, _ = block(x, c, kv, mask)
        return self._head(x)


def residual_init_std(n_layer: int) -> float:
    """Initial std of the projections into the residual stream: 2 * n_layer of them add up along the depth."""
    return 0.02 / math.sqrt(2 * n_layer)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: the matrices (parameters of 2 or more dimensions) with `weight_decay`, the rest (biases,
    LayerNorm weights) without; trainable parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def plain_mlp_width(n_layer: int, d_model: int, mlp_ratio: int) -> int:
    """MLP width of the plain model whose parameter count is closest to ConfidenceAwareGPT's (d_mlp = ratio x d).

    ConfidenceAwareGPT has, per block, two Linear(1, 2d) (4d parameters each) instead of two LayerNorms (2d each),
    plus the confidence_predictor (d + 1); one more MLP unit costs 2d + 1 parameters per block."""
    extra = n_layer * 2 * (4 * d_model - 2 * d_model) + d_model + 1
    return mlp_ratio * d_model + round(extra / (n_layer * (2 * d_model + 1)))


def shapes(vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int, mlp_ratio: int,
           init_bias: float = 2.0) -> dict[str, GPTShape]:
    """{"plain": MiniGPT's shape, "confidence": ConfidenceAwareGPT's}, parameter counts matched."""
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} is not a multiple of n_head={n_head}")
    common = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, d_model=d_model)
    return {"plain": GPTShape(**common, d_mlp=plain_mlp_width(n_layer, d_model, mlp_ratio)),
            "confidence": GPTShape(**common, d_mlp=mlp_ratio * d_model, confidence=True,
                                   confidence_init_bias=init_bias)}


def parameter_breakdown(model: GPT) -> dict[str, int]:
    """Parameters by part: embeddings, attention, mlp, norms (incl. adaptive), confidence_predictor, total."""
    parts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "confidence_predictor": 0}
    for name, p in model.named_parameters():
        if name.startswith(("tok_emb", "pos_emb")):
            key = "embeddings"
        elif ".qkv." in name or ".proj." in name and ".ln" not in name:
            key = "attention"
        elif ".fc." in name or ".out." in name:
            key = "mlp"
        elif name.startswith("confidence_predictor"):
            key = "confidence_predictor"
        else:
            key = "norms"
        parts[key] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def plain_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The MiniGPT state dict (same d_mlp) that computes what `model` (ConfidenceAwareGPT) computes at zero
    confidence: each adaptive norm becomes a LayerNorm with weight 1 + bias_scale and bias bias_shift."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("confidence_predictor"):
            continue
        if name.endswith(".proj.bias") and ".ln" in name:
            scale, shift = t.chunk(2)
            base = name[: -len(".proj.bias")]
            out[f"{base}.weight"], out[f"{base}.bias"] = 1 + scale, shift
        elif name.endswith(".proj.weight") and ".ln" in name:
            continue
        else:
            out[name] = t
    return out
