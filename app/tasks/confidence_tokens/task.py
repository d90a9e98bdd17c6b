"""Confidence tokens: the model answers a question, then appends `<C_…>` (its answer is correct) or `<U_…>` (it is not).

Domains are config: `confidence_tokens = {"boolq": ["<C_READ>", "<U_READ>"], "medqa": ["<C_MED>", "<U_MED>"]}`
maps each dataset to its (confident, unconfident) pair; every token is added as a special token.

Data
----
Training JSONL/CSV rows: `question` (the text shown to the model: passage or options included), `tagged_response`
(the answer followed by exactly one of its dataset's two tokens, last: `"Yes <C_READ>"`) and `dataset`.
`python -m app tag` writes such rows from raw QA data and a model (app/tag.py).

Raw QA rows (validation, and the input of `tag`), per dataset:
  yes/no (BoolQ):        question, answer (true/false, yes/no or 0/1), optional passage
  multiple choice (MedQA): question, options ({"A": text, ...}, a list, or columns A, B, ...), answer or answer_idx
                           (the letter, or exactly one option's text)
A row with options (or columns A and B) is multiple choice; any other row is yes/no.

Training
--------
A feature is prompt + answer + token; only the token is a target (the answer tokens are context). The objective
runs the decoder, gathers the final hidden state just before each token and projects only those rows through the LM
head (`confidence_loss = "full_vocab"`: cross-entropy over the vocabulary; `"pair"`: over the domain's two tokens).
Full-sequence logits are never built. With LoRA the rows of the new tokens in both the input embeddings and the LM
head are trainable token rows (peft `trainable_token_indices`), so the adapter checkpoint carries them; they start
at the mean of the existing rows.

Validation (each evaluation, per dataset and averaged over datasets)
--------------------------------------------------------------------
Greedy generation of the answer (stopping at EOS or any confidence token; the first new token is neither, since an
answer comes first), answer parsing (yes/no; option letter), correctness against the gold answer, the expected token
(C if correct, else U). The token position is the position right after the generated answer; one extra forward pass
over prompt + answer gives the distribution there: `p_confident = p(C) / (p(C) + p(U))`. The predicted token is the
token the model generated there (`full_vocab`; none generated counts as wrong) or the likelier of the two (`pair`:
the model only learned to rank C against U, not when to emit one, so the answer is generated without the tokens). Metrics: `token_accuracy` (predicted == expected), `answer_accuracy`,
`token_emitted`, `p_confident`, `token_nll`, the calibration report of app/calibration.py (`calibration_error` is
`calibration_metric`), `majority_baseline`; `dev_loss` (engine) is teacher-forced: gold answer + C on odd lines,
a wrong answer + U on even lines. Each evaluation writes `reliability_epoch_N.json` + `.png` under out_dir when it
falls on the end of epoch N (else `reliability_step_S.*`; with several datasets also one PNG per dataset) and prints
a per-dataset table. Checkpoints `best_accuracy/` (token_accuracy) and `best_calibration/` (calibration_error).

`hub_repo` pushes the final adapter and tokenizer to the Hugging Face Hub (token from HF_TOKEN in the environment).

Sample data: `python -m app.tasks.confidence_tokens.task data/sample/confidence` (deterministic; see `write_sample`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from app.config import Config
from app.data import Row, read_rows
from app.errors import UserError
from app.tasks.protocol import Feature, Task

log = logging.getLogger(__name__)

YES_NO = "yes_no"
CHOICE = "choice"
_LETTERS = "ABCDEFGHIJ"
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


# --- domains -------------------------------------------------------------------------------------------------------
def domain_tokens(cfg: Config) -> dict[str, tuple[str, str]]:
    """dataset -> (confident, unconfident), checked: two distinct tokens each, no token both C and U."""
    if not cfg.confidence_tokens:
        raise UserError("confidence_tokens: no datasets configured (dataset -> [confident token, unconfident token])")
    pairs, role = {}, {}
    for name, pair in cfg.confidence_tokens.items():
        if len(pair) != 2 or not all(t.strip() for t in pair) or pair[0] == pair[1]:
            raise UserError(f"confidence_tokens[{name!r}]: need two distinct non-empty tokens [confident, unconfident], "
                            f"found {pair!r}")
        for token, kind in zip(pair, "CU"):
            if role.setdefault(token, kind) != kind:
                raise UserError(f"confidence_tokens: {token!r} is a confident token in one dataset and an unconfident "
                                "token in another")
        pairs[name] = (pair[0], pair[1])
    return pairs


def all_tokens(cfg: Config) -> list[str]:
    return list(dict.fromkeys(t for pair in domain_tokens(cfg).values() for t in pair))


# --- raw questions -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QA:
    """One raw question, normalised."""

    dataset: str
    kind: str  # YES_NO or CHOICE
    text: str  # the question text shown to the model (passage / options included)
    gold: str  # "yes" / "no", or an option letter
    options: dict = field(default_factory=dict)  # letter -> option text (CHOICE)
    line: int = 0


def _bool_answer(value, path, line) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and value in (0, 1):
        return "yes" if value else "no"
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return "yes" if value.strip().lower() in _TRUE else "no"
    raise UserError(f"{path}:{line}: answer must be true or false (or yes/no, 1/0), found {value!r}")


def _options(values: dict, path, line) -> dict[str, str]:
    raw = values.get("options")
    if raw is None:
        raw = {k: values[k] for k in _LETTERS if k in values and values[k] not in (None, "")}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{line}: options must be an object {{\"A\": text, ...}} or a list, "
                            f"found {raw[:60]!r}") from None
    if isinstance(raw, list):
        if len(raw) > len(_LETTERS):
            raise UserError(f"{path}:{line}: {len(raw)} options; at most {len(_LETTERS)} are supported")
        raw = dict(zip(_LETTERS, raw))
    if not isinstance(raw, dict):
        raise UserError(f"{path}:{line}: options must be an object {{\"A\": text, ...}} or a list, found {raw!r}")
    options = {}
    for key, text in raw.items():
        letter = str(key).strip().upper()
        if len(letter) != 1 or letter not in _LETTERS:
            raise UserError(f"{path}:{line}: option key {key!r} is not a letter A-{_LETTERS[-1]}")
        if not isinstance(text, (str, int, float)) or not str(text).strip():
            raise UserError(f"{path}:{line}: option {letter} must be non-empty text, found {text!r}")
        options[letter] = str(text).strip()
    if len(options) < 2:
        raise UserError(f"{path}:{line}: a multiple-choice question needs at least two options, found {len(options)}")
    return dict(sorted(options.items()))


def _letter_answer(values: dict, options: dict, path, line) -> str:
    value = values.get("answer_idx", values.get("answer"))
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}:{line}: answer must be an option letter ({', '.join(options)}), found {value!r}")
    text = value.strip()
    m = re.fullmatch(r"[\(\[]?([A-Ja-j])[\)\].]?", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    same = [k for k, v in options.items() if v.lower() == text.lower()]
    if len(same) == 1:
        return same[0]
    raise UserError(f"{path}:{line}: answer {value!r} is not one of the option letters {', '.join(options)} "
                    "(nor exactly one option's text)")


def yes_no_text(question: str, passage: str | None) -> str:
    q = question.strip()
    q = q[0].upper() + q[1:] if q else q
    if not q.endswith("?"):
        q += "?"
    head = f"{passage.strip()}\n\n" if passage and passage.strip() else ""
    return f"{head}Question: {q} Answer yes or no."


def choice_text(question: str, options: dict[str, str]) -> str:
    lines = [question.strip(), *(f"{k}. {v}" for k, v in options.items())]
    return "\n".join(lines) + "\nAnswer with the letter of the correct option."


def read_raw_qa(path, dataset: str | None, pairs: dict, limit: int | None = None) -> list[tuple[Row, str, object]]:
    """(row, dataset, parsed QA) for each raw row of a file; the dataset is `dataset`, else the row's column, and
    must have tokens in `pairs`. UserError naming file and line for anything unusable."""
    rows = read_rows(path, () if dataset else ("dataset",))
    out = []
    for row in rows[:limit]:
        name = dataset or row.values.get("dataset")
        if name not in pairs:
            raise UserError(f"{path}:{row.line}: dataset {name!r} has no tokens in confidence_tokens "
                            f"(known: {', '.join(pairs)})")
        out.append((row, name, raw_qa(row.values, name, path, row.line)))
    return out


def raw_qa(values: dict, dataset: str, path, line: int) -> QA:
    """Normalise one raw QA row; UserError naming file and line when it is not usable."""
    question = values.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{path}:{line}: question must be non-empty text, found {question!r}")
    if "options" in values or ("A" in values and "B" in values):
        options = _options(values, path, line)
        gold = _letter_answer(values, options, path, line)
        return QA(dataset, CHOICE, choice_text(question, options), gold, options, line)
    if "answer" not in values:
        raise UserError(f"{path}:{line}: missing answer (true/false for a yes/no question; add options for a "
                        "multiple-choice one)")
    passage = values.get("passage")
    if passage is not None and not isinstance(passage, str):
        raise UserError(f"{path}:{line}: passage must be text, found {passage!r}")
    return QA(dataset, YES_NO, yes_no_text(question, passage), _bool_answer(values["answer"], path, line), {}, line)


# --- answer parsing ------------------------------------------------------------------------------------------------
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|<pad>|<unk>|<eos>|<[CU]_[A-Za-z0-9_]+>")
_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> str | None:
    """'yes' / 'no' from the first yes/no/true/false word of a generation, else None."""
    m = _YES_NO.search(_SPECIAL.sub(" ", text or ""))
    if not m:
        return None
    return "yes" if m.group(1).lower() in ("yes", "true") else "no"


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a generation chose ("C", "(C)", "C.", "The answer is C", or exactly one option's text)."""
    text = _SPECIAL.sub(" ", text or "").strip()
    if not text or not options:
        return None
    letters = "".join(options)
    cls = f"[{letters}]"
    patterns = [
        rf"\b(?i:answer|option|choice)\b(?:\s+(?i:is|would be|:))?\s*:?\s*(?i:option\s+)?[\(\[]?({cls})[\)\]]?(?![A-Za-z])",
        rf"^[*_\s]*[\(\[]?({cls})[\)\]]?[*_]*(?:[.:)]|\s*$|\s+[-–:])",
        rf"[\(\[]({cls})[\)\]]",
        rf"(?<![A-Za-z])({cls})[.)](?=\s|$)",
    ]
    for pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    low = text.lower()
    found = [k for k, v in options.items() if re.search(rf"(?<!\w){re.escape(v.lower())}(?!\w)", low)]
    return found[0] if len(found) == 1 else None


