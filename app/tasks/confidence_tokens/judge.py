"""Validation of the confidence-token task: generate answer + token, parse, judge, score the token position, summarise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.config import Config
from app.lm.generate import StopRule, generate_ids, length_sorted_batches, next_token_logits
from app.tasks.confidence_tokens.qa import QA, all_tokens, domain_tokens, fit_prompt, parse_answer, prompt_ids


# --- generation and scoring ------------------------------------------------------------------------------------------
def continuation_rule(tokenizer, stop_ids: Sequence[int], never: Sequence[int] = ()) -> StopRule:
    """Stop at EOS or any of `stop_ids` (the confidence tokens, kept as the last id); `never` are not generated at
    all; the first new token is neither EOS nor a stop id (an answer comes first)."""
    stops = [t for t in dict.fromkeys([tokenizer.eos_token_id, *stop_ids]) if t not in set(never)]
    return StopRule(stop_ids=frozenset(stop_ids), never=tuple(never), not_first=tuple(stops))


def generate_continuations(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int, device,
                           stop_ids: Sequence[int], never: Sequence[int] = (), prefill_tokens: int = 2048,
                           ) -> list[list[int]]:
    """Greedy continuations of token-id prompts in input order (app.lm.generate: length-sorted batches, shared
    prefix prefilled once, rows leave the batch when done) under `continuation_rule`: a continuation that a
    confidence token ended has it as its last id; EOS is not kept."""
    return generate_ids(model, tokenizer, prompts, batch_size, max_new_tokens, device,
                        continuation_rule(tokenizer, stop_ids, never), prefill_tokens)


@torch.no_grad()
def token_position_logits(model, contexts: list[list[int]], pad_id: int, batch_size: int, device,
                          pairs: list[tuple[int, int]], prefill_tokens: int = 2048) -> list[tuple[float, float, float]]:
    """(logit of C, logit of U, log-sum-exp over the vocabulary) at the position after each context.

    `next_token_logits` of app.lm.generate on length-sorted batches of `batch_size` contexts (prefilled as generation
    does: a prefix common to the batch once, the rest in chunks of `prefill_tokens` padded tokens). The logits are the
    model's own, so a peft LM head applies its trainable token rows as `project` does."""
    out: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(contexts)
    for batch in length_sorted_batches([len(c) for c in contexts], batch_size):
        logits = next_token_logits(model, [contexts[i] for i in batch], pad_id, device, prefill_tokens).float()
        lse = torch.logsumexp(logits, dim=-1)
        pair_logits = logits.gather(1, torch.tensor([pairs[i] for i in batch], device=logits.device))
        for r, i in enumerate(batch):
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
                                   list(tok_id.values()), never, cfg.prefill_tokens)
    answers = [c[:-1] if c and c[-1] in id_tok else c for c in conts]  # without the token that ended the row
    pairs = [(tok_id[pairs_by_name[q.dataset][0]], tok_id[pairs_by_name[q.dataset][1]]) for q in qas]
    scores = token_position_logits(model, [p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id,
                                   batch_size, device, pairs, cfg.prefill_tokens)
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
