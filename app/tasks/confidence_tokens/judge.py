"""Validation of the confidence-token task: generate answer + token, parse, judge, score the token position, summarise."""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from app.config import Config
from app.tasks.confidence_tokens.loss import project
from app.tasks.confidence_tokens.qa import QA, all_tokens, domain_tokens, fit_prompt, parse_answer, prompt_ids


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