def parse_answer(qa: QA, text: str) -> str | None:
    return parse_yes_no(text) if qa.kind == YES_NO else parse_choice(text, qa.options)


def answer_text(qa: QA, answer: str) -> str:
    """How a normalised answer is written ("Yes", "No", "C")."""
    return answer.capitalize() if qa.kind == YES_NO else answer


def wrong_answer(qa: QA) -> str:
    if qa.kind == YES_NO:
        return "no" if qa.gold == "yes" else "yes"
    letters = list(qa.options)
    return letters[(letters.index(qa.gold) + 1) % len(letters)]


# --- prompts -------------------------------------------------------------------------------------------------------
def build_prompt(text: str, tokenizer, cfg: Config) -> tuple[str, bool]:
    """(prompt, add_special_tokens) for a question text."""
    if cfg.confidence_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("confidence_chat_template=True but the tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, False  # the template writes its own BOS where the model wants one
    return cfg.confidence_prompt.replace("{question}", text), True


def prompt_ids(text: str, tokenizer, cfg: Config) -> list[int]:
    prompt, special = build_prompt(text, tokenizer, cfg)
    return tokenizer(prompt, add_special_tokens=special).input_ids


def answer_ids(answer: str, tokenizer, cfg: Config) -> list[int]:
    """Answer tokens after the prompt: a space first unless the prompt ends in whitespace (chat templates do)."""
    answer = answer.strip()
    if not answer:
        return []
    ends_in_space = cfg.confidence_chat_template or cfg.confidence_prompt.replace("{question}", "x")[-1:].isspace()
    return tokenizer(("" if ends_in_space else " ") + answer, add_special_tokens=False).input_ids


def fit_prompt(ids: list[int], limit: int) -> list[int]:
    """Keep the first token (BOS) and the tail (question, instruction) when a prompt is longer than `limit`."""
    if len(ids) <= limit or limit < 2:
        return ids
    return ids[:1] + ids[len(ids) - (limit - 1):]


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


# --- generation and scoring ------------------------------------------------------------------------------------------
class _Suppress:
    """Logits processor: `always` never generated; `first` not as the first new token (an answer is not empty)."""

    def __init__(self, width: int, always: list[int], first: list[int]):
        self.width, self.always, self.first = width, list(always), list(first)

    def __call__(self, input_ids, scores):
        ids = self.always + (self.first if input_ids.shape[1] == self.width else [])
        if ids:
            scores[:, ids] = float("-inf")
        return scores


def _generate_ids(model, batch: list[list[int]], pad_id: int, stop_ids: list[int], max_new_tokens: int, device,
                  never: list[int] = (), not_first: list[int] = ()):
    from transformers import LogitsProcessorList

    from app.lm.generate import left_padded

    ids, mask = left_padded(batch, pad_id, device)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                         eos_token_id=list(stop_ids),
                         logits_processor=LogitsProcessorList([_Suppress(width, never, not_first)]))
    stops = set(stop_ids)
    result = []
    for row in out[:, width:].tolist():
        end = next((k for k, t in enumerate(row) if t in stops), None)
        result.append(row if end is None else row[: end + 1])
    return result


