"""`python -m app tag INPUT --output OUT.jsonl [--dataset NAME] [--config CFG.py] [--checkpoint DIR] [--limit N]
[--key=value ...]`: training rows for the confidence_tokens task from raw QA rows and a model.

Each raw row (BoolQ: question, passage, answer true/false; MedQA: question, options A-E, answer letter; see
app/tasks/confidence_tokens.py) is put to the model with the same prompt the task trains and validates with; the
answer is generated greedily by app.lm.generate (length-sorted batches of `infer_batch_size` rows, prompts prefilled
`prefill_tokens` at a time, `max_new_tokens`, stopping at EOS or a confidence token), parsed (yes/no,
or the option letter), compared with the gold answer, and the dataset's token is appended: `<C_…>` when it is
correct, `<U_…>` when it is not (an unparseable answer is not correct).

Model: the config's `model_name` (the base model the confidence tokens will be trained on), or `--checkpoint DIR`
(a run checkpoint, adapter or full). Config: `--config` (e.g. configs/confidence_tokens.py) and `--key=value`
overrides of any config field; without `--config`, the defaults of app/config.py. The dataset of a row is
`--dataset`, else the row's `dataset` column; it must have tokens in `confidence_tokens`.

Output JSONL, one line per input row in input order: question (the text shown to the model), tagged_response,
dataset, answer (parsed; null when unparseable), gold, correct, line (in INPUT). Written to a temporary file and
renamed into place. A per-dataset summary (rows, parsed, accuracy) is printed.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

from app.config import load_config
from app.atomic import write_atomic
from app.errors import UserError

log = logging.getLogger("app.tasks.confidence_tokens.tag")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def load_questions(path: str, dataset: str | None, cfg, limit: int | None = None):
    """Normalised questions of a raw file; UserError naming file and line for anything unusable."""
    from app.tasks.confidence_tokens.qa import domain_tokens, read_raw_qa

    pairs = domain_tokens(cfg)
    if dataset is not None and dataset not in pairs:
        raise UserError(f"--dataset={dataset!r} has no tokens in confidence_tokens (known: {', '.join(pairs)})")
    return [qa for _, _, qa in read_raw_qa(path, dataset, pairs, limit)]


def load_model(cfg, checkpoint: str | None, device):
    from app.lm import modeling

    if checkpoint is not None:
        if not Path(checkpoint).is_dir():
            raise UserError(f"--checkpoint {checkpoint}: not a directory")
        return modeling.load_for_inference(checkpoint, cfg, device)
    from app.runs import ensure_base_model

    ensure_base_model(cfg)
    tokenizer = modeling.load_tokenizer(cfg)
    model = modeling.load_base_model(cfg, device)
    if cfg.quantization is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def tag_rows(model, tokenizer, cfg, qas, device) -> list[dict]:
    """Generate, parse, judge and tag; one output dict per question, in order."""
    from app.tasks.confidence_tokens.judge import generate_continuations
    from app.tasks.confidence_tokens.qa import all_tokens, answer_text, domain_tokens, fit_prompt, parse_answer, prompt_ids

    pairs = domain_tokens(cfg)
    vocab = tokenizer.get_vocab()
    stop_ids = [vocab[t] for t in all_tokens(cfg) if t in vocab]  # a checkpoint's tokenizer knows them
    limit = max(cfg.max_seq_length - cfg.max_new_tokens, 2)
    prompts = [fit_prompt(prompt_ids(q.text, tokenizer, cfg), limit) for q in qas]
    conts = generate_continuations(model, tokenizer, prompts, cfg.infer_batch_size, cfg.max_new_tokens, device, stop_ids,
                                   prefill_tokens=cfg.prefill_tokens)
    out = []
    for q, ids in zip(qas, conts):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        parsed = parse_answer(q, text)
        correct = parsed is not None and parsed == q.gold
        token = pairs[q.dataset][0 if correct else 1]
        out.append({"question": q.text, "tagged_response": f"{text} {token}" if text else token, "dataset": q.dataset,
                    "answer": parsed, "gold": answer_text(q, q.gold), "correct": correct, "line": q.line})
    return out


def summary(tagged: list[dict]) -> str:
    lines = [f"{'dataset':<12} {'rows':>6} {'parsed':>7} {'correct':>8} {'accuracy':>9}"]
    for name in dict.fromkeys(r["dataset"] for r in tagged):
        rows = [r for r in tagged if r["dataset"] == name]
        n, parsed, correct = len(rows), sum(r["answer"] is not None for r in rows), sum(r["correct"] for r in rows)
        lines.append(f"{name:<12} {n:>6} {parsed:>7} {correct:>8} {correct / n:>9.4f}")
    return "\n".join(lines)


def run(input_path: str, output: str, dataset: str | None = None, config: str | None = None,
        checkpoint: str | None = None, limit: int | None = None, overrides=()) -> int:
    """Tag every raw row of `input_path` and write the training JSONL to `output` (see the module docstring)."""
    cfg = load_config(config, list(overrides))
    if limit is not None and limit < 1:
        raise UserError(f"--limit={limit}: must be at least 1")
    out = Path(output)
    if out.resolve() == Path(input_path).resolve():
        raise UserError(f"--output {out}: would overwrite the input")
    if out.is_dir():
        raise UserError(f"--output {out}: is a directory")
    qas = load_questions(input_path, dataset, cfg, limit)  # bad data is reported before the model loads

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(cfg, checkpoint, device)
    tagged = tag_rows(model, tokenizer, cfg, qas, device)
    write_jsonl_atomic(out, tagged)
    print(summary(tagged))
    counts = Counter(r["tagged_response"].rsplit(" ", 1)[-1] for r in tagged)
    print(f"wrote {len(tagged)} rows to {out} ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})",
          file=sys.stderr)
    return 0
