"""Task `lookahead`: a from-scratch MiniGPT or ConfidenceAwareGPT on a character-level corpus, one engine run each.

Training sequences are windows of `context_length + 2` characters of the corpus at random offsets: the train rows are
`corpus.window_sources` and `train_window` has the engine's data plan cut each drawn row at an offset seeded by
(seed, epoch, step), so a resumed run reads the same windows. Dev rows are fixed non-overlapping chunks of the last
`corpus_dev_fraction` of the text. The tokenizer is byte-level, built in-repo (256 byte tokens and `<pad>`), so a
window is `context_length + 2` tokens. Weight decay applies to matrices only (`model.decay_groups`).

Losses (app.tasks.lookahead.step):
  plain                     {"lm"}: cross-entropy at all L positions
  confidence, variant fair  {"lm", "confidence"}: LM at all L positions + the lookahead MSE at all L positions
  confidence, variant seed  {"lm", "confidence"}: the seed's step exactly (last position only), pass 2 cached
`loss_weights` gives "confidence" the weight `confidence_alpha`. ConfidenceAwareGPT's confidence inputs carry over
from step to step (prev_conf, the seed's definition); they are saved beside the weights (`lookahead_state.
safetensors`) so a resumed run continues exactly. `confidence_inputs="causal"` feeds pass 1 the model's own causal
predictions instead (as at evaluation; one more forward pass without gradient).

Checkpoint: `model.safetensors` (safetensors.torch), `config.json` (the model shape), the tokenizer.
Metrics (`evaluate`, computed the same way for both models): `perplexity` and `eval_lm_loss` at all positions of the
dev chunks; for ConfidenceAwareGPT also `confidence_mae` and `confidence_spearman` of predicted against actual
future loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from app.config import Config
from app.data import Row
from app.errors import UserError
from app.lm.kind import ModelKind
from app.modelcard import CardText
from app.tasks.lookahead import corpus, step
from app.tasks.lookahead.model import GPT, decay_groups, shapes
from app.tasks.protocol import EvalContext, Feature, Task

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "lookahead_state.safetensors"
PAD = "<pad>"


def build_tokenizer():
    """Byte-level tokenizer: the 256 byte symbols (ids 0..255 in byte order) and `<pad>` (256); no BOS/EOS."""
    alphabet = _byte_symbols()
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, model_max_length=1 << 20)


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable symbol map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def model_shape(cfg: Config, vocab_size: int):
    try:
        return shapes(vocab_size, cfg.context_length + 1, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.mlp_ratio,
                      cfg.confidence_init_bias)[cfg.lookahead_model]
    except ValueError as err:
        raise UserError(str(err)) from None


class LookaheadObjective(nn.Module):
    """forward(input_ids) -> {"lm": sum[, "confidence": sum]}; keeps prev_conf between steps (train mode only)."""

    def __init__(self, model: GPT, variant: str, inputs: str = "carried"):
        super().__init__()
        self.model = model
        self.variant = variant
        self.inputs = inputs
        self.register_buffer("prev_conf", torch.zeros(0, 0), persistent=False)

    def forward(self, input_ids, **_):
        if not self.model.shape.confidence:
            return {"lm": step.plain_step(self.model, input_ids).lm_sum}
        if not self.training:
            return self._eval(input_ids)
        B, L = input_ids.size(0), input_ids.size(1) - 2
        if self.inputs == "causal":
            prev = step.causal_confidence(self.model, input_ids[:, :L])
        else:
            prev = step.fit_prev_conf(self.prev_conf if self.prev_conf.numel() else None, (B, L), input_ids.device)
        if self.variant == "seed":
            out = step.seed_step(self.model, input_ids, prev, cached=True)
        else:
            out = step.all_position_step(self.model, input_ids, prev)
        self.prev_conf = out.prev_conf
        return {"lm": out.lm_sum, "confidence": out.confidence_sum}

    def _eval(self, input_ids):
        gen = torch.Generator(device=input_ids.device).manual_seed(0)
        r = step.evaluate_batch(self.model, input_ids, gen)
        if self.variant == "seed":
            return {"lm": r["ce"][:, -1].sum(), "confidence": ((r["pred"][:, -1] - r["future"][:, -1]) ** 2).sum()}
        return {"lm": r["ce"].sum(), "confidence": ((r["pred"] - r["future"]) ** 2).sum()}


def dev_tensor(rows: list[Row], tokenizer, cfg: Config) -> torch.Tensor:
    ids = [tokenizer(r.values["text"], add_special_tokens=False).input_ids for r in rows]
    return torch.tensor(ids, dtype=torch.long) if ids else torch.zeros(0, cfg.context_length + 2, dtype=torch.long)


@torch.no_grad()
def evaluate_model(model: GPT, data: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0,
                   keep_pairs: int = 0) -> dict:
    """Perplexity at every position of `data` (N, L + 2), the same for both models; for ConfidenceAwareGPT also the
    MAE and Spearman correlation of predicted vs actual future loss, and up to `keep_pairs` (pred, actual) pairs."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ce_sum, count, preds, futures = 0.0, 0, [], []
    for i in range(0, data.size(0), batch_size):
        r = step.evaluate_batch(model, data[i : i + batch_size].to(device), gen, shuffle=shuffle)
        ce_sum += float(r["ce"].sum())
        count += r["ce"].numel()
        if "pred" in r:
            preds.append(r["pred"].flatten().cpu())
            futures.append(r["future"].flatten().cpu())
    model.train(was_training)
    loss = ce_sum / max(count, 1)
    out = {"eval_lm_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if preds:
        pred, fut = torch.cat(preds), torch.cat(futures)
        out["confidence_mae"] = float((pred - fut).abs().mean())
        out["confidence_spearman"] = step.spearman(pred.numpy(), fut.numpy())
        out["confidence_pred_mean"] = float(pred.mean())
        out["future_loss_mean"] = float(fut.mean())
        if keep_pairs:
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(pred.numel(), generator=g)[:keep_pairs]
            out["pairs"] = {"predicted": pred[pick].tolist(), "actual": fut[pick].tolist()}
    return out


class ScratchGPT(ModelKind):
    """The from-scratch model kind: MiniGPT or ConfidenceAwareGPT (app.tasks.lookahead.model) of the config's shape,
    the byte-level tokenizer, weights in `model.safetensors` with the shape in `config.json`, each transformer block
    one FSDP2 unit, weight decay on the matrices only (nanoGPT's split)."""

    def load(self, cfg: Config, device: torch.device, weights_dir: Path | None = None):
        tokenizer = build_tokenizer()
        model = GPT(model_shape(cfg, len(tokenizer)))
        model.detach_confidence = not cfg.confidence_trunk_grad
        if weights_dir is not None:
            path = Path(weights_dir) / WEIGHTS_FILE
            if not path.is_file():
                raise UserError(f"{weights_dir}: no {WEIGHTS_FILE} (a lookahead checkpoint holds one)")
            try:
                model.load_state_dict(load_file(str(path)), strict=True)
            except RuntimeError as err:
                raise UserError(f"{path}: weights do not fit this model ({str(err).splitlines()[0]})") from None
        return model.to(device), tokenizer

    def save(self, model, tokenizer, directory: Path) -> None:
        model = getattr(model, "module", model)
        directory = Path(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        (directory / "config.json").write_text(json.dumps({"architecture": "lookahead-gpt", **model.shape.to_dict()},
                                                          indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(str(directory))

    def shard_blocks(self, objective: nn.Module) -> list[nn.Module]:
        return list(objective.model.blocks)

    def param_groups(self, objective: nn.Module, cfg: Config) -> list[dict]:
        return decay_groups(objective, cfg.weight_decay)


class Lookahead(Task):
    name = "lookahead"

    # --- model --------------------------------------------------------------------------------------------------
    def model_kind(self, cfg: Config) -> ScratchGPT:
        return ScratchGPT()

    def objective(self, model, tokenizer, cfg: Config) -> nn.Module:
        return LookaheadObjective(model, cfg.lookahead_variant, cfg.confidence_inputs)

    def save_extra(self, objective: nn.Module, directory: Path, cfg: Config) -> None:
        if objective.model.shape.confidence:
            save_file({"prev_conf": objective.prev_conf.detach().contiguous().cpu()}, str(Path(directory) / STATE_FILE))

    def load_extra(self, objective: nn.Module, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        if objective.model.shape.confidence and path.is_file():
            objective.prev_conf = load_file(str(path))["prev_conf"].to(objective.prev_conf.device)

    def loss_weights(self, cfg: Config) -> dict[str, float]:
        return {"confidence": cfg.confidence_alpha}

    # --- data ---------------------------------------------------------------------------------------------------
    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        need = cfg.context_length + 2
        if cfg.max_seq_length < need:
            raise UserError(f"max_seq_length={cfg.max_seq_length} < context_length + 2 = {need}")
        text = corpus.read_corpus(cfg.corpus_file, cfg.corpus_chars)
        train, dev = corpus.split_text(text, cfg.corpus_dev_fraction)
        pieces = corpus.window_sources(train, need) if split == "train" else corpus.chunks(dev, need)
        if split == "train" and not pieces:
            raise UserError(f"{cfg.corpus_file}: no training chunk of {need} characters")
        return [Row(i + 1, {"text": t}) for i, t in enumerate(pieces)]

    def train_window(self, cfg: Config) -> int:
        return cfg.context_length + 2

    def encode(self, row: Row, tokenizer, cfg: Config) -> Feature:
        ids = tokenizer(row.values["text"], add_special_tokens=False).input_ids
        if len(ids) < cfg.context_length + 2:
            raise UserError(f"{cfg.corpus_file}: chunk {row.line}: {len(ids)} tokens, expected at least "
                            f"{cfg.context_length + 2}")
        L = cfg.context_length
        if cfg.lookahead_model == "plain":
            items = {"lm": L}
        elif cfg.lookahead_variant == "seed":
            items = {"lm": 1, "confidence": 1}
        else:
            items = {"lm": L, "confidence": L}
        return Feature(ids, ids, row.line, {"items": items})

    def loss_items(self, feature: Feature) -> dict[str, int]:
        return dict(feature.extra["items"])

    def collate(self, features: list[Feature], pad_id: int) -> dict:
        return {"input_ids": torch.tensor([f.input_ids for f in features], dtype=torch.long)}

    # --- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, cfg: Config, rows: list[Row], ctx: EvalContext) -> dict[str, float]:
        data = dev_tensor(rows, tokenizer, cfg)
        if not len(data):
            return {}
        out = evaluate_model(getattr(model, "module", model), data, cfg.eval_batch_size)
        return {k: v for k, v in out.items() if k in ("perplexity", "eval_lm_loss", "confidence_mae",
                                                       "confidence_spearman")}

    # --- model card ---------------------------------------------------------------------------------------------
    def model_card(self, cfg: Config) -> CardText:
        model = "ConfidenceAwareGPT" if cfg.lookahead_model == "confidence" else "MiniGPT"
        summary = (f"Character-level language model ({model}, the `lookahead` experiment): it predicts the next byte "
                   "of the text." + (" It also predicts, at each position, its own loss two tokens ahead (a "
                                     "confidence scalar that conditions its norms)." if model != "MiniGPT" else ""))
        load = ("The weights are this project's own model (`model.safetensors`, its shape in `config.json`), not a "
                "transformers architecture; load them with finetune-runner:\n\n```python\nfrom pathlib import Path\n"
                "\nimport torch\n\nfrom app.config import saved_config\nfrom app.tasks.lookahead.task import ScratchGPT\n"
                "\ncheckpoint = Path(\"CHECKPOINT\")\ncfg = saved_config(checkpoint / \"run_config.json\")\n"
                "model, tokenizer = ScratchGPT().load(cfg, torch.device(\"cpu\"), checkpoint)\n```\n")
        return CardText(
            summary=summary, pipeline_tag="text-generation",
            from_scratch=f"a {model} (n_layer {cfg.n_layer}, d_model {cfg.d_model}, context {cfg.context_length} "
                         "bytes)", how_to_load=load,
            recipe_fields=("task", "lookahead_model", "lookahead_variant", "confidence_alpha", "context_length",
                           "n_layer", "n_head", "d_model", "mlp_ratio", "corpus_chars", "dtype", "batch_size",
                           "micro_batch_size", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps",
                           "weight_decay", "max_grad_norm", "seed", "metric_for_best"),
            data_fields=("corpus_file",))