@torch.no_grad()
def generate_continuations(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int, device,
                           stop_ids: list[int], never: list[int] = ()) -> list[list[int]]:
    """Greedy continuations (token ids, cut after the first stop id) in input order; length-sorted left-padded
    batches as in app.lm.generate, stopping at EOS or any of `stop_ids` (the confidence tokens). The first new token is
    never EOS or a stop id (an answer comes first); `never` are not generated at all."""
    from app.lm.generate import length_sorted_batches, split_on_oom

    stops = list(dict.fromkeys([tokenizer.eos_token_id, *stop_ids]))
    model.eval()
    result: list[list[int]] = [[] for _ in prompts]
    for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
        outs = split_on_oom(lambda part: _generate_ids(model, part, tokenizer.pad_token_id, stops, max_new_tokens,
                                                       device, list(never), [t for t in stops if t not in never]),
                            [prompts[i] for i in batch])
        for i, ids in zip(batch, outs):
            result[i] = ids
    return result


@torch.no_grad()
def token_position_logits(model, contexts: list[list[int]], pad_id: int, batch_size: int, device,
                          pairs: list[tuple[int, int]]) -> list[tuple[float, float, float]]:
    """(logit of C, logit of U, log-sum-exp over the vocabulary) at the position after each context."""
    from app.lm.forward import decoder_and_head, last_hidden_states

    _, head = decoder_and_head(model)
    out: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(contexts)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        width = max(len(contexts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(chunk):
            ids[r, : len(contexts[i])] = torch.tensor(contexts[i])
            mask[r, : len(contexts[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = last_hidden_states(model, ids, mask)
        last = mask.sum(1) - 1
        logits = project(head, hidden[torch.arange(len(chunk), device=device), last]).float()
        lse = torch.logsumexp(logits, dim=-1)
        cols = torch.tensor([pairs[i] for i in chunk], device=device)
        pair_logits = logits.gather(1, cols)
        for r, i in enumerate(chunk):
            out[i] = (float(pair_logits[r, 0]), float(pair_logits[r, 1]), float(lse[r]))
    return out


@dataclass
class Judged:
    """One validation row after generation, parsing and scoring."""

    dataset: str
    gold: str
    answer: str | None  # parsed answer, None when unparseable
    text: str  # the generated answer text
    correct: bool
    expected: str  # the token the row should get
    emitted: str | None  # the confidence token the model generated, if any
    predicted: str | None  # emitted (full_vocab) or the likelier of the pair (pair)
    p_confident: float
    nll: float  # -log p(expected token) (over the vocabulary, or over the pair)


def judge(model, tokenizer, cfg: Config, qas: list[QA], device, batch_size: int) -> list[Judged]:
    """Generate answer + token for each question and score the token position."""
    pairs_by_name = domain_tokens(cfg)
    tok_id = {t: tokenizer.convert_tokens_to_ids(t) for t in all_tokens(cfg)}
    id_tok = {i: t for t, i in tok_id.items()}
    limit = max(cfg.max_seq_length - cfg.max_new_tokens, 2)
    prompts = [fit_prompt(prompt_ids(q.text, tokenizer, cfg), limit) for q in qas]
    # pair: the model was only taught to rank C against U, not when to emit one: the answer is generated without the
    # tokens and the pair is read at its end
    never = list(tok_id.values()) if cfg.confidence_loss == "pair" else []
    conts = generate_continuations(model, tokenizer, prompts, batch_size, cfg.max_new_tokens, device,
                                   list(tok_id.values()), never)
    stops = set(tok_id.values()) | {tokenizer.eos_token_id}
    answers = [c[:-1] if c and c[-1] in stops else c for c in conts]
    pairs = [(tok_id[pairs_by_name[q.dataset][0]], tok_id[pairs_by_name[q.dataset][1]]) for q in qas]
    scores = token_position_logits(model, [p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id,
                                   batch_size, device, pairs)
    judged = []
    for q, cont, ans, (lc, lu, lse) in zip(qas, conts, answers, scores):
        c_tok, u_tok = pairs_by_name[q.dataset]
        text = tokenizer.decode(ans, skip_special_tokens=True).strip()
        parsed = parse_answer(q, text)
        correct = parsed is not None and parsed == q.gold
        expected = c_tok if correct else u_tok
        emitted = id_tok.get(cont[-1]) if cont else None
        p_conf = 1.0 / (1.0 + math.exp(min(max(lu - lc, -700.0), 700.0)))
        if cfg.confidence_loss == "pair":
            predicted = c_tok if p_conf >= 0.5 else u_tok
            nll = -math.log(max(p_conf if correct else 1.0 - p_conf, 1e-300))
        else:
            predicted = emitted
            nll = lse - (lc if correct else lu)
        judged.append(Judged(q.dataset, q.gold, parsed, text, correct, expected, emitted, predicted, p_conf, nll))
    return judged


def summarize(judged: list[Judged], cfg: Config) -> tuple[dict, dict]:
    """(metrics of these rows, calibration report of these rows)."""
    from app.metrics.calibration import calibration_report

    n = len(judged)
    correct = [j.correct for j in judged]
    p = [j.p_confident for j in judged]
    report = calibration_report(p, correct, n_bins=cfg.n_bins, calib_beta=cfg.calib_beta)
    acc = sum(correct) / n
    metrics = {
        "n": float(n),
        "answer_accuracy": acc,
        "answer_parse_failures": sum(j.answer is None for j in judged) / n,
        "token_accuracy": sum(j.predicted == j.expected for j in judged) / n,
        "token_emitted": sum(j.emitted is not None for j in judged) / n,
        "majority_baseline": max(acc, 1.0 - acc),
        "p_confident": sum(p) / n,
        "token_nll": sum(j.nll for j in judged) / n,
        "calibration_error": float(report[cfg.calibration_metric]),
        "ece": float(report["ece_l1"]),
        "ce_l2_debiased": float(report["ce_l2_debiased"]),
        "brier": float(report["brier"]),
    }
    return metrics, report


_TABLE = [("n", "n", "{:.0f}"), ("answer_accuracy", "answer acc", "{:.4f}"), ("token_accuracy", "token acc", "{:.4f}"),
          ("majority_baseline", "majority", "{:.4f}"), ("token_emitted", "emitted", "{:.4f}"),
          ("p_confident", "p(C)", "{:.4f}"), ("calibration_error", "calib err", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
          ("brier", "Brier", "{:.4f}"), ("answer_parse_failures", "unparsed", "{:.4f}")]


def format_summary(per_dataset: dict[str, dict], average: dict) -> str:
    rows = [[name] + [fmt.format(m[k]) for k, _, fmt in _TABLE] for name, m in per_dataset.items()]
    rows.append(["average"] + [fmt.format(average[k]) for k, _, fmt in _TABLE])
    head = ["dataset"] + [label for _, label, _ in _TABLE]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    line = lambda r: "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --- the task ------------------------------------------------------------------------------------------------------
class ConfidenceTokens(Task):
    name = "confidence_tokens"
    required_columns = ("question", "tagged_response", "dataset")

    def __init__(self):
        self.cfg: Config | None = None
        self._train_rows: set[int] = set()  # id() of the training rows, to count the features of an epoch
        self._train_features = 0

    # --- model --------------------------------------------------------------------------------------------------
    def added_tokens(self, cfg: Config) -> list[str]:
        return all_tokens(cfg)

    def load_model(self, cfg: Config, device: torch.device, weights_dir: Path | None = None):
        """As Task.load_model, plus: the LM-head rows of the tokens train too (not only the input embeddings), and
        tokens new to the tokenizer start at the mean row even where the embedding matrix has spare rows (Qwen)."""
        from app.lm import modeling

        self.cfg = cfg
        tokens = self.added_tokens(cfg)
        tokenizer = modeling.load_tokenizer(cfg, str(weights_dir) if weights_dir else None)
        new = [t for t in tokens if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        full_ckpt = weights_dir is not None and not modeling.is_adapter_dir(weights_dir)
        model = modeling.load_base_model(cfg, device, path=str(weights_dir) if full_ckpt else None)
        modeling.fit_embeddings(model, tokenizer)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if new and not full_ckpt:
            init_rows(model, tokenizer.convert_tokens_to_ids(new))
        if cfg.finetuning == "full":
            model = modeling.add_adapters(model, cfg)
        else:
            model = add_lora(model, cfg, ids)
        if weights_dir is not None and modeling.is_adapter_dir(weights_dir):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(Path(weights_dir) / "adapter_model.safetensors")))
        return model, tokenizer

    def objective(self, model, cfg: Config | None = None) -> nn.Module:
        cfg = cfg or self.cfg
        return ConfidenceTokenLoss(model, cfg.confidence_loss if cfg is not None else "full_vocab")

    def save_extra(self, objective: nn.Module, directory: Path) -> None:
        """No extra weights. Used as the end-of-training hook: the final checkpoint goes to the Hub if asked."""
        from app.engine import checkpoint as ckpt

        cfg = self.cfg
        if cfg is None or not cfg.hub_repo:
            return
        if Path(directory).resolve() != ckpt.temp_dir(cfg.out_dir, "final").resolve():
            return
        push_to_hub(Path(directory), cfg.hub_repo)

    # --- data -----------------------------------------------------------------------------------------------------
    def _check_cfg(self, cfg: Config) -> None:
        self.cfg = cfg
        domain_tokens(cfg)
        if not cfg.confidence_chat_template and "{question}" not in cfg.confidence_prompt:
            raise UserError(f"confidence_prompt={cfg.confidence_prompt!r}: needs {{question}}")

    def load_rows(self, cfg: Config, split: str) -> list[Row]:
        self._check_cfg(cfg)
        if split == "train":
            if cfg.hub_repo and not hub_token():
                raise UserError(f"hub_repo={cfg.hub_repo!r} needs a Hugging Face token in the environment (HF_TOKEN)")
            rows = self.validate(cfg.train_file, read_rows(cfg.train_file, self.required_columns))
            self._train_rows = {id(r) for r in rows}
            self._train_features = 0
            return rows
        return self.validation_rows(cfg)

    def validation_rows(self, cfg: Config) -> list[Row]:
        """Raw QA rows of every validation dataset, interleaved (so that eval_rows takes some of each)."""
        pairs = domain_tokens(cfg)
        sources: list[tuple[str | None, str]] = [(name, path) for name, path in cfg.validation_files.items()]
        if not sources and cfg.dev_file:
            sources = [(None, cfg.dev_file)]
        per_file = []
        for name, path in sources:
            if name is not None and name not in pairs:
                raise UserError(f"validation_files: dataset {name!r} has no tokens in confidence_tokens "
                                f"(known: {', '.join(pairs)})")
            per_file.append([Row(row.line, {**row.values, "dataset": dataset, "_qa": qa})
                             for row, dataset, qa in read_raw_qa(path, name, pairs)])
        merged = []
        for k in range(max((len(r) for r in per_file), default=0)):
            merged += [rows[k] for rows in per_file if k < len(rows)]
        return merged

    def validate(self, path, rows: list[Row]) -> list[Row]:
        cfg = self.cfg
        pairs = domain_tokens(cfg)
        every = all_tokens(cfg)
        for row in rows:
            v = row.values
            dataset = v.get("dataset")
            if dataset not in pairs:
                raise UserError(f"{path}:{row.line}: dataset {dataset!r} has no tokens in confidence_tokens "
                                f"(known: {', '.join(pairs)})")
            if not isinstance(v.get("question"), str) or not v["question"].strip():
                raise UserError(f"{path}:{row.line}: question must be non-empty text, found {v.get('question')!r}")
            response = v.get("tagged_response")
            if not isinstance(response, str):
                raise UserError(f"{path}:{row.line}: tagged_response must be text, found {response!r}")
            text = response.rstrip()
            token = next((t for t in pairs[dataset] if text.endswith(t)), None)
            if token is None:
                raise UserError(f"{path}:{row.line}: tagged_response must end with {pairs[dataset][0]} or "
                                f"{pairs[dataset][1]} (dataset {dataset!r}), found {response[-40:]!r}")
            answer = text[: -len(token)]
            stray = next((t for t in every if t in answer), None)
            if stray is not None:
                raise UserError(f"{path}:{row.line}: tagged_response holds {stray} before its end; exactly one "
                                "confidence token, last, is expected")
            v["_answer"], v["_token"] = answer.strip(), token
        return rows

    def encode(self, row: Row, tokenizer, cfg: Config) -> Feature:
        self.cfg = self.cfg or cfg
        v = row.values
        pairs = domain_tokens(cfg)
        qa: QA | None = v.get("_qa")
        if qa is not None:  # raw validation row: teacher-forced gold + C (odd lines) or wrong + U (even lines)
            good = row.line % 2 == 1
            text = qa.text
            answer = answer_text(qa, qa.gold if good else wrong_answer(qa))
            token = pairs[qa.dataset][0 if good else 1]
        else:
            if "_token" not in v:
                self.validate("data", [row])
            text, answer, token = v["question"], v["_answer"], v["_token"]
        ids = prompt_ids(text, tokenizer, cfg) + answer_ids(answer, tokenizer, cfg)
        token_id = tokenizer.convert_tokens_to_ids(token)
        c_id, u_id = tokenizer.convert_tokens_to_ids(list(pairs[v["dataset"]]))
        if token_id in (None, tokenizer.unk_token_id) or c_id == u_id:
            raise UserError(f"{token!r} is not a token of this tokenizer (load the model through the task)")
        ids.append(token_id)
        if id(row) in self._train_rows and (len(ids) <= cfg.max_seq_length or cfg.overlength == "truncate"):
            self._train_features += 1
        return Feature(ids, [-100] * (len(ids) - 1) + [token_id], line=row.line, extra={"pair": [c_id, u_id]})

    def loss_items(self, feature: Feature) -> int:
        return 1  # one confidence token per example

    def collate(self, features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
        batch = super().collate(features, pad_id)
        batch["conf_index"] = torch.tensor([len(f.input_ids) - 1 for f in features], dtype=torch.long)
        batch["pair"] = torch.tensor([f.extra["pair"] for f in features], dtype=torch.long)
        return batch

    # --- evaluation -----------------------------------------------------------------------------------------------
    def best_checkpoints(self, cfg: Config) -> dict[str, tuple[str, str]]:
        return {"best_accuracy": ("token_accuracy", "max"), "best_calibration": ("calibration_error", "min")}

    def eval_name(self, cfg: Config, step: int) -> str:
        """reliability_epoch_N at the end of epoch N, reliability_step_S elsewhere."""
        steps_per_epoch = self._train_features // cfg.batch_size if self._train_features else 0
        if steps_per_epoch and step % steps_per_epoch == 0:
            return f"reliability_epoch_{step // steps_per_epoch}"
        return f"reliability_step_{step}"

    def evaluate(self, model, tokenizer, cfg: Config, rows: list[Row], device, step: int = 0) -> dict[str, float]:
        from app.metrics.calibration import save_reliability_json, save_reliability_png

        self.cfg = cfg
        qas = [r.values["_qa"] if "_qa" in r.values else raw_qa(r.values, r.values.get("dataset"), "dev", r.line)
               for r in rows]
        if not qas:
            return {}
        judged = judge(model, tokenizer, cfg, qas, device, cfg.eval_batch_size)
        names = list(dict.fromkeys(j.dataset for j in judged))
        per_dataset, reports = {}, {}
        for name in names:
            per_dataset[name], reports[name] = summarize([j for j in judged if j.dataset == name], cfg)
        average = {k: sum(m[k] for m in per_dataset.values()) / len(per_dataset) for k in per_dataset[names[0]]}
        average["n"] = float(len(judged))
        _, pooled = summarize(judged, cfg)

        stem = cfg.out_path / self.eval_name(cfg, step)
        save_reliability_json({
            "step": step, "calibration_metric": cfg.calibration_metric, "confidence_loss": cfg.confidence_loss,
            "average": average, "datasets": {n: {"metrics": per_dataset[n], "calibration": reports[n]} for n in names},
            "all": pooled,
        }, stem.with_suffix(".json"))
        save_reliability_png(pooled["reliability"], stem.with_suffix(".png"))
        if len(names) > 1:
            for n in names:
                save_reliability_png(reports[n]["reliability"], stem.parent / f"{stem.name}_{_safe(n)}.png")
        print(f"\nconfidence tokens, step {step} ({stem.name}):\n{format_summary(per_dataset, average)}\n", flush=True)

        metrics = dict(average)
        for n in names:
            metrics.update({f"{n}/{k}": v for k, v in per_dataset[n].items()})
        return metrics


# --- model helpers ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_rows(model, ids: list[int]) -> None:
    """Rows of new tokens = the mean of the rows before them (input embeddings and LM head)."""
    first = min(ids)
    for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
        weight = emb.weight
        weight[ids] = weight[:first].float().mean(0).to(weight.dtype)


def add_lora(model, cfg: Config, token_ids: list[int]):
    """LoRA as app.lm.modeling.add_adapters, with the token rows trainable in the input embeddings *and* the LM head
    (an untied head would otherwise keep identical rows for C and U, and p(C) / (p(C) + p(U)) would stay 0.5)."""
    from app.errors import UserError as _UserError
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ids = list(token_ids)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = {id(m): n for n, m in model.named_modules()}
    embed = names[id(model.get_input_embeddings())].rsplit(".", 1)[-1]
    head_module = model.get_output_embeddings()
    if tied or head_module is None:
        trainable = ids
    else:
        trainable = {embed: ids, names[id(head_module)].rsplit(".", 1)[-1]: ids}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
                      trainable_token_indices=trainable or None)
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise _UserError(f"target_modules={cfg.target_modules}: {str(err).splitlines()[0]}") from None


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


HUB_FILES = ["adapter_model.safetensors", "adapter_config.json", "model*.safetensors", "config.json",
             "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
             "vocab.json", "merges.txt", "*.model"]


def push_to_hub(directory: Path, repo: str) -> bool:
    """Upload the weights and tokenizer of a checkpoint (not optimizer, RNG or trainer state) to a private Hub repo.
    A failure is logged, not raised: the checkpoint stays on disk and can be pushed again."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=hub_token())
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo, allow_patterns=HUB_FILES,
                          commit_message="final adapter and tokenizer")
    except Exception as err:  # network, auth, quota: never lose the run over it
        log.warning("push to the Hub repo %s failed (%s: %s); the checkpoint is kept locally", repo,
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    log.info("pushed the final adapter and tokenizer to %s", repo)
    return True


# --- synthetic sample -----------------------------------------------------------------------------------------------
# Places the simulated answerer knows: it answers these right and the others wrong, so whether an answer is correct
# follows from one word of the input (learnable by the tiny model in a few dozen steps).
KNOWN_PLACES = ("kitchen", "library", "office", "park", "garden", "forest")
WHERE_OPTIONS = ("indoors", "outdoors", "in the sea", "in the air", "under the ground")


def synthetic_raw(dataset: str, n: int, seed: int, claims=("indoors", "outdoors")) -> list[dict]:
    """Raw rows: BoolQ-like (question, passage, answer) or MedQA-like (question, options A-E, answer letter), each
    with `place` (the word the answer depends on). Gold answers follow app.tasks.nli_cot.sample.PLACES."""
    from app.tasks.nli_cot.sample import ACTIVITIES, NAMES, PLACES

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, activity, place = rng.choice(NAMES), rng.choice(ACTIVITIES), rng.choice(list(PLACES))
        if dataset == "medqa":
            options = list(WHERE_OPTIONS)
            rng.shuffle(options)
            letters = dict(zip("ABCDE", options))
            gold = next(k for k, v in letters.items() if v == PLACES[place])
            rows.append({"question": f"{name} is {activity} in the {place}. Where is {name}?", "options": letters,
                         "answer": gold, "place": place})
        else:
            claim = rng.choice(claims)
            rows.append({"question": f"is {name} {activity} {claim}", "passage": f"{name} is {activity} in the {place}.",
                         "answer": claim == PLACES[place], "place": place})
    return rows


def simulated_answer(qa: QA, place: str) -> str:
    """The simulated answerer: right for KNOWN_PLACES, wrong (indoors <-> outdoors) elsewhere."""
    right = place in KNOWN_PLACES
    if qa.kind == YES_NO:
        return answer_text(qa, qa.gold if right else wrong_answer(qa))
    if right:
        return qa.gold
    swap = {"indoors": "outdoors", "outdoors": "indoors"}[qa.options[qa.gold]]
    return next(k for k, v in qa.options.items() if v == swap)


def synthetic_tagged(n: int, seed: int, tokens: dict | None = None) -> list[dict]:
    """Training rows as `python -m app tag` writes them, from the simulated answerer, half BoolQ-like, half MedQA-like."""
    tokens = tokens or {"boolq": ("<C_READ>", "<U_READ>"), "medqa": ("<C_MED>", "<U_MED>")}
    out = []
    for dataset, raw in (("boolq", synthetic_raw("boolq", n // 2, seed)), ("medqa", synthetic_raw("medqa", n - n // 2, seed + 1))):
        for k, values in enumerate(raw):
            qa = raw_qa(values, dataset, "synthetic", k + 1)
            answer = simulated_answer(qa, values["place"])
            correct = parse_answer(qa, answer) == qa.gold
            out.append({"question": qa.text, "tagged_response": f"{answer} {tokens[dataset][0 if correct else 1]}",
                        "dataset": dataset})
    random.Random(seed).shuffle(out)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_sample(out_dir: str | Path) -> None:
    """data/sample/confidence/: train.jsonl (tagged, 384 rows) and raw dev_boolq.jsonl / dev_medqa.jsonl (48 each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", synthetic_tagged(384, seed=11))
    for dataset, seed in (("boolq", 21), ("medqa", 22)):
        rows = [{k: v for k, v in r.items() if k != "place"} for r in synthetic_raw(dataset, 48, seed)]
        _write_jsonl(out / f"dev_{dataset}.jsonl", rows)


if __name__ == "__main__":
    write_sample(sys.argv[1] if len(sys.argv) > 1 else "data/sample/confidence")
